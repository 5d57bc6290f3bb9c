"""Metrics to ``metrics.jsonl`` always, and to Weights & Biases through Accelerate's tracker on rank 0.

W&B runs offline by itself when there is no API key or no route to the server (``WANDB_MODE`` is honoured), so a
compute node without internet writes ``wandb/offline-run-*`` that ``wandb sync`` uploads later.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
from pathlib import Path

import numpy as np
import torch

from bonedist.choices import WANDB_MODES
from bonedist.files import read_jsonl, write_atomic


def wandb_mode(requested: str) -> str:
    """``off``, ``online`` or ``offline`` for this process (``auto``: offline without an API key or network)."""
    if requested in WANDB_MODES[1:]:
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "off"):
        return "off"
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "online":
        return "online"
    if not _has_api_key():
        return "offline"
    try:
        with socket.create_connection(("api.wandb.ai", 443), timeout=3):
            return "online"
    except OSError:
        return "offline"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MetricsLog:
    """Appends one JSON object per line; written by rank 0 only.

    Each optimizer step's and each epoch's record is in the log once, however often the run was killed and resumed:
    a resume first cuts the log back to the checkpoint it resumes from (``truncate_after``)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")  # closed at once: in the OS's hands, a killed process loses none

    def truncate_after(self, step: int, epochs_done: int, warn=None) -> int:
        """Keep what the checkpoint at optimizer step ``step`` with ``epochs_done`` finished epochs had logged: step
        records up to ``step``, epoch records up to ``epochs_done``, each once (the first), and notes up to ``step``.
        A torn last line is dropped (with a line through ``warn``). Returns the number of records dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        records = read_jsonl(self.path, warn)
        kept, seen = [], set()
        for record in records:
            kind = record.get("kind")
            at = record.get("step", 0)
            key = (kind, record.get("epoch") if kind == "epoch" else at)
            if not isinstance(at, (int, float)) or at > step or key in seen and kind in ("step", "epoch"):
                continue
            if kind == "epoch" and not (isinstance(record.get("epoch"), int) and record["epoch"] <= epochs_done):
                continue
            seen.add(key)
            kept.append(record)
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text != self.path.read_text(encoding="utf-8", errors="replace"):
            write_atomic(self.path, text)
        return len(records) - len(kept)


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of a run's ``metrics.jsonl``: a torn last line dropped (said through ``warn``), a damaged line
    before it an error naming the line, each step's and epoch's record once (the last, as a resumed run wrote it)."""
    records = read_jsonl(path, warn)
    last = {}
    for i, record in enumerate(records):
        kind = record.get("kind")
        if kind in ("step", "epoch"):
            last[(kind, record.get("epoch") if kind == "epoch" else record.get("step"))] = i
    return [r for i, r in enumerate(records) if r.get("kind") not in ("step", "epoch") or
            last[(r["kind"], r.get("epoch") if r["kind"] == "epoch" else r.get("step"))] == i]


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def image_grid(images: torch.Tensor, boxes: torch.Tensor | None = None, n: int = 8) -> np.ndarray:
    """(B, C, H, W) normalised inputs → one uint8 RGB strip; AG-CNN boxes drawn in green when given."""
    import cv2

    x = images[:n, :1].detach().float().cpu()
    x = (x - x.amin(dim=(2, 3), keepdim=True)) / (x.amax(dim=(2, 3), keepdim=True) - x.amin(dim=(2, 3),
                                                                                            keepdim=True) + 1e-6)
    tiles = []
    for i in range(x.shape[0]):
        tile = cv2.cvtColor((x[i, 0].numpy() * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
        if boxes is not None:
            x1, y1, x2, y2 = (int(v) for v in boxes[i].tolist())
            cv2.rectangle(tile, (x1, y1), (x2, y2), (0, 255, 0), max(1, tile.shape[0] // 100))
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# W&B artifacts and lineage: the pack a run trained on, the model it left in best/, the report evaluate wrote.


def dataset_artifact(shards: str | Path, manifest: dict):
    """The pack as a ``dataset`` artifact: its manifest (counts, checksums, age statistics) as a file, each shard by
    reference (``file://``, nothing copied), the splits' counts and the image size as metadata."""
    import wandb

    shards = Path(shards).resolve()
    splits = {name: {"count": info["count"], "labeled": info["labeled"], "shards": len(info["shards"])}
              for name, info in manifest["splits"].items()}
    artifact = wandb.Artifact(f"shards-{_artifact_name(shards.name)}", type="dataset", metadata={
        "image_size": manifest["image_size"], "resize_mode": manifest["resize_mode"], "splits": splits,
        "source_root": manifest.get("source_root"), "bonedist_version": manifest.get("bonedist_version")})
    artifact.add_file(str(shards / "manifest.json"))
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            artifact.add_reference(f"file://{shards / shard['name']}", name=shard["name"], checksum=False)
    return artifact


def model_artifact(run_dir: str | Path, meta: dict):
    """A run's ``best/`` as a ``model`` artifact named EXPERIMENT-RUN (RUN: the model's name unless the run has its
    own): meta.json as a file, the weights by reference,
    what evaluation and prediction need (config, mu/sigma, input spec, metrics) as metadata."""
    import wandb

    best = Path(run_dir).resolve() / "best"
    config = meta.get("config", {})
    name = _artifact_name(f"{config.get('experiment', 'default')}-{meta.get('run', meta['model'])}")
    kept = ("model", "run", "model_options", "spec", "mu", "sigma", "train_mean_months", "epoch", "global_step",
            "metrics", "pack", "bonedist_version", "git")
    artifact = wandb.Artifact(name, type="model", metadata={k: meta.get(k) for k in kept}
                              | {"preset": config.get("preset")})
    artifact.add_file(str(best / "meta.json"))
    artifact.add_reference(f"file://{best / 'model.safetensors'}", name="model.safetensors")
    return artifact


def use_artifact(run, artifact) -> None:
    """``run.use_artifact`` that also works offline: wandb refuses ``use_artifact`` there, so the artifact is logged
    as used-by-this-run (what ``use_artifact`` does online with an artifact built locally) and ``wandb sync`` records
    the lineage later."""
    if not getattr(run.settings, "_offline", False):
        run.use_artifact(artifact)
        return
    log = getattr(run, "_log_artifact", None)
    if log is None:  # a wandb without the internal call: keep the link as the artifact's own record
        run.log_artifact(artifact)
        return
    log(artifact, is_user_created=True, use_after_commit=True)


def _artifact_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)

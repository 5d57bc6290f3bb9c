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


def wandb_mode(requested: str) -> str:
    """``off``, ``online`` or ``offline`` for this process, with the reason for automatic choices."""
    if requested in ("off", "online", "offline"):
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
    """Appends one JSON object per line; written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")  # closed at once: in the OS's hands, a killed process loses none

    def truncate_after(self, step: int) -> None:
        """Drop the lines logged after optimizer step ``step`` (a resumed run logs them again)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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

"""Checkpoints: written atomically (temporary folder, then rename), the last k kept, the best kept apart.

Layout of a run folder ``runs/EXPERIMENT/RUN/`` (RUN: the model's name, or the run's own ``--run-name``)::

    config.json  metrics.jsonl
    checkpoints/step-00000120/{state.pt, model.safetensors, meta.json}
    best/{model.safetensors, meta.json}

``state.pt`` holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
``model.safetensors`` + ``meta.json`` (config, mu/sigma, metrics) are what evaluation and prediction read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from bonedist import BonedistError, free_gib
from bonedist.files import read_json, reason

STEP_PREFIX = "step-"


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_folder_atomic(target: Path, files: dict[str, object]) -> None:
    """Write ``files`` (name -> bytes-producing callable) into a temp folder beside ``target``, then rename.

    A failed write (disk full, quota, file size limit) removes the temporary folder and raises a one-line
    ``BonedistError`` naming the folder and the free space; the previous checkpoint is left as it was.
    """
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, write in files.items():
            write(tmp / name)
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save: RuntimeError; safetensors: its own
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise BonedistError(
            f"cannot write {target}: {reason} ({free_gib(target.parent):.1f} GiB free there). Free some space "
            f"(or lower --keep-last) and re-run the same command: training resumes from the last complete "
            f"checkpoint") from exc
    old = target.parent / f".old-{target.name}"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, state: dict, model_tensors: dict[str, torch.Tensor], meta: dict,
                    keep_last: int) -> Path:
    folder = Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"
    _write_folder_atomic(folder, {
        "state.pt": lambda p: torch.save(state, p),
        "model.safetensors": lambda p: save_file(model_tensors, str(p)),
        "meta.json": lambda p: p.write_text(json.dumps(meta, indent=1)),
    })
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def half_precision(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors stored as float16 (half the size; loading casts them back), unless a value would not fit."""
    return {k: v.half() if v.dtype == torch.float32 and v.abs().max() < 6e4 else v for k, v in tensors.items()}


def save_best(run_dir: Path, model_tensors: dict[str, torch.Tensor], meta: dict, dtype: str = "fp32") -> Path:
    if dtype == "fp16":
        model_tensors = half_precision(model_tensors)
    folder = Path(run_dir) / "best"
    _write_folder_atomic(folder, {
        "model.safetensors": lambda p: save_file(model_tensors, str(p)),
        "meta.json": lambda p: p.write_text(json.dumps(meta, indent=1)),
    })
    return folder


def recover_run_folder(run_dir: Path) -> None:
    """After a kill: put back a ``best/`` that was being replaced, and remove half-written temporary folders."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for old in folder.glob(".old-*"):
            target = folder / old.name.removeprefix(".old-")
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # killed between the two renames: the previous complete folder goes back
                os.replace(old, target)
        for tmp in folder.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder`` (None: it loads and its weights are finite): a cut or damaged
    ``state.pt``, ``model.safetensors`` or ``meta.json``, or non-finite weights (a step that diverged)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = read_json(folder / "meta.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
            return "meta.json names no model"
    except BonedistError as exc:
        return str(exc).removeprefix(f"{folder}/")
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # a cut file: SafetensorError, OSError, a header that does not parse
        return f"model.safetensors cannot be loaded ({reason(exc)})"
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        return f"model.safetensors holds non-finite weights ({bad})"
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        return f"state.pt cannot be loaded ({reason(exc)})"
    missing = [k for k in ("optimizer", "scheduler", "trainer", "rng", "world") if not isinstance(state, dict)
               or k not in state]
    if missing:
        return f"state.pt lacks {', '.join(missing)}"
    return None


def last_good_checkpoint(run_dir: Path, warn=print, set_aside: bool = True) -> Path | None:
    """The newest checkpoint that loads and holds finite weights. Each damaged newer one is named through ``warn``
    and, with ``set_aside``, renamed ``damaged-step-N`` (kept for a look, no longer listed, so that pruning the
    oldest checkpoints never removes the good one a resumed run writes next)."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        note = ""
        if set_aside:
            aside = folder.with_name(f"damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            note = f", kept as {aside.name}"
        warn(f"warning: checkpoint {folder} is damaged ({problem}{note}); falling back to the one before it")
    return None


def find_resume(run_dir: Path, resume: str, warn=print) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return last_good_checkpoint(run_dir, warn)
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise BonedistError(f"--resume {resume}: not a checkpoint folder (no state.pt)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise BonedistError(f"--resume {resume}: the checkpoint is damaged ({problem}); name an earlier one, or "
                            f"--resume auto to take the newest good one")
    return path


def load_state(folder: Path) -> dict:
    try:
        return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BonedistError(f"cannot load checkpoint {folder}: {exc.__class__.__name__}: {exc}") from exc

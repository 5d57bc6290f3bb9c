"""``bonedist study patches``: the paper's patch study (Table 5, Fig. 6) as one command.

    bonedist study patches --shards shards/rsna                       # the paper's five settings, one epoch each
    bonedist study patches --shards shards/rsna --settings 3x224,49x224 --preset improved --pretrained none
    accelerate launch --config_file launch/accelerate/single_node.yaml -m bonedist study patches --shards ...

Each (patches, size) setting trains ResNet50-patch for ``--epochs`` (default one) with the chosen preset through the
ordinary training engine (``runs/EXPERIMENT/patches-KxP/resnet50_patch``, resumable, tracked), then the study writes
``runs/EXPERIMENT/study-patches/``: ``loss_curves.png`` (training loss per step, every setting in one figure, as the
paper's Fig. 6), ``table.md`` and ``results.json`` (the paper's Table 5 with the losses, MAE and throughput), and
logs both to W&B as one run of the experiment's group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bonedist import BonedistError
from bonedist.files import write_atomic, write_json_atomic
from bonedist.tracking import read_metrics

PAPER_SETTINGS = ((1, 500), (3, 224), (9, 128), (36, 64), (150, 32))  # Table 5: (patches, size)


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'1x500,3x224' → [(1, 500), (3, 224)]."""
    settings = []
    for item in text.split(","):
        k, sep, p = item.strip().lower().partition("x")
        if not sep or not k.isdigit() or not p.isdigit() or int(k) < 1 or int(p) < 8:
            raise BonedistError(f"--settings {text!r}: expected PATCHESxSIZE items such as 3x224,9x128")
        settings.append((int(k), int(p)))
    return settings


@dataclass
class StudyOptions:
    shards: str
    settings: list = field(default_factory=lambda: list(PAPER_SETTINGS))
    preset: str = "paper"
    experiment: str = "patch-study"
    runs_dir: str = "runs"
    epochs: int = 1
    overrides: dict = field(default_factory=dict)  # any other training option (steps_per_epoch, input, ...)
    wandb: str = "auto"


def study_patches(opts: StudyOptions) -> list[dict]:
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import NonFiniteLoss, end_processes, train_in_process

    rows, main, lr = [], True, None
    try:
        for patches, size in opts.settings:
            overrides = {"log_every": 1, **opts.overrides}
            overrides["input"] = {**overrides.get("input", {}), "patch_size": size, "num_patches": patches}
            cfg = resolve_config("resnet50_patch", opts.shards, opts.preset,
                                 experiment=f"{opts.experiment}/patches-{patches}x{size}", runs_dir=opts.runs_dir,
                                 epochs=opts.epochs, wandb=opts.wandb, **overrides)
            image_size, lr = cfg.input.image_size, cfg.lr
            if size > image_size:
                raise BonedistError(f"--settings {patches}x{size}: patches larger than the {image_size}-px image")
            start = time.perf_counter()
            try:
                code, run_dir, main = train_in_process(cfg, f"patch study: {patches} patches of {size}x{size} "
                                                            f"({len(rows) + 1}/{len(opts.settings)})")
            except NonFiniteLoss as exc:  # one setting's divergence is a result of the study, not its end
                print(f"patch study: {patches}x{size} diverged: {exc}")
                run_dir = Path(opts.runs_dir) / cfg.experiment / cfg.run
                rows.append(_summarise(run_dir, patches, size, time.perf_counter() - start, diverged=True))
                continue
            if code != 0:
                raise BonedistError(f"the {patches}x{size} run stopped (exit {code}); run the study again to "
                                    "resume it")
            if main:
                rows.append(_summarise(run_dir, patches, size, time.perf_counter() - start))
    finally:
        end_processes()
    if not main:
        return []
    out = Path(opts.runs_dir) / opts.experiment / "study-patches"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"preset": opts.preset, "epochs": opts.epochs, "shards": opts.shards,
                                             "settings": rows})
    write_atomic(out / "table.md", _table(rows, opts))
    _figure(rows, out / "loss_curves.png")
    _log_wandb(rows, out, opts)
    print(_table(rows, opts))
    print(f"patch study written to {out}")
    diverged = [f"{r['patches']}x{r['size']}" for r in rows if r.get("diverged")]
    if diverged:
        raise BonedistError(f"{len(diverged)} of {len(rows)} settings diverged ({', '.join(diverged)}; marked in "
                            f"{out / 'table.md'}): the same command with a lower --lr (now {lr:g}) or "
                            "--clip-grad 1.0 trains them again and keeps the finished ones")
    return rows


def _summarise(run_dir: Path, patches: int, size: int, seconds: float, diverged: bool = False) -> dict:
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path, warn=print) if path.exists() else []
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    last = epochs[-1] if epochs else {}
    return {"patches": patches, "size": size, "run": str(run_dir), "seconds": round(seconds, 1),
            "curve": [[r["step"], r["train_loss_step"]] for r in steps],
            "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
            "val_mae_months": last.get("val_mae_months"), "images_per_s": last.get("images_per_s_per_device"),
            "patches_per_s": (last.get("images_per_s_per_device") or 0.0) * patches, "diverged": diverged}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict], opts: StudyOptions) -> str:
    lines = [f"# Patch study: ResNet50-patch, preset {opts.preset}, {opts.epochs} epoch(s) per setting", "",
             "| patches | size | train loss (z) | val loss (z) | val MAE (months) | radiographs/s | patches/s | "
             "time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("diverged"):
            lines.append(f"| {r['patches']} | {r['size']}x{r['size']} | diverged (non-finite loss) | - | - | - | - | "
                         f"{r['seconds']:.0f} |")
            continue
        lines.append(f"| {r['patches']} | {r['size']}x{r['size']} | {_fmt(r['train_loss'])} | {_fmt(r['val_loss'])} | "
                     f"{_fmt(r['val_mae_months'], 2)} | {_fmt(r['images_per_s'], 1)} | {_fmt(r['patches_per_s'], 1)} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "The paper (Table 5, Fig. 6) found many small patches generalise worse, and little difference "
              "between 224 and 500 px; its choice was 3 x 224."]
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        if not r["curve"]:
            continue
        steps, losses = (np.asarray(v, dtype=float) for v in zip(*r["curve"]))
        color = f"C{i}"
        ax.plot(steps, losses, color=color, lw=0.7, alpha=0.3, marker="." if len(steps) < 30 else None)
        smooth, alpha = np.empty_like(losses), min(1.0, 20.0 / max(len(losses), 1))  # ~5% of the run
        for j, value in enumerate(losses):
            smooth[j] = value if j == 0 else (1 - alpha) * smooth[j - 1] + alpha * value
        ax.plot(steps, smooth, color=color, lw=1.8, label=f"{r['patches']} x {r['size']}px")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (z units; faint: per step, bold: smoothed)")
    ax.set_title("ResNet50-patch: training loss per (patches, size)")
    ax.legend(title="patches x size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_wandb(rows: list[dict], out: Path, opts: StudyOptions) -> None:
    from bonedist.tracking import wandb_mode

    mode = wandb_mode(opts.wandb)
    if mode == "off":
        return
    import wandb

    run = wandb.init(project="bonedist", group=opts.experiment, job_type="study", name="study-patches", dir=str(out),
                     mode=mode, config={"preset": opts.preset, "epochs": opts.epochs, "shards": opts.shards,
                                        "settings": [f"{r['patches']}x{r['size']}" for r in rows]})
    columns = ["patches", "size", "train_loss", "val_loss", "val_mae_months", "images_per_s", "patches_per_s",
               "seconds"]
    run.log({"patch_study": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
             "loss_curves": wandb.Image(str(out / "loss_curves.png"))})
    run.finish()

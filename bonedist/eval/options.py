"""``bonedist evaluate``'s options, apart from the evaluation itself so that the CLI builds its flags without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from bonedist.choices import DATA_MODES, PATCH_AGGREGATES, PRECISIONS, WANDB_MODES
from bonedist.options import check_fields, option


@dataclass
class EvalOptions:
    """``bonedist evaluate``'s options (its flags are generated from these fields)."""

    runs: str = option("", "runs/EXPERIMENT, holding MODEL/best/ folders", cli=False)
    split: str = option("test", "the split to report")
    shards: str | None = option(None, "packed data (default: the one the models were trained on)")
    flip: bool | None = option(None, "test-time horizontal flip averaging (default: each run's own setting; on in "
                                     "improved and scratch)")
    tta_rotate: float | None = option(None, "test-time views rotated by -/+ this many degrees beside the radiograph "
                                             "(0: none; default: each run's own, those its calibration was refit "
                                             "with)", minimum=0.0, maximum=45.0)
    tta_scale: float | None = option(None, "test-time views zoomed by 1 -/+ this (0: none; default: each run's own)",
                                     minimum=0.0, maximum=0.5)
    aggregate: str | None = option(None, "patch models: mean or median over the grid (default: each run's own)",
                                   PATCH_AGGREGATES, flag="--patch-aggregate")
    batch_size: int = option(16, "radiographs per batch", minimum=1)
    data_mode: str = option("auto", "cache the split, stream it, or choose by free memory", DATA_MODES)
    workers: int = option(2, "DataLoader workers per process (stream mode)", minimum=0)
    precision: str = option("auto", "auto: bf16 on CUDA, fp32 on a CPU (bonedist.train.precision)", PRECISIONS)
    coverage: float = option(0.9, "nominal coverage of the prediction intervals reported (calibrated on the "
                                  "validation split)", minimum=0.05, maximum=0.99)
    out: str | None = option(None, "report folder (default RUNS/report)")
    expect: str | None = option(None, "comma-separated models the runs should hold, a warning for each without a "
                                      "run (default: the models of the runs' presets' default lists)")
    wandb: str = option("auto", "W&B: auto is offline without an API key or network", WANDB_MODES)

    def __post_init__(self):
        check_fields(self)

"""bonedist: bone-age models for pediatric hand radiographs, from the RSNA/Kaggle downloads to an evaluated
ensemble, on one CPU or many GPU nodes.

    bonedist pack /data/rsna --out shards/rsna
    bonedist train --model xception --shards shards/rsna --preset improved
    bonedist evaluate --runs runs/default
    bonedist predict hand.png --sex F --runs runs/default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonedist import BonedistError, __version__, run_command
from bonedist.data.source import DATA_MODES
from bonedist.tracking import WANDB_MODES


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic hand phantoms in the official RSNA/Kaggle layouts")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--n", type=int, default=400, help="training images (default 400)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (default n/4)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default n/4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="image height in pixels (default 512)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from bonedist.data.synth import synth_dataset

    counts = synth_dataset(args.out, n=args.n, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                           size=args.size, workers=args.workers)
    print(f"wrote {sum(counts.values())} phantoms ({', '.join(f'{k} {v}' for k, v in counts.items())}) to {args.out}")
    return 0


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack radiographs in an official layout into WebDataset shards",
                       description="Detects the official RSNA/Kaggle layouts under ROOT (or reads --csv) and writes "
                                   "validated, resized shards plus manifest.json to --out.")
    p.add_argument("root", type=Path, help="data root holding the official files")
    p.add_argument("--out", type=Path, default=None, help="output folder (default shards/<root name>)")
    p.add_argument("--size", type=int, default=500, help="square output side in pixels (default 500)")
    p.add_argument("--resize", default="pad", choices=["pad", "stretch"],
                   help="pad: keep aspect ratio, letterbox (default); stretch: distort to a square (the paper)")
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--splits", default="train,validation,test", help="comma-separated splits to pack")
    p.add_argument("--strict", action="store_true", help="fail (and write no manifest) if anything is skipped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--holdout", default=None, metavar="validation:N[,test:M]",
                   help="carve held-out splits from the training table, stratified by sex and age (N a count or a "
                        "fraction below 1), for data that comes without them (Kaggle's training set)")
    p.add_argument("--holdout-seed", type=int, default=0, help="which radiographs --holdout picks (default 0)")
    p.add_argument("--max-pixels", type=float, default=None,
                   help="skip images whose header declares more pixels than this, before decoding them (default "
                        "64e6: every radiography detector fits; a decompression bomb does not)")
    g = p.add_argument_group("generic CSV (collections outside the official layouts)")
    g.add_argument("--csv", type=Path, default=None, help="table of images (path relative to ROOT or absolute)")
    g.add_argument("--id-col", default="id")
    g.add_argument("--age-col", default="boneage", help="bone age column; pass '' for unlabeled data")
    g.add_argument("--sex-col", default="male", help="values True/False, TRUE/FALSE, M/F, male/female, 1/0")
    g.add_argument("--path-col", default=None, help="image path column (relative to ROOT); else --image-dir")
    g.add_argument("--image-dir", default=None, help="folder under ROOT searched for <id>.png/.jpg")
    g.add_argument("--split", default="train", help="split of every row (default train)")
    g.add_argument("--split-col", default=None, help="column naming each row's split")
    g.add_argument("--age-unit", default="months", choices=["months", "years"])
    p.set_defaults(func=_cmd_pack)


def _cmd_pack(args) -> int:
    from bonedist.data.holdout import parse_holdout
    from bonedist.data.layouts import GenericCSV
    from bonedist.data.pack import PackOptions, pack_dataset

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    options = PackOptions(size=args.size, resize=args.resize, samples_per_shard=args.samples_per_shard,
                          workers=args.workers, strict=args.strict, splits=splits, progress=not args.quiet,
                          holdout=parse_holdout(args.holdout), holdout_seed=args.holdout_seed,
                          **({"max_pixels": int(args.max_pixels)} if args.max_pixels else {}))
    generic = None
    if args.csv is not None:
        generic = GenericCSV(csv=args.csv, id_col=args.id_col, age_col=args.age_col or None, sex_col=args.sex_col,
                             path_col=args.path_col, image_dir=args.image_dir, split=args.split,
                             split_col=args.split_col, age_unit=args.age_unit)
    out = args.out or Path("shards") / args.root.resolve().name
    _, code = pack_dataset(args.root, out, options, generic)
    return code


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a pack and verify every shard's checksum and count")
    p.add_argument("shards", type=Path)
    p.add_argument("--grid", type=Path, default=None, help="write a labelled contact sheet PNG")
    p.add_argument("--split", default=None, help="split for the contact sheet (default: all)")
    p.add_argument("--n", type=int, default=24, help="images in the contact sheet")
    p.add_argument("--hand-mask", action="store_true", help="show the hand mask (what the improved presets keep)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from bonedist.data.manifest import load_manifest, summary_lines, verify_shards, write_grid

    manifest = load_manifest(args.shards)
    print("\n".join(summary_lines(args.shards, manifest)))
    problems = verify_shards(args.shards, manifest)
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"verified {n_shards - len(problems)}/{n_shards} shards (sha256 and sample count)")
    if args.grid:
        drawn = write_grid(args.shards, manifest, args.grid, split=args.split, n=args.n, hand_mask=args.hand_mask)
        print(f"wrote a contact sheet of {drawn} samples to {args.grid}")
    return 1 if problems else 0


def _add_train(sub) -> None:
    from bonedist.train.cli import add_train_arguments

    p = sub.add_parser("train", help="train one model (single process; use `accelerate launch -m bonedist.train` "
                                     "for several)")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from bonedist.train.cli import run_train

    return run_train(args)


def _add_evaluate(sub) -> None:
    from bonedist.eval.evaluate import EvalOptions
    from bonedist.options import add_arguments

    p = sub.add_parser("evaluate", help="every trained model and the ensembles on a split, with a report",
                       description="Works in one process or under `accelerate launch -m bonedist evaluate ...`; "
                                   "every sample is predicted exactly once either way.")
    p.add_argument("--runs", required=True, help="runs/EXPERIMENT, holding MODEL/best/ folders")
    add_arguments(p, EvalOptions)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from bonedist.eval.evaluate import EvalOptions, evaluate
    from bonedist.options import given

    result = evaluate(EvalOptions(runs=args.runs, **given(args, EvalOptions)))
    if result:
        for note in result["notes"]:
            print(f"note: {note}")
        for name, m in result["metrics"].items():
            print(f"{name:<24} MAE {m['mae_months']:6.2f} months  RMSE {m['rmse_months']:6.2f}  "
                  f"MSE(z) {m['mse_z']:.3f}")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="bone age of radiographs (files, a folder or a worklist) with the ensemble")
    p.add_argument("images", nargs="*", help="PNG, JPEG or DICOM files, or one folder of them")
    p.add_argument("--table", type=Path, default=None,
                   help="a worklist CSV: an image (path or id) column, sex, optionally chronological_age")
    p.add_argument("--image-dir", type=Path, default=None, help="where the table's images are (default: its folder)")
    p.add_argument("--allow-outside-image-dir", action="store_true",
                   help="read table paths that lead outside --image-dir (refused per row by default)")
    p.add_argument("--sex", default=None, help="F or M, for images without one (table or DICOM header)")
    p.add_argument("--runs", default="runs/default", help="runs/EXPERIMENT with trained models")
    p.add_argument("--chronological-age", default=None, help="e.g. 10y3m, 123m: also print the difference")
    p.add_argument("--coverage", type=float, default=0.9, help="of the prediction interval (default 0.9)")
    p.add_argument("--out", type=Path, default=None,
                   help="write one CSV row per image here and the same rows as JSON beside it (default for a "
                        "table or folder: predictions.csv)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--heatmap", default=None, help="PNG with the AG-CNN attention box and mask (single images)")
    p.add_argument("--batch-size", type=int, default=32, help="radiographs per batch (default 32)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--max-pixels", type=float, default=None,
                   help="refuse images whose header declares more pixels than this (default 64e6)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    import json

    from bonedist.data.images import MAX_PIXELS
    from bonedist.eval.predict import format_result, parse_age, parse_sex, predict_images

    max_pixels = int(args.max_pixels) if args.max_pixels else MAX_PIXELS
    if args.heatmap:
        if not args.images or args.table or not args.sex:
            raise BonedistError("--heatmap draws single images: give image files and --sex")
        rows = predict_images(args.images, args.sex, args.runs, args.chronological_age, args.heatmap, max_pixels,
                              args.coverage)
    else:
        rows, out = _predict_work(args, max_pixels, parse_sex, parse_age)
        if out is not None:
            print(f"wrote {out[0]} and {out[1]}: {sum('error' not in r for r in rows)} of {len(rows)} radiographs "
                  f"predicted")
    failed = [r for r in rows if "error" in r]
    if not _process_state().is_main_process:  # under `accelerate launch`: rank 0 speaks for all the rows
        return 1 if failed else 0
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not args.out and len(rows) <= 50:
        good = [format_result(r) for r in rows if "error" not in r]
        if good:
            print("\n".join(good))
    for row in failed[:20]:
        print(f"bonedist predict: error: {row['error']}", file=sys.stderr)
    if failed:
        print(f"bonedist predict: {len(failed)} of {len(rows)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _process_state():
    """This process's place under `accelerate launch` (gloo on a machine without CUDA, as training does)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _predict_work(args, max_pixels, parse_sex, parse_age):
    """A table, a folder or image files through the batched worklist path (every image exactly once, also under
    `accelerate launch`)."""
    from bonedist.eval.predict import Ensemble
    from bonedist.eval.worklist import (
        WorkItem,
        folder_items,
        gather_rows,
        predict_worklist,
        read_worklist,
        write_results,
    )

    if args.table is not None:
        if args.images:
            raise BonedistError("give either --table or images, not both")
        items, default_out = read_worklist(args.table, args.image_dir, args.allow_outside_image_dir), \
            Path("predictions.csv")
    elif len(args.images) == 1 and Path(args.images[0]).is_dir():
        items, default_out = folder_items(Path(args.images[0])), Path("predictions.csv")
        if not items:
            raise BonedistError(f"{args.images[0]}: no PNG, JPEG or DICOM files in it")
    elif args.images:
        items, default_out = [WorkItem(i, Path(p), label=p) for i, p in enumerate(args.images)], None
    else:
        raise BonedistError("nothing to predict: give image files, a folder, or --table worklist.csv")
    state = _process_state()
    ensemble = Ensemble(args.runs, args.coverage, state.device)
    default_male = parse_sex(args.sex) if args.sex else None
    chrono = parse_age(args.chronological_age) if args.chronological_age else None
    workers = args.workers if len(items) >= 8 else 0  # starting decoder processes costs more than a few images
    rows = predict_worklist(items, ensemble, args.batch_size, workers, max_pixels, default_male, chrono,
                            state.process_index, state.num_processes, show_progress=len(items) > 50)
    rows = gather_rows(rows, state.num_processes)
    target = args.out or default_out
    if target is None or not state.is_main_process:
        return [{k: v for k, v in r.items() if k != "index"} for r in rows], None
    return [{k: v for k, v in r.items() if k != "index"} for r in rows], write_results(rows, target)


def _add_sweep(sub) -> None:
    from bonedist.options import add_arguments
    from bonedist.sweep import SweepOptions

    p = sub.add_parser("sweep", help="search training settings with Optuna: trials are training runs, workers pull "
                                     "them (locally or a Slurm array), bad ones are pruned")
    p.add_argument("--space", required=True, help="the search space (YAML: base, params, sampler, pruner)")
    add_arguments(p, SweepOptions)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from bonedist.options import given
    from bonedist.sweep import SweepOptions, run_sweep

    return run_sweep(SweepOptions(space=args.space, **given(args, SweepOptions)))


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="studies from the paper, as commands")
    study = p.add_subparsers(dest="study", required=True)
    s = study.add_parser("patches", help="Table 5 / Fig. 6: ResNet50-patch for each (patches, size), loss curves")
    s.add_argument("--shards", required=True, help="a folder written by `bonedist pack`")
    s.add_argument("--settings", default="1x500,3x224,9x128,36x64,150x32",
                   help="PATCHESxSIZE list (default: the paper's Table 5)")
    s.add_argument("--preset", default="paper")
    s.add_argument("--experiment", default="patch-study", help="runs/EXPERIMENT/patches-KxP/ and study-patches/")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--epochs", type=int, default=1, help="epochs per setting (the paper: one)")
    s.add_argument("--steps-per-epoch", type=int, default=None, help="cap on batches per epoch")
    s.add_argument("--batch-size", type=int, default=None, help="radiographs per step (default: the preset's)")
    s.add_argument("--image-size", type=int, default=None, help="radiograph side (default: the preset's)")
    s.add_argument("--pretrained", default=None, help="backbone weights (default: the preset's)")
    s.add_argument("--data-mode", default=None, choices=DATA_MODES)
    s.add_argument("--wandb", default="auto", choices=WANDB_MODES)
    p.set_defaults(func=_cmd_study)


def _cmd_study(args) -> int:
    from bonedist.study import StudyOptions, parse_settings, study_patches

    overrides = {k: v for k, v in (("steps_per_epoch", args.steps_per_epoch), ("batch_size", args.batch_size),
                                   ("data_mode", args.data_mode)) if v is not None}
    if args.image_size is not None:
        overrides["input"] = {"image_size": args.image_size}
    if args.pretrained is not None:
        overrides["model_options"] = {"pretrained": args.pretrained}
    study_patches(StudyOptions(shards=args.shards, settings=parse_settings(args.settings), preset=args.preset,
                               experiment=args.experiment, runs_dir=args.runs_dir, epochs=args.epochs,
                               overrides=overrides, wandb=args.wandb))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic phantoms in a few minutes",
                       description="Synthesise hand phantoms, pack them, train every model with accelerate launch "
                                   "(2 CPU processes, or the machine's GPUs), evaluate them and the ensembles, and "
                                   "print the headline numbers and where the report is.",
                       epilog="example: bonedist demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n", type=int, default=400, help="training phantoms (validation and test: n/5 each)")
    p.add_argument("--budget", type=float, default=None,
                   help="training minutes for all models together (default 2.0: about 3 minutes in all)")
    p.add_argument("--models", default=None, help="comma-separated (default: every model, `bonedist models`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true",
                   help="keep the phantoms, full-precision weights and resumable checkpoints (a few GB)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from bonedist.demo import DEMO_BUDGET_MIN, run_demo

    run_demo(args.out, n=args.n, budget=args.budget or DEMO_BUDGET_MIN, models=parse_models(args.models),
             seed=args.seed, keep=args.keep)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: bonedist vs a baseline measured in the same run")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("pack", help="packing images/s vs a single-process PIL resize-and-save loop")
    b.add_argument("root", type=Path, nargs="?", default=None,
                   help="data root in an official layout (default: synthesise phantoms in a temporary folder)")
    b.add_argument("--n", type=int, default=240, help="phantoms to synthesise when no ROOT is given")
    b.add_argument("--source-size", type=int, default=1600, help="phantom height in pixels (real originals ~1500-2100)")
    b.add_argument("--size", type=int, default=500)
    b.add_argument("--workers", type=int, default=0)
    b.set_defaults(func=_cmd_bench_pack)
    b = bench.add_parser("attention", help="AG-CNN attention crops/s: Kornia batched vs the per-image OpenCV loop")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--size", type=int, default=500)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    b.set_defaults(func=_cmd_bench_attention)
    b = bench.add_parser("loader", help="augmented device-ready batches/s: stream and cache vs PIL + torchvision")
    b.add_argument("--n", type=int, default=256, help="phantoms to prepare")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--batches", type=int, default=12, help="timed batches per method")
    b.add_argument("--workers", type=int, default=0, help="DataLoader workers for every method (default: cores)")
    b.add_argument("--device", default=None)
    b.set_defaults(func=_cmd_bench_loader)
    b = bench.add_parser("augment", help="Kornia batch augmentation vs torchvision v2 per image, same device")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--size", type=int, default=500)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--device", default=None)
    b.set_defaults(func=_cmd_bench_augment)
    b = bench.add_parser("all", help="every benchmark into one markdown table")
    b.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small sizes (default on a CPU-only machine)")
    b.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    b.add_argument("--verbose", action="store_true", help="show each benchmark's own output")
    b.set_defaults(func=_cmd_bench_all)
    b = bench.add_parser("accuracy", help="pack a folder, train presets within a time budget, MAE per model/ensemble")
    b.add_argument("--data", required=True, type=Path, help="radiographs in an official RSNA/Kaggle layout")
    b.add_argument("--preset", default="improved", help="a preset, or several comma-separated (e.g. paper,improved)")
    b.add_argument("--size", type=int, default=None, help="pack and train at this side (default: the preset's, 500)")
    b.add_argument("--budget", type=float, default=60.0, help="training minutes for all runs together (default 60)")
    b.add_argument("--models", default=None,
                   help="comma-separated, the same in every preset (default: each preset's default model list with "
                        "its budget shares, `bonedist models --preset P --shares`)")
    b.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    b.add_argument("--pretrained", default=None, help="backbone weights (none, a file or a weights folder)")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--workers", type=int, default=0, help="packing processes (default: all cores)")
    b.add_argument("--wandb", default="off", choices=WANDB_MODES)
    b.add_argument("--holdout", default=None, metavar="validation:N[,test:M]",
                   help="carve the splits the data lacks from its training table (as `pack --holdout`)")
    b.add_argument("--holdout-seed", type=int, default=0)
    b.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="repeat the whole benchmark (training and evaluation) once per seed; rows as mean ± sd. A "
                        "number N means seeds 0..N-1")
    b.add_argument("--shares", default=None, metavar="MODEL=W,...",
                   help="each model's relative share of the budget, per run (default: the preset's shares for its "
                        "default list, equal shares for --models)")
    b.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="train every model N times, each run another seed (MODEL, MODEL-2, ...; seed + 1000 k) and "
                        "a separate ensemble member (default: the preset's for its default list, else 1)")
    b.set_defaults(func=_cmd_bench_accuracy)

    b = bench.add_parser("compare", help="controlled comparisons of training settings, several seeds, on the "
                                         "validation split")
    b.add_argument("--data", required=True, type=Path, help="radiographs in an official RSNA/Kaggle layout")
    b.add_argument("--model", required=True)
    b.add_argument("--preset", default="scratch")
    b.add_argument("--size", type=int, default=100, help="pack and train at this side (default 100)")
    b.add_argument("--budget", type=float, default=5.0, help="training minutes of every run (default 5)")
    b.add_argument("--seeds", default="0,1", metavar="S1,S2,...", help="seeds of every setting (default 0,1)")
    b.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a setting to compare with the baseline, one value at a time (repeatable): a TrainConfig "
                        "field (lr, batch_size, ema, loss, balanced, warmup_epochs, ...), input.FIELD, model.FIELD, "
                        "or augment=FACTOR (the preset's augmentation ranges times FACTOR; 0: none)")
    b.add_argument("--out", type=Path, default=Path("runs/compare"))
    b.add_argument("--holdout", default=None, metavar="validation:N[,test:M]")
    b.add_argument("--holdout-seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=0, help="packing processes (default: all cores)")
    b.set_defaults(func=_cmd_bench_compare)

    b = bench.add_parser("train-loop", help="the engine's training loop beside the bare model step, by phase")
    b.add_argument("--model", required=True)
    b.add_argument("--preset", default="improved")
    b.add_argument("--size", type=int, default=None, help="default 500 on CUDA, 96 on CPU")
    b.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 8 on CPU")
    b.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
    b.add_argument("--device", default=None, help="cpu to force the CPU")
    b.set_defaults(func=_cmd_bench_train_loop)

    b = bench.add_parser("predict", help="radiographs/s: a worklist in one predict call vs one call per image")
    b.add_argument("--runs", required=True, help="runs/EXPERIMENT with trained models")
    b.add_argument("--images", default=None, help="a folder of PNG, JPEG or DICOM files (default: the real "
                   "sample radiographs next to the repository, else phantoms)")
    b.add_argument("--n", type=int, default=1000, help="worklist rows (the images cycled; default 1000)")
    b.add_argument("--single", type=int, default=20, help="one-image calls timed (default 20)")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--workers", type=int, default=2, help="decoding processes of the worklist (default 2)")
    b.set_defaults(func=_cmd_bench_predict)

    b = bench.add_parser("train-step", help="training images/s: fp32 eager vs the engine's defaults")
    b.add_argument("--model", required=True)
    b.add_argument("--preset", default="scratch", help="the model's recipe to time (default scratch)")
    b.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 64 on CPU")
    b.add_argument("--size", type=int, default=None, help="default 500 on CUDA, 100 on CPU")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--device", default=None)
    b.set_defaults(func=_cmd_bench_train_step)


def _cmd_bench_all(args) -> int:
    from bonedist.bench.all import bench_all

    table = bench_all(quick=args.quick, verbose=args.verbose)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


def _cmd_bench_accuracy(args) -> int:
    from bonedist.bench.accuracy import bench_accuracy
    from bonedist.data.holdout import parse_holdout

    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    bench_accuracy(args.data, presets, size=args.size, budget=args.budget, models=parse_models(args.models),
                   out=args.out, pretrained=args.pretrained, wandb=args.wandb, workers=args.workers,
                   overrides=overrides, holdout=parse_holdout(args.holdout), holdout_seed=args.holdout_seed,
                   seeds=parse_seeds(args.seeds), shares=parse_shares(args.shares), replicas=args.replicas)
    return 0


def _cmd_bench_compare(args) -> int:
    from bonedist.bench.compare import bench_compare
    from bonedist.data.holdout import parse_holdout

    bench_compare(args.data, args.model, preset=args.preset, size=args.size, budget=args.budget,
                  seeds=parse_seeds(args.seeds), vary=args.vary, out=args.out, holdout=parse_holdout(args.holdout),
                  holdout_seed=args.holdout_seed, workers=args.workers)
    return 0


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` or ``--seeds 3`` (seeds 0, 1, 2); None when not given."""
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BonedistError(f"--seeds {text!r}: expected integers such as 0,1,2 (or a count)") from None
    return list(range(values[0])) if len(values) == 1 and "," not in text else values


def parse_shares(text: str | None) -> dict | None:
    """``--shares resnet18=2,xception=1`` → {"resnet18": 2.0, "xception": 1.0}."""
    if not text:
        return None
    shares = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            raise BonedistError(f"--shares {text!r}: expected MODEL=WEIGHT pairs such as resnet18=2,xception=1") \
                from None
        if not sep:
            raise BonedistError(f"--shares {text!r}: expected MODEL=WEIGHT pairs")
    return shares


def _cmd_bench_train_loop(args) -> int:
    from bonedist.bench.train_loop import bench_train_loop

    bench_train_loop(args.model, preset=args.preset, size=args.size, batch=args.batch, steps=args.steps,
                     device=args.device)
    return 0


def _cmd_bench_train_step(args) -> int:
    from bonedist.bench.train_step import bench_train_step

    bench_train_step(args.model, batch=args.batch, size=args.size, steps=args.steps, device=args.device,
                     preset=args.preset)
    return 0


def _cmd_bench_loader(args) -> int:
    from bonedist.bench.loader import bench_loader

    bench_loader(n=args.n, batch_size=args.batch, batches=args.batches, workers=args.workers, device=args.device)
    return 0


def _cmd_bench_predict(args) -> int:
    from bonedist.bench.predict import bench_predict

    bench_predict(args.runs, args.images, n=args.n, single=args.single, batch_size=args.batch, workers=args.workers)
    return 0


def _cmd_bench_augment(args) -> int:
    from bonedist.bench.loader import bench_augment

    bench_augment(batch_size=args.batch, size=args.size, repeats=args.repeats, device=args.device)
    return 0


def _cmd_bench_attention(args) -> int:
    from bonedist.bench.attention import bench_attention

    bench_attention(batch=args.batch, size=args.size, repeats=args.repeats, device=args.device)
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the models, one per line (for scripts)",
                       description="Print every registered model, one name per line, the paper's four first; with "
                                   "--details also its task, weights, presets and options.",
                       epilog="example: for m in $(bonedist models --preset scratch); do bonedist train --model $m "
                              "--preset scratch ...; done")
    p.add_argument("--details", action="store_true",
                   help="also the weights it takes, its branches, the presets it has a recipe for and its options")
    p.add_argument("--preset", default=None,
                   help="the preset's default model list (what `bench accuracy` and the launch scripts train; "
                        "--all: every model with a recipe for it)")
    p.add_argument("--all", action="store_true", help="with --preset: every model with a recipe for it")
    p.add_argument("--shares", action="store_true",
                   help="with --preset: each model's share of a benchmark's budget beside its name (per run, and "
                        "'xN' when it trains N runs of different seeds)")
    p.add_argument("--runs", action="store_true",
                   help="one line per training run, MODEL<TAB>RUN<TAB>SEED (what the launch scripts read): the "
                        "preset's default list with its seed replicas, or --models, each --replicas times")
    p.add_argument("--models", default=None, help="with --runs: these models (comma- or space-separated)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="with --runs: N runs of every model (RUN MODEL, MODEL-2, ...; seed SEED + 1000 k)")
    p.add_argument("--seed", type=int, default=0, help="with --runs: the first run's seed (default 0)")
    p.set_defaults(func=_cmd_models)


def _print_runs(args) -> int:
    """``bonedist models --runs``: each run a launch script trains, as MODEL, RUN (its folder) and SEED."""
    from bonedist.bench.accuracy import plan_jobs
    from bonedist.models import replica_run

    models = [m for m in (args.models or "").replace(",", " ").split() if m] or None
    for job in plan_jobs([args.preset or "paper"], models, replicas=args.replicas):
        run, seed = replica_run(job.model, job.replica, args.seed)
        print(f"{job.model}\t{run}\t{seed}")
    return 0


def _cmd_models(args) -> int:
    from bonedist.models import default_roster, list_models, model_info

    if args.runs:
        return _print_runs(args)

    names = {m: None for m in list_models()}
    if args.preset is not None:
        from bonedist.train.presets import preset_values

        preset_values(args.preset)  # an unknown preset is one line
        names = {m: None for m in list_models(args.preset)} if args.all else default_roster(args.preset)
    for name, entry in names.items():
        info = model_info(name)
        if not args.details:
            if args.shares and entry is not None:
                share, runs = entry
                print(f"{name}\t{share:g}" + (f" x{runs}" if runs > 1 else ""))
            else:
                print(name)
            continue
        branches = f"branches {', '.join(info.task.branches)}" if info.task.branches else "one prediction"
        print(f"{name}\t{'ImageNet backbone or scratch' if info.pretrained else 'from scratch'}\t{branches}\t"
              f"presets {','.join(info.presets)}\toptions {','.join(info.option_names) or '-'}")
    if args.details:
        print("timm/ARCH\tany timm architecture, on demand\tone prediction\tpresets improved,scratch,tiny")
    return 0


def parse_models(text: str | None) -> list[str] | None:
    """``--models a,b``; None (every registered model) when not given."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _add_weights(sub) -> None:
    p = sub.add_parser("weights", help="pretrained backbone weights for offline compute nodes")
    weights = p.add_subparsers(dest="weights", required=True, metavar="ACTION")
    f = weights.add_parser("fetch", help="download the three ImageNet backbones into DIR (needs internet)")
    f.add_argument("dir", type=Path)
    f.add_argument("--tags", nargs="*", default=None, help="timm tags (default: the paper's three backbones)")
    f.set_defaults(func=_cmd_weights_fetch)


def _cmd_weights_fetch(args) -> int:
    from bonedist.models.backbones import fetch_weights

    for file in fetch_weights(args.dir, args.tags):
        print(f"saved {file}")
    print(f"copy {args.dir} to the compute nodes and train with --pretrained {args.dir}")
    return 0


def _cmd_bench_pack(args) -> int:
    from bonedist.bench.pack import bench_pack

    bench_pack(args.root, n=args.n, source_size=args.source_size, size=args.size, workers=args.workers)
    return 0


# What each command does, for its --help, and one example of it.
HELP = {
    "synth": ("Write synthetic hand phantoms with a learnable bone-age signal, laid out like the official RSNA/Kaggle "
              "downloads: for trying the pipeline without the real data.", "bonedist synth data/phantoms --n 400"),
    "pack": ("Find every radiograph of an RSNA/Kaggle download (or a CSV of your own), check it, resize it and write "
             "WebDataset shards and a manifest. Bad files are skipped and listed; an interrupted pack resumes.",
             "bonedist pack /data/rsna --out shards/rsna --size 500"),
    "inspect": ("Summarise a pack, verify every shard's checksum and sample count, and draw a contact sheet.",
                "bonedist inspect shards/rsna --grid sheet.png --hand-mask"),
    "train": ("Train one model in this process (`accelerate launch -m bonedist.train ...` for several GPUs or "
              "nodes). Resumes from its last checkpoint; a signal saves and stops.",
              "bonedist train --model xception --shards shards/rsna --preset improved --pretrained weights/"),
    "evaluate": ("Every trained model of an experiment, its branches and three ensembles on one split, each "
                 "radiograph exactly once (also under `accelerate launch`): metrics, predictions and a report.",
                 "bonedist evaluate --runs runs/rsna --split test"),
    "predict": ("Bone age of radiographs with the trained ensemble, on a CPU if need be; each image gets its "
                "result or its error.", "bonedist predict hand.png --sex F --runs runs/rsna --chronological-age 10y3m"),
    "models": (None, None),
    "weights": ("Save the ImageNet backbones for compute nodes without internet.", "bonedist weights fetch weights/"),
    "study": ("The paper's studies, as commands.", "bonedist study patches --shards shards/rsna"),
    "demo": (None, None),
    "bench": ("Benchmarks: bonedist beside a baseline measured in the same run, with the ratio.",
              "bonedist bench all --out bench.md"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonedist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bonedist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_pack, _add_inspect, _add_train, _add_evaluate, _add_predict, _add_models,
                _add_weights, _add_sweep, _add_study, _add_demo, _add_bench):
        add(sub)
    for name, command in sub.choices.items():
        description, example = HELP.get(name, (None, None))
        if description:
            command.description = description
        if example:
            command.epilog = f"example: {example}"
        for action in command._actions:  # the subcommands of bench, study and weights
            if isinstance(action, argparse._SubParsersAction):
                for child, parser_ in action.choices.items():
                    example = SUB_EXAMPLES.get(f"{name} {child}")
                    parser_.description = parser_.description or next(
                        (a.help for a in action._choices_actions if a.dest == child), None)
                    if example:
                        parser_.epilog = f"example: {example}"
    return parser


SUB_EXAMPLES = {
    "weights fetch": "bonedist weights fetch /shared/weights",
    "study patches": "bonedist study patches --shards shards/rsna --settings 3x224,49x224 --preset improved",
    "bench pack": "bonedist bench pack /data/rsna --size 500",
    "bench attention": "bonedist bench attention --batch 32 --size 500",
    "bench loader": "bonedist bench loader --n 512 --workers 8",
    "bench augment": "bonedist bench augment --batch 32 --size 500",
    "bench all": "bonedist bench all --out bench.md",
    "bench accuracy": "bonedist bench accuracy --data /data/rsna --preset scratch --size 100 --budget 60 --seeds 2",
    "bench compare": "bonedist bench compare --data /data/rsna --model resnet18 --vary lr=1e-3,4e-3 --vary ema=0.999",
    "bench train-loop": "bonedist bench train-loop --model xception --preset improved --size 500 --batch 32",
    "bench train-step": "bonedist bench train-step --model xception --batch 32 --size 500",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

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
from bonedist.commands import (
    BenchAccuracyOptions,
    BenchAllOptions,
    BenchBatchOptions,
    BenchCompareOptions,
    BenchLoaderOptions,
    BenchPackOptions,
    BenchPredictOptions,
    BenchServeOptions,
    BenchTrainLoopOptions,
    BenchTrainStepOptions,
    DemoOptions,
    ExportOptions,
    InspectOptions,
    ModelsOptions,
    PredictOptions,
    ServeOptions,
    StudyPatchOptions,
    SynthOptions,
)
from bonedist.files import write_atomic
from bonedist.models.recipes import BackboneOptions
from bonedist.options import add_arguments, given


def _command(sub, name: str, cls, func, help: str, **kw) -> argparse.ArgumentParser:
    """A command whose flags are the fields of ``cls`` (defaults in the help, stated once in the field)."""
    p = sub.add_parser(name, help=help, **kw)
    add_arguments(p, cls, show_defaults=True)
    p.set_defaults(func=func)
    return p


def _options(args, cls, **fixed):
    """The command's options: the flags given, the fields' defaults for the rest."""
    return cls(**fixed, **given(args, cls))


def _add_synth(sub) -> None:
    p = _command(sub, "synth", SynthOptions, _cmd_synth,
                 "write synthetic hand phantoms in the official RSNA/Kaggle layouts")
    p.add_argument("out", type=Path, help="output folder")


def _cmd_synth(args) -> int:
    from bonedist.data.synth import synth_dataset

    o = _options(args, SynthOptions)
    counts = synth_dataset(args.out, n=o.n, n_val=o.n_val, n_test=o.n_test, seed=o.seed, size=o.size,
                           workers=o.workers)
    print(f"wrote {sum(counts.values())} phantoms ({', '.join(f'{k} {v}' for k, v in counts.items())}) to {args.out}")
    return 0


def _add_pack(sub) -> None:
    from bonedist.data.options import CSV, GenericCSV, PackOptions

    p = _command(sub, "pack", PackOptions, _cmd_pack, "pack radiographs in an official layout into WebDataset "
                                                       "shards")
    p.add_argument("root", type=Path, help="data root holding the official files")
    p.add_argument("--out", type=Path, default=None, help="output folder (default shards/<root name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(p.add_argument_group(CSV), GenericCSV, show_defaults=True)


def _cmd_pack(args) -> int:
    from bonedist.data.options import GenericCSV, PackOptions
    from bonedist.data.pack import pack_dataset

    options = _options(args, PackOptions, progress=not args.quiet)
    generic = _options(args, GenericCSV) if args.csv is not None else None
    out = args.out or Path("shards") / args.root.resolve().name
    _, code = pack_dataset(args.root, out, options, generic)
    return code


def _add_inspect(sub) -> None:
    p = _command(sub, "inspect", InspectOptions, _cmd_inspect,
                 "summarise a pack and verify every shard's checksum and count")
    p.add_argument("shards", type=Path)


def _cmd_inspect(args) -> int:
    from bonedist.data.manifest import load_manifest, summary_lines, verify_shards, write_grid

    o = _options(args, InspectOptions)
    manifest = load_manifest(args.shards)
    print("\n".join(summary_lines(args.shards, manifest)))
    problems = verify_shards(args.shards, manifest)
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"verified {n_shards - len(problems)}/{n_shards} shards (sha256 and sample count)")
    if o.grid:
        drawn = write_grid(args.shards, manifest, o.grid, split=o.split, n=o.n, hand_mask=o.hand_mask)
        print(f"wrote a contact sheet of {drawn} samples to {o.grid}")
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
    from bonedist.eval.options import EvalOptions

    p = sub.add_parser("evaluate", help="every trained model and the ensembles on a split, with a report",
                       description="Works in one process or under `accelerate launch -m bonedist evaluate ...`; "
                                   "every sample is predicted exactly once either way.")
    p.add_argument("--runs", required=True, help="runs/EXPERIMENT, holding MODEL/best/ folders")
    add_arguments(p, EvalOptions)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from bonedist.eval.evaluate import evaluate
    from bonedist.eval.options import EvalOptions

    result = evaluate(EvalOptions(runs=args.runs, **given(args, EvalOptions)))
    if result:
        for note in result["notes"]:
            print(f"note: {note}")
        for name, m in result["metrics"].items():
            print(f"{name:<24} MAE {m['mae_months']:6.2f} months  RMSE {m['rmse_months']:6.2f}  "
                  f"MSE(z) {m['mse_z']:.3f}")
    return 0


def _add_predict(sub) -> None:
    p = _command(sub, "predict", PredictOptions, _cmd_predict,
                 "bone age of radiographs (files, a folder or a worklist) with the ensemble")
    p.add_argument("images", nargs="*", help="PNG, JPEG or DICOM files, or one folder of them")


def _cmd_predict(args) -> int:
    import json

    from bonedist.eval.predict import format_result, parse_age, parse_sex, predict_images

    o = _options(args, PredictOptions)
    if o.bundle:
        return _predict_bundle(args.images, o)
    if o.heatmap:
        if not args.images or o.table or not o.sex:
            raise BonedistError("--heatmap draws single images: give image files and --sex")
        rows = predict_images(args.images, o.sex, o.runs, o.chronological_age, o.heatmap, o.max_pixels, o.coverage)
    else:
        rows, out = _predict_work(args.images, o, parse_sex, parse_age)
        if out is not None:
            print(f"wrote {out[0]} and {out[1]}: {sum('error' not in r for r in rows)} of {len(rows)} radiographs "
                  f"predicted")
    failed = [r for r in rows if "error" in r]
    if not _process_state().is_main_process:  # under `accelerate launch`: rank 0 speaks for all the rows
        return 1 if failed else 0
    if o.json:
        print(json.dumps(rows, indent=1))
    elif not o.out and len(rows) <= 50:
        good = [format_result(r) for r in rows if "error" not in r]
        if good:
            print("\n".join(good))
    for row in failed[:20]:
        print(f"bonedist predict: error: {row['error']}", file=sys.stderr)
    if failed:
        print(f"bonedist predict: {len(failed)} of {len(rows)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _predict_bundle(images: list[str], o: PredictOptions) -> int:
    """``predict --bundle``: the exported ensemble on onnxruntime (no torch imported)."""
    import json

    from bonedist.eval.predict import format_result
    from bonedist.serving.bundle import Bundle, predict_files

    if o.table or o.heatmap:
        raise BonedistError("--bundle predicts image files or a folder; --table and --heatmap need --runs")
    rows = predict_files(Bundle(o.bundle, o.coverage), images, o.sex, o.chronological_age, o.max_pixels,
                         o.batch_size)
    failed = [r for r in rows if "error" in r]
    if o.out:
        from bonedist.eval.worklist import write_results

        written = write_results([{**r, "index": i} for i, r in enumerate(rows)], Path(o.out))
        print(f"wrote {written[0]} and {written[1]}: {len(rows) - len(failed)} of {len(rows)} radiographs predicted")
    elif o.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n".join(format_result(r) for r in rows if "error" not in r))
    for row in failed[:20]:
        print(f"bonedist predict: error: {row['error']}", file=sys.stderr)
    if failed:
        print(f"bonedist predict: {len(failed)} of {len(rows)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _add_export(sub) -> None:
    p = _command(sub, "export", ExportOptions, _cmd_export,
                 "an evaluated runs folder as a bundle: ONNX members, weights, intervals, model card")
    p.add_argument("runs", help="runs/EXPERIMENT with trained (and evaluated) models")


def _cmd_export(args) -> int:
    from bonedist.serving.bundle import Bundle
    from bonedist.serving.export import export_bundle

    o = _options(args, ExportOptions)
    description = export_bundle(args.runs, o.out, overwrite=o.overwrite)
    Bundle(o.out)  # read back as a user's service will: checksums, fields, onnxruntime sessions
    cal = description["intervals"]
    print(f"wrote {o.out}: {len(description['members'])} member(s) "
          f"({', '.join(m['name'] for m in description['members'])}), {description['ensemble']['source']} weights, "
          f"intervals {cal['method'] if cal else 'none (evaluate the runs first)'}; MODEL_CARD.md inside")
    return 0


def _add_serve(sub) -> None:
    p = _command(sub, "serve", ServeOptions, _cmd_serve,
                 "an exported bundle behind an HTTP API (FastAPI + uvicorn)")
    p.add_argument("bundle", nargs="?", help="the bundle folder (bonedist export)")


def _cmd_serve(args) -> int:
    import os

    from bonedist.serving.service import ServeSettings, openapi_text, serve

    o = _options(args, ServeOptions)
    if o.write_openapi:
        write_atomic(o.write_openapi, openapi_text())
        print(f"wrote {o.write_openapi}")
        return 0
    if not args.bundle:
        raise BonedistError("give the bundle folder: bonedist serve BUNDLE")
    token = os.environ.get("BONEDIST_TOKEN") or None
    if o.token_file:
        try:
            token = Path(o.token_file).read_text().strip()
        except OSError as exc:
            raise BonedistError(f"--token-file {o.token_file}: cannot read it ({exc.strerror})") from None
        if not token:
            raise BonedistError(f"--token-file {o.token_file}: the file is empty")
    settings = ServeSettings(int(o.max_upload_mb * 2**20), o.max_pixels, o.max_files, o.timeout, o.max_batch,
                             o.batch_wait_ms, token)
    serve(args.bundle, o.host, o.port, settings, o.coverage, o.threads, o.log_level)
    return 0


def _process_state():
    """This process's place under `accelerate launch` (gloo on a machine without CUDA, as training does)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _predict_work(images: list[str], o: PredictOptions, parse_sex, parse_age):
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

    if o.table is not None:
        if images:
            raise BonedistError("give either --table or images, not both")
        items = read_worklist(Path(o.table), Path(o.image_dir) if o.image_dir else None, o.allow_outside_image_dir)
        default_out = Path("predictions.csv")
    elif len(images) == 1 and Path(images[0]).is_dir():
        items, default_out = folder_items(Path(images[0])), Path("predictions.csv")
        if not items:
            raise BonedistError(f"{images[0]}: no PNG, JPEG or DICOM files in it")
    elif images:
        items, default_out = [WorkItem(i, Path(p), label=p) for i, p in enumerate(images)], None
    else:
        raise BonedistError("nothing to predict: give image files, a folder, or --table worklist.csv")
    state = _process_state()
    ensemble = Ensemble(o.runs, o.coverage, state.device)
    default_male = parse_sex(o.sex) if o.sex else None
    chrono = parse_age(o.chronological_age) if o.chronological_age else None
    workers = o.workers if len(items) >= 8 else 0  # starting decoder processes costs more than a few images
    rows = predict_worklist(items, ensemble, o.batch_size, workers, o.max_pixels, default_male, chrono,
                            state.process_index, state.num_processes, show_progress=len(items) > 50)
    rows = gather_rows(rows, state.num_processes)
    target = Path(o.out) if o.out else default_out
    if target is None or not state.is_main_process:
        return [{k: v for k, v in r.items() if k != "index"} for r in rows], None
    return [{k: v for k, v in r.items() if k != "index"} for r in rows], write_results(rows, target)


def _add_sweep(sub) -> None:
    from bonedist.sweep import SweepOptions

    p = sub.add_parser("sweep", help="search training settings with Optuna: trials are training runs, workers pull "
                                     "them (locally or a Slurm array), bad ones are pruned")
    p.add_argument("--space", required=True, help="the search space (YAML: base, params, sampler, pruner)")
    add_arguments(p, SweepOptions)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from bonedist.sweep import SweepOptions, run_sweep

    return run_sweep(SweepOptions(space=args.space, **given(args, SweepOptions)))


STUDY_OVERRIDES = ("steps_per_epoch", "batch_size", "lr", "clip_grad", "data_mode", "precision")  # TrainConfig fields


def _add_study(sub) -> None:
    from bonedist.spec import InputConfig
    from bonedist.train.config import TrainConfig

    p = sub.add_parser("study", help="studies from the paper, as commands")
    study = p.add_subparsers(dest="study", required=True)
    s = _command(study, "patches", StudyPatchOptions, _cmd_study,
                 "Table 5 / Fig. 6: ResNet50-patch for each (patches, size), loss curves")
    s.add_argument("--shards", required=True, help="a folder written by `bonedist pack`")
    training = s.add_argument_group("training of every setting (default: the preset's)")
    add_arguments(training, TrainConfig, where=lambda f: f.name in STUDY_OVERRIDES)
    add_arguments(training, InputConfig, where=lambda f: f.name == "image_size")
    add_arguments(training, BackboneOptions, where=lambda f: f.name == "pretrained")


def _cmd_study(args) -> int:
    from bonedist.study import StudyOptions, parse_settings, study_patches

    o = _options(args, StudyPatchOptions, shards=args.shards)
    overrides = {k: getattr(args, k) for k in STUDY_OVERRIDES if getattr(args, k) is not None}
    if args.image_size is not None:
        overrides["input"] = {"image_size": args.image_size}
    if args.pretrained is not None:
        overrides["model_options"] = {"pretrained": args.pretrained}
    study_patches(StudyOptions(shards=o.shards, settings=parse_settings(o.settings), preset=o.preset,
                               experiment=o.experiment, runs_dir=o.runs_dir, epochs=o.epochs, overrides=overrides,
                               wandb=o.wandb))
    return 0


def _add_demo(sub) -> None:
    _command(sub, "demo", DemoOptions, _cmd_demo, "the whole pipeline on synthetic phantoms in a few minutes",
             description="Synthesise hand phantoms, pack them, train every model with accelerate launch (2 CPU "
                         "processes, or the machine's GPUs), evaluate them and the ensembles, and print the headline "
                         "numbers and where the report is.")


def _cmd_demo(args) -> int:
    from bonedist.demo import DEMO_BUDGET_MIN, run_demo

    o = _options(args, DemoOptions)
    run_demo(o.out, n=o.n, budget=o.budget or DEMO_BUDGET_MIN, models=parse_models(o.models), seed=o.seed,
             keep=o.keep)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: bonedist vs a baseline measured in the same run")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = _command(bench, "pack", BenchPackOptions, _cmd_bench_pack,
                 "packing images/s vs a single-process PIL resize-and-save loop")
    b.add_argument("root", type=Path, nargs="?", default=None,
                   help="data root in an official layout (default: synthesise phantoms in a temporary folder)")
    _command(bench, "attention", BenchBatchOptions, _cmd_bench_attention,
             "AG-CNN attention crops/s: Kornia batched vs the per-image OpenCV loop")
    _command(bench, "loader", BenchLoaderOptions, _cmd_bench_loader,
             "augmented device-ready batches/s: stream and cache vs PIL + torchvision")
    _command(bench, "augment", BenchBatchOptions, _cmd_bench_augment,
             "Kornia batch augmentation vs torchvision v2 per image, same device")
    _command(bench, "all", BenchAllOptions, _cmd_bench_all, "every benchmark into one markdown table")
    b = _command(bench, "accuracy", BenchAccuracyOptions, _cmd_bench_accuracy,
                 "pack a folder, train presets within a time budget, MAE per model/ensemble")
    b.add_argument("--data", required=True, type=Path, help="radiographs in an official RSNA/Kaggle layout")
    b = _command(bench, "compare", BenchCompareOptions, _cmd_bench_compare,
                 "controlled comparisons of training settings, several seeds, on the validation split")
    b.add_argument("--data", required=True, type=Path, help="radiographs in an official RSNA/Kaggle layout")
    b.add_argument("--model", required=True, help="a model of `bonedist models`")
    b.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a setting to compare with the baseline, one value at a time (repeatable): a TrainConfig "
                        "field (lr, batch_size, ema, loss, balanced, warmup_epochs, ...), input.FIELD, model.FIELD, "
                        "or augment=FACTOR (the preset's augmentation ranges times FACTOR; 0: none)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="a setting of every run, the baseline's included (repeatable; the keys of --vary), e.g. "
                        "--set tta_rotate=5 to report each run's validation MAE with test-time views too")
    b = _command(bench, "train-loop", BenchTrainLoopOptions, _cmd_bench_train_loop,
                 "the engine's training loop beside the bare model step, by phase")
    b.add_argument("--model", required=True, help="a model of `bonedist models`")
    b = _command(bench, "serve", BenchServeOptions, _cmd_bench_serve,
                 "the HTTP service's radiographs/s and latency beside bonedist predict, onnxruntime beside torch")
    b.add_argument("bundle", help="an exported bundle (bonedist export)")
    b = _command(bench, "predict", BenchPredictOptions, _cmd_bench_predict,
                 "radiographs/s: a worklist in one predict call vs one call per image")
    b.add_argument("--runs", required=True, help="runs/EXPERIMENT with trained models")
    b = _command(bench, "train-step", BenchTrainStepOptions, _cmd_bench_train_step,
                 "training images/s: fp32 eager vs the engine's defaults")
    b.add_argument("--model", required=True, help="a model of `bonedist models`")


def _cmd_bench_all(args) -> int:
    from bonedist.bench.all import bench_all

    o = _options(args, BenchAllOptions)
    table = bench_all(quick=o.quick, verbose=o.verbose)
    print(table)
    if o.out:
        write_atomic(Path(o.out), table + "\n")
    return 0


def _cmd_bench_accuracy(args) -> int:
    from bonedist.bench.accuracy import bench_accuracy

    o = _options(args, BenchAccuracyOptions, data=str(args.data))
    presets = [p.strip() for p in o.preset.split(",") if p.strip()]
    overrides = {"batch_size": o.batch_size} if o.batch_size else {}
    bench_accuracy(args.data, presets, size=o.image_size, budget=o.budget, models=parse_models(o.models),
                   out=Path(o.out), pretrained=o.pretrained, wandb=o.wandb, workers=o.workers, overrides=overrides,
                   holdout=o.holdout, holdout_seed=o.holdout_seed, seeds=parse_seeds(o.seeds),
                   shares=parse_shares(o.shares), replicas=o.replicas, single=o.single,
                   student=o.student, student_share=o.student_share)
    return 0


def _cmd_bench_compare(args) -> int:
    from bonedist.bench.compare import bench_compare, parse_shared

    o = _options(args, BenchCompareOptions, data=str(args.data), model=args.model)
    bench_compare(args.data, o.model, preset=o.preset, size=o.image_size, budget=o.budget, seeds=parse_seeds(o.seeds),
                  vary=args.vary, out=Path(o.out), holdout=o.holdout, holdout_seed=o.holdout_seed, workers=o.workers,
                  prepare_only=o.prepare_only, overrides=parse_shared(args.set_))
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

    o = _options(args, BenchTrainLoopOptions, model=args.model)
    bench_train_loop(o.model, preset=o.preset, size=o.image_size, batch=o.batch_size, steps=o.steps, device=o.device)
    return 0


def _cmd_bench_train_step(args) -> int:
    from bonedist.bench.train_step import bench_train_step

    o = _options(args, BenchTrainStepOptions, model=args.model)
    bench_train_step(o.model, batch=o.batch_size, size=o.image_size, steps=o.steps, device=o.device, preset=o.preset,
                     compile_model=o.compile)
    return 0


def _cmd_bench_loader(args) -> int:
    from bonedist.bench.loader import bench_loader

    o = _options(args, BenchLoaderOptions)
    bench_loader(n=o.n, batch_size=o.batch_size, batches=o.batches, workers=o.workers, device=o.device)
    return 0


def _cmd_bench_serve(args) -> int:
    from bonedist.bench.serve import bench_serve

    o = _options(args, BenchServeOptions, bundle=args.bundle)
    bench_serve(o)
    return 0


def _cmd_bench_predict(args) -> int:
    from bonedist.bench.predict import bench_predict

    o = _options(args, BenchPredictOptions, runs=args.runs)
    bench_predict(o.runs, o.images, n=o.n, single=o.single, batch_size=o.batch_size, workers=o.workers)
    return 0


def _cmd_bench_augment(args) -> int:
    from bonedist.bench.loader import bench_augment

    o = _options(args, BenchBatchOptions)
    bench_augment(batch_size=o.batch_size, size=o.image_size, repeats=o.repeats, device=o.device)
    return 0


def _cmd_bench_attention(args) -> int:
    from bonedist.bench.attention import bench_attention

    o = _options(args, BenchBatchOptions)
    bench_attention(batch=o.batch_size, size=o.image_size, repeats=o.repeats, device=o.device)
    return 0


def _add_models(sub) -> None:
    _command(sub, "models", ModelsOptions, _cmd_models, "list the models, one per line (for scripts)",
             description="Print every registered model, one name per line, the paper's four first; with --details "
                         "also its task, weights, presets and options.",
             epilog="example: for m in $(bonedist models --preset scratch); do bonedist train --model $m --preset "
                    "scratch ...; done")


def _print_runs(o: ModelsOptions) -> int:
    """``bonedist models --runs``: each run a launch script trains, as MODEL, RUN (its folder) and SEED."""
    from bonedist.bench.accuracy import plan_jobs
    from bonedist.models import replica_run

    models = [m for m in (o.models or "").replace(",", " ").split() if m] or None
    for job in plan_jobs([o.preset or "paper"], models, replicas=o.replicas):
        run, seed = replica_run(job.model, job.replica, o.seed)
        print(f"{job.model}\t{run}\t{seed}")
    return 0


def _cmd_models(args) -> int:
    from bonedist.models import default_roster, list_models, model_info

    o = _options(args, ModelsOptions)
    if o.runs:
        return _print_runs(o)

    names = {m: None for m in list_models()}
    if o.preset is not None:
        from bonedist.train.presets import preset_values

        preset_values(o.preset)  # an unknown preset is one line
        names = {m: None for m in list_models(o.preset)} if o.all else default_roster(o.preset)
    for name, entry in names.items():
        info = model_info(name)
        if not o.details:
            if o.shares and entry is not None:
                share, runs = entry
                print(f"{name}\t{share:g}" + (f" x{runs}" if runs > 1 else ""))
            else:
                print(name)
            continue
        branches = f"branches {', '.join(info.task.branches)}" if info.task.branches else "one prediction"
        print(f"{name}\t{'ImageNet backbone or scratch' if info.pretrained else 'from scratch'}\t{branches}\t"
              f"presets {','.join(info.presets)}\toptions {','.join(info.option_names) or '-'}")
    if o.details:
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

    o = _options(args, BenchPackOptions)
    bench_pack(args.root, n=o.n, source_size=o.source_size, size=o.image_size, workers=o.workers)
    return 0


# What each command does, for its --help, and one example of it.
HELP = {
    "synth": ("Write synthetic hand phantoms with a learnable bone-age signal, laid out like the official RSNA/Kaggle "
              "downloads: for trying the pipeline without the real data.", "bonedist synth data/phantoms --n 400"),
    "pack": ("Find every radiograph of an RSNA/Kaggle download (or a CSV of your own), check it, resize it and write "
             "WebDataset shards and a manifest. Bad files are skipped and listed; an interrupted pack resumes.",
             "bonedist pack /data/rsna --out shards/rsna --image-size 500"),
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
    "export": ("An evaluated runs folder as a self-contained bundle: each model in ONNX, its input specification, "
               "the ensemble weights, the interval calibration, a model card and checksums. Predicting from it needs "
               "numpy, OpenCV, onnxruntime and pydicom only.", "bonedist export runs/rsna --out bundles/rsna"),
    "serve": ("Serve a bundle over HTTP: POST /v1/predictions with a PNG, JPEG or DICOM radiograph; problem-details "
              "errors, bounded requests, batching, optional bearer token.",
              "bonedist serve bundles/rsna --host 0.0.0.0 --port 8000 --token-file token.txt"),
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
    for add in (_add_synth, _add_pack, _add_inspect, _add_train, _add_evaluate, _add_predict, _add_export, _add_serve,
                _add_models,
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
    "bench pack": "bonedist bench pack /data/rsna --image-size 500",
    "bench attention": "bonedist bench attention --batch-size 32 --image-size 500",
    "bench loader": "bonedist bench loader --n 512 --workers 8",
    "bench augment": "bonedist bench augment --batch-size 32 --image-size 500",
    "bench all": "bonedist bench all --out bench.md",
    "bench accuracy": "bonedist bench accuracy --data /data/rsna --preset scratch --image-size 100 --budget 60 "
                      "--seeds 2",
    "bench compare": "bonedist bench compare --data /data/rsna --model resnet18 --vary lr=1e-3,4e-3 --vary ema=0.999",
    "bench train-loop": "bonedist bench train-loop --model xception --preset improved --image-size 500 --batch-size 32",
    "bench serve": "bonedist bench serve bundles/rsna --runs runs/rsna --clients 1,8,32",
    "bench train-step": "bonedist bench train-step --model xception --batch-size 32 --image-size 500",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

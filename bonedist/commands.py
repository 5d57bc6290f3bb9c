"""The options of the commands that are not a training or an evaluation, as typed fields: their flags, help and
defaults are generated from these (``bonedist.options.add_arguments``), each default stated once, one spelling per
idea across commands (``--batch-size``, ``--image-size``; earlier spellings are deprecated aliases). Light on
purpose: building the CLI imports no torch.

Options that configure a library type are that type: packing is ``PackOptions`` and ``GenericCSV``
(``bonedist.data.options``), training ``TrainConfig``, evaluation ``EvalOptions``, a sweep ``SweepOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bonedist.choices import WANDB_MODES
from bonedist.data.options import MAX_PIXELS, parse_holdout, parse_pixels
from bonedist.options import check_fields, option

BATCH = ("--batch",)  # earlier spellings of --batch-size
SIZE = ("--size",)  # earlier spellings of --image-size
DEVICE = "cuda or cpu (default: cuda when available)"


class Checked:
    """Bounds and choices checked on construction, naming the flag."""

    def __post_init__(self):
        check_fields(self)


@dataclass
class SynthOptions(Checked):
    n: int = option(400, "training images", minimum=1)
    n_val: int | None = option(None, "validation images (default n/4)", minimum=1)
    n_test: int | None = option(None, "test images (default n/4)", minimum=1)
    seed: int = option(0, "seed of the phantoms")
    size: int = option(512, "image height in pixels", flag="--image-size", aliases=SIZE, minimum=32)
    workers: int = option(0, "processes (0: all cores)", minimum=0)


@dataclass
class InspectOptions(Checked):
    grid: str | None = option(None, "write a labelled contact sheet PNG here")
    split: str | None = option(None, "split for the contact sheet (default: all)")
    n: int = option(24, "images in the contact sheet", minimum=1)
    hand_mask: bool = option(False, "show the hand mask (what the improved presets keep)")


@dataclass
class PredictOptions(Checked):
    table: str | None = option(None, "a worklist CSV: an image (path or id) column, sex, optionally "
                                     "chronological_age")
    image_dir: str | None = option(None, "where the table's images are (default: its folder)")
    allow_outside_image_dir: bool = option(False, "read table paths that lead outside --image-dir (refused per row "
                                                  "by default)")
    sex: str | None = option(None, "F or M, for images without one (table or DICOM header)")
    runs: str = option("runs/default", "runs/EXPERIMENT with trained models")
    chronological_age: str | None = option(None, "e.g. 10y3m, 123m: also print the difference")
    coverage: float = option(0.9, "of the prediction interval", minimum=0.05, maximum=0.99)
    out: str | None = option(None, "write one CSV row per image here and the same rows as JSON beside it (default "
                                   "for a table or folder: predictions.csv)")
    json: bool = option(False, "machine-readable output on stdout")
    heatmap: str | None = option(None, "PNG with the AG-CNN attention box and mask (single images)")
    bundle: str | None = option(None, "predict with an exported bundle (bonedist export) instead of --runs: needs "
                                      "numpy, OpenCV, onnxruntime and pydicom only, no torch")
    batch_size: int = option(32, "radiographs per batch", minimum=1)
    workers: int = option(2, "decoding processes", minimum=0)
    max_pixels: int = option(MAX_PIXELS, "refuse images whose header declares more pixels than this", minimum=1,
                             parse=parse_pixels)


@dataclass
class ModelsOptions(Checked):
    details: bool = option(False, "also the weights it takes, its branches, the presets it has a recipe for and its "
                                  "options")
    preset: str | None = option(None, "the preset's default model list (what `bench accuracy` and the launch scripts "
                                      "train; --all: every model with a recipe for it)")
    all: bool = option(False, "with --preset: every model with a recipe for it")
    shares: bool = option(False, "with --preset: each model's share of a benchmark's budget beside its name (per "
                                 "run, and 'xN' when it trains N runs of different seeds)")
    runs: bool = option(False, "one line per training run, MODEL<TAB>RUN<TAB>SEED (what the launch scripts read): the "
                               "preset's default list with its seed replicas, or --models, each --replicas times")
    models: str | None = option(None, "with --runs: these models (comma- or space-separated)")
    replicas: int | None = option(None, "with --runs: N runs of every model (RUN MODEL, MODEL-2, ...; seed SEED + "
                                        "1000 k)", minimum=1, metavar="N")
    seed: int = option(0, "with --runs: the first run's seed")


@dataclass
class DemoOptions(Checked):
    out: str = option("runs/demo", "output folder")
    n: int = option(400, "training phantoms (validation and test: n/5 each)", minimum=10)
    budget: float | None = option(None, "training minutes for all models together (default 2.0: about 3 minutes in "
                                        "all)", minimum=0.05)
    models: str | None = option(None, "comma-separated (default: every model, `bonedist models`)")
    seed: int = option(0, "seed of the phantoms and the trainings")
    keep: bool = option(False, "keep the phantoms, full-precision weights and resumable checkpoints (a few GB)")


@dataclass
class StudyPatchOptions(Checked):
    shards: str = option("", "a folder written by `bonedist pack`", cli=False)
    settings: str = option("1x500,3x224,9x128,36x64,150x32", "PATCHESxSIZE list (default: the paper's Table 5)")
    preset: str = option("paper", "starting values of every setting's training")
    experiment: str = option("patch-study", "runs/EXPERIMENT/patches-KxP/ and study-patches/")
    runs_dir: str = option("runs", "where run folders go")
    epochs: int = option(1, "epochs per setting (the paper: one)", minimum=1)
    wandb: str = option("auto", "W&B: auto is offline without an API key or network", WANDB_MODES)


# -- benchmarks ---------------------------------------------------------------------------------------------------


@dataclass
class BenchPackOptions(Checked):
    n: int = option(240, "phantoms to synthesise when no ROOT is given", minimum=1)
    source_size: int = option(1600, "phantom height in pixels (real originals ~1500-2100)", minimum=32)
    image_size: int = option(500, "packed side in pixels", aliases=SIZE, minimum=32)
    workers: int = option(0, "processes (0: all cores)", minimum=0)


@dataclass
class BenchBatchOptions(Checked):
    """A component timed on batches of one size (``bench attention``, ``bench augment``)."""

    batch_size: int = option(32, "radiographs per batch", aliases=BATCH, minimum=1)
    image_size: int = option(500, "radiograph side in pixels", aliases=SIZE, minimum=32)
    repeats: int = option(5, "timed repeats", minimum=1)
    device: str | None = option(None, DEVICE)


@dataclass
class BenchLoaderOptions(Checked):
    n: int = option(256, "phantoms to prepare", minimum=8)
    batch_size: int = option(32, "radiographs per batch", aliases=BATCH, minimum=1)
    batches: int = option(12, "timed batches per method", minimum=1)
    workers: int = option(0, "DataLoader workers for every method (0: the cores)", minimum=0)
    device: str | None = option(None, DEVICE)


@dataclass
class BenchAllOptions(Checked):
    quick: bool | None = option(None, "small sizes (default on a CPU-only machine)")
    out: str | None = option(None, "also write the table to this file")
    verbose: bool = option(False, "show each benchmark's own output")


HOLDOUT = "carve the splits the data lacks from its training table (as `pack --holdout`)"


@dataclass
class BenchAccuracyOptions(Checked):
    data: str = option("", "radiographs in an official RSNA/Kaggle layout", cli=False)
    preset: str = option("improved", "a preset, or several comma-separated (e.g. paper,improved)")
    image_size: int | None = option(None, "pack and train at this side (default: the preset's, 500)", aliases=SIZE,
                                    minimum=32)
    budget: float = option(60.0, "training minutes for all runs together", minimum=0.01)
    models: str | None = option(None, "comma-separated, the same in every preset (default: each preset's default "
                                      "model list with its budget shares, `bonedist models --preset P --shares`)")
    out: str = option("runs/bench-accuracy", "output folder")
    pretrained: str | None = option(None, "backbone weights (none, a file or a weights folder)")
    batch_size: int | None = option(None, "radiographs per step (default: each recipe's)", aliases=BATCH, minimum=1)
    workers: int = option(0, "packing processes (0: all cores)", minimum=0)
    wandb: str = option("off", "W&B mode of every training", WANDB_MODES)
    holdout: dict = option({}, HOLDOUT, parse=parse_holdout, metavar="validation:N[,test:M]")
    holdout_seed: int = option(0, "which radiographs --holdout picks")
    seeds: str | None = option(None, "repeat the whole benchmark (training and evaluation) once per seed; rows as "
                                     "mean ± sd. A number N means seeds 0..N-1", metavar="S1,S2,...")
    shares: str | None = option(None, "each model's relative share of the budget, per run (default: the preset's "
                                      "shares for its default list, equal shares for --models)", metavar="MODEL=W,...")
    replicas: int | None = option(None, "train every model N times, each run another seed (MODEL, MODEL-2, ...; "
                                        "seed + 1000 k) and a separate ensemble member (default: the preset's for its "
                                        "default list, else 1)", minimum=1, metavar="N")
    single: str = option("auto", "also train one model with the whole budget, alone, as the row the runs sharing it "
                                 "must beat: auto (the list's first model, when the list has several runs), a "
                                 "model, or off", metavar="auto|MODEL|off")
    student: str | None = option(None, "also distil inside the budget: the runs train in 1 - --student-share of it, "
                                       "predict the training split, and this model learns from their predictions "
                                       "beside the labels in the rest (the row MODEL (student); one preset)",
                                 metavar="MODEL")
    student_share: float = option(0.5, "the student's share of the budget", minimum=0.01, maximum=0.99)


@dataclass
class BenchCompareOptions(Checked):
    data: str = option("", "radiographs in an official RSNA/Kaggle layout", cli=False)
    model: str = option("", "the model compared", cli=False)
    preset: str = option("scratch", "the recipe every setting starts from")
    image_size: int = option(100, "pack and train at this side", aliases=SIZE, minimum=32)
    budget: float = option(5.0, "training minutes of every run", minimum=0.01)
    seeds: str = option("0,1", "seeds of every setting", metavar="S1,S2,...")
    out: str = option("runs/compare", "output folder")
    holdout: dict = option({}, HOLDOUT, parse=parse_holdout, metavar="validation:N[,test:M]")
    holdout_seed: int = option(0, "which radiographs --holdout picks")
    workers: int = option(0, "packing processes (0: all cores)", minimum=0)
    prepare_only: bool = option(False, "pack and write OUT/space.yaml, then stop: run its grid elsewhere (a Slurm "
                                       "array of launch/slurm/sweep.sbatch), then this command again to tabulate it")


@dataclass
class BenchTrainLoopOptions(Checked):
    model: str = option("", "the model timed", cli=False)
    preset: str = option("improved", "the model's recipe to time")
    image_size: int | None = option(None, "radiograph side (default 500 on CUDA, 96 on CPU)", aliases=SIZE,
                                    minimum=32)
    batch_size: int | None = option(None, "radiographs per step (default 32 on CUDA, 8 on CPU)", aliases=BATCH,
                                    minimum=1)
    steps: int = option(30, "timed steps (after 3 warm-up steps)", minimum=1)
    device: str | None = option(None, "cpu to force the CPU")


@dataclass
class BenchPredictOptions(Checked):
    runs: str = option("", "runs/EXPERIMENT with trained models", cli=False)
    images: str | None = option(None, "a folder of PNG, JPEG or DICOM files (default: the real sample radiographs "
                                      "next to the repository, else phantoms)")
    n: int = option(1000, "worklist rows (the images cycled)", minimum=1)
    single: int = option(20, "one-image calls timed", minimum=1)
    batch_size: int = option(32, "radiographs per batch", aliases=BATCH, minimum=1)
    workers: int = option(2, "decoding processes of the worklist", minimum=0)


@dataclass
class BenchTrainStepOptions(Checked):
    model: str = option("", "the model timed", cli=False)
    preset: str = option("scratch", "the model's recipe to time")
    batch_size: int | None = option(None, "radiographs per step (default 32 on CUDA, 64 on CPU)", aliases=BATCH,
                                    minimum=1)
    image_size: int | None = option(None, "radiograph side (default 500 on CUDA, 100 on CPU)", aliases=SIZE,
                                    minimum=32)
    steps: int = option(10, "timed steps", minimum=1)
    device: str | None = option(None, DEVICE)
    compile: str = option("auto", "also time the defaults under torch.compile (train --compile): auto (on CUDA), on, "
                                  "off", choices=("auto", "on", "off"))


@dataclass
class ExportOptions(Checked):
    out: str = option("bundle", "the bundle folder to write (refused if it exists, unless --overwrite)")
    overwrite: bool = option(False, "replace an existing --out folder")


@dataclass
class ServeOptions(Checked):
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface, as in a container)")
    port: int = option(8000, "TCP port", minimum=1, maximum=65535)
    coverage: float = option(0.9, "of the prediction intervals", minimum=0.05, maximum=0.99)
    token_file: str | None = option(None, "a file holding the bearer token every /v1 call must send (default: the "
                                          "BONEDIST_TOKEN environment variable; neither: no token)")
    max_upload_mb: float = option(64.0, "largest request accepted, in MiB", minimum=0.001)
    max_pixels: int = option(MAX_PIXELS, "refuse images whose header declares more pixels than this", minimum=1,
                             parse=parse_pixels)
    max_files: int = option(32, "files per batch request", minimum=1)
    max_batch: int = option(16, "radiographs run through the model together", minimum=1)
    batch_wait_ms: float = option(5.0, "how long the first queued radiograph waits for others", minimum=0)
    timeout: float = option(60.0, "seconds a request may wait for the model before a 503", minimum=0.1)
    threads: int | None = option(None, "onnxruntime threads (default: every core)", minimum=1)
    log_level: str = option("info", "log level", ("debug", "info", "warning", "error"))
    write_openapi: str | None = option(None, "write the API description (OpenAPI JSON) to this file and exit")


@dataclass
class BenchServeOptions(Checked):
    bundle: str = option("", "an exported bundle", cli=False)
    runs: str | None = option(None, "the runs folder it was exported from (default: the bundle's own record), for "
                                    "the bonedist predict and torch rows")
    images: str | None = option(None, "a folder of PNG, JPEG or DICOM files (default: the real sample radiographs "
                                      "next to the repository)")
    requests: int = option(200, "requests per concurrency level", minimum=1)
    clients: str = option("1,8,32", "concurrency levels (comma-separated)")
    single: int = option(5, "bonedist predict calls timed, one image each", minimum=1)
    batch_size: int = option(32, "radiographs in the onnxruntime-vs-torch batch", minimum=1)

"""The names that choice-valued options accept, in one module that imports nothing heavy: the CLI and the typed
configurations read them without importing torch (``bonedist --help`` answers at once). The behaviour behind each
name lives in its home module, which takes the names from here and checks that it implements every one.
"""

DATA_MODES = ("auto", "stream", "cache")  # bonedist.data.source
WANDB_MODES = ("auto", "online", "offline", "off")  # bonedist.tracking
PATCH_AGGREGATES = ("mean", "median")  # bonedist.inference
CALIBRATIONS = ("offset", "linear")  # bonedist.train.validation
SCHEDULES = ("plateau", "cosine", "constant")  # bonedist.train.schedule
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # bonedist.train.precision
OPTIMIZERS = ("adam", "adamw")  # bonedist.train.optim
LOSSES = ("mse", "l1", "huber")  # bonedist.train.losses: one Loss class each

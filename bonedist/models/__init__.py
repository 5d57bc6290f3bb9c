"""The bone-age models behind one registry: one file per model (its options, recipes and factory).

    from bonedist.models import create_model, list_models
    model = create_model("xception", inputs={"image_size": 256}, pretrained="weights/", freeze_backbone=True)
    out = model(images, male)   # out["pred"]: (B,) z units; model.spec: what the data side prepares
"""

# registration order is the order of every table and script: the paper's four models, then the modern ones
from bonedist.models import inception_v3 as _inception_v3  # noqa: F401, I001
from bonedist.models import xception as _xception  # noqa: F401
from bonedist.models import resnet50_patch as _resnet50_patch  # noqa: F401
from bonedist.models import agcnn as _agcnn  # noqa: F401
from bonedist.models import efficientnet as _efficientnet  # noqa: F401
from bonedist.models import resnet as _resnet  # noqa: F401
from bonedist.models import cspnext as _cspnext  # noqa: F401
from bonedist.models import cspdarknet as _cspdarknet  # noqa: F401
from bonedist.models import timm_regressor as _timm_regressor  # noqa: F401  (timm/ARCH on demand)
from bonedist.models.registry import (ModelInfo, NoOptions, create_model, default_models, default_roster, is_model,
                                      list_models, model_info, register_model, replica_run, unregister_model)
from bonedist.models.task import Task
from bonedist.spec import InputConfig, InputSpec

__all__ = ["InputConfig", "InputSpec", "ModelInfo", "NoOptions", "Task", "create_model", "default_models",
           "default_roster", "is_model", "list_models", "model_info", "register_model", "replica_run",
           "unregister_model"]

"""The four bone-age models behind one registry.

    from bonedist.models import create_model, list_models
    model = create_model("xception", pretrained="weights/", freeze_backbone=True)
    out = model(images, male)   # out["pred"]: (B,) z units
"""

# registration order is the order of every table and script: the three regressors, then agcnn
from bonedist.models import regressors as _regressors  # noqa: F401, I001
from bonedist.models import agcnn as _agcnn  # noqa: F401
from bonedist.models.registry import create_model, list_models, model_info, register_model, unregister_model
from bonedist.spec import InputSpec
from bonedist.models.task import Task

__all__ = ["InputSpec", "Task", "create_model", "list_models", "model_info", "register_model", "unregister_model"]

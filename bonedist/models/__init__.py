"""The four bone-age models behind one registry.

    from bonedist.models import create_model, list_models
    model = create_model("xception", pretrained="weights/", freeze_backbone=True)
    out = model(images, male)   # out["pred"]: (B,) z units
"""

from bonedist.models import agcnn as _agcnn  # noqa: F401  (registers agcnn)
from bonedist.models import regressors as _regressors  # noqa: F401  (registers the three regressors)
from bonedist.models.registry import create_model, list_models, register_model
from bonedist.models.spec import InputSpec

__all__ = ["InputSpec", "create_model", "list_models", "register_model"]

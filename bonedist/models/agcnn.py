"""AG-CNN (paper V-D, after Guan et al.): Global and Local ResNet50 branches from scratch plus a Fusion head.

The Local branch sees the Global branch's attention crop of the original radiograph. With ``fusion_grad="isolated"``
(the paper) the Fusion head gets detached branch features, so with the task's loss
0.8·L_global + 0.1·L_local + 0.1·L_fusion every branch is updated by its own term only; ``"joint"`` (Guan et al.)
back-propagates the whole loss through everything.

Staged training (Guan et al.): ``set_stage("global" | "local" | "fusion" | None)``. In training mode a stage runs
only what it needs and trains only its branch: global alone; then local on the (fixed) global branch's crops; then
the Fusion head on both fixed branches. Evaluation always runs every branch. With ``hand_mask`` the attention is
confined to the hand (the non-background pixels of the masked input), so markers cannot attract the crop.
"""

from __future__ import annotations

from dataclasses import dataclass

from bonedist.models.recipes import BF16_CL
from bonedist.models.registry import register_model
from bonedist.models.task import Task
from bonedist.options import option

KERAS_LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default alpha

# The paper's convex combination 0.8·L_global + 0.1·L_local + 0.1·L_fusion; staged training (Guan et al.) trains
# the branches one after another; the prediction is the Fusion branch's; the local branch's crop is drawn.
AGCNN_TASK = Task(branches=("global", "local", "fusion"), weights={"global": 0.8, "local": 0.1, "fusion": 0.1},
                  main_branch="fusion", stages=("global", "local", "fusion"), attention=True,
                  compilable=False)  # the union-find of the attention crop breaks graphs


@dataclass
class AGCNNOptions:
    reduction: str = option("sum", "attention heat from the last feature map: channel sum (the paper) or max (Guan "
                                   "et al.)", ("sum", "max"), "model")
    threshold: str | float = option("otsu", "attention threshold: otsu, or a fixed share of the heat range",
                                    group="model")
    fusion_grad: str = option("isolated", "isolated: each branch learns from its own loss term (the paper); joint: "
                                          "the whole loss through everything (Guan et al.)", ("isolated", "joint"),
                              "model")
    drop_rate: float = option(0.5, "dropout of the head's hidden layers", group="model", minimum=0, maximum=1)
    leaky_slope: float = option(KERAS_LEAKY_SLOPE, "LeakyReLU slope (Keras' default 0.3)", group="model", minimum=0)
    fusion_norm: bool = option(False, "layer-normalise each branch's pooled features before the Fusion head",
                               group="model")
    zero_init_residual: bool = option(False, "start every residual block as the identity", group="model")


def _recipes() -> dict:
    """What AG-CNN adds to each preset's shared values."""
    staged = {"reduction": "max", "fusion_norm": True}
    return {
        # from scratch, 16 epochs at a constant 1e-5 (the paper's three Adam optimizers: one group per branch)
        "paper": lambda: {"epochs": 16, "lr": 1e-5, "scheduler": "constant", "early_stopping": 0,
                          "model": {"reduction": "sum", "threshold": "otsu", "fusion_grad": "isolated"}},
        # staged after Guan et al.: global branch, then local on the fixed global's crops, then the Fusion head
        "improved": lambda: {"lr": 3e-4, "stages": [["global", 15], ["local", 10], ["fusion", 5]],
                             "model": {**staged, "threshold": "otsu", "fusion_grad": "isolated"}},
        # 12 epochs with warmups of 3.6, the schedule the AG-CNN was tuned with (warmup is per stage)
        "scratch": lambda: {"epochs": 12, "warmup_epochs": 3.6, "stages": [["global", 6], ["local", 4], ["fusion", 2]],
                            "model": {**staged, "drop_rate": 0.1}},
        "tiny": lambda: {"model": {"drop_rate": 0.1, "fusion_norm": True}},
    }


@register_model(options=AGCNNOptions, task=AGCNN_TASK, channels=(1,), recipes=_recipes(), cpu_precision=BF16_CL,
                paper={"agcnn_global": (0.18, 0.43, 0.91), "agcnn_local": (0.79, 0.89, 0.57),
                       "agcnn_fusion": (0.22, 0.47, 0.89)})
def agcnn(opts: AGCNNOptions, in_chans: int):
    """The attention-guided three-branch CNN, trained from scratch (it takes no ImageNet weights).

    ``fusion_norm`` (not in the paper; no parameters) layer-normalises each branch's pooled features before the
    Fusion head, which otherwise starts from very large inputs and converges slowly in short runs.
    ``zero_init_residual`` (not in the paper) zeroes the last BatchNorm scale of every residual block after the
    Keras initialisation, so each branch starts as a shallow network: trained from scratch at a high learning rate
    the Keras-initialised local branch did not recover in its stage.
    """
    from bonedist.models.agcnn_net import AGCNN

    return AGCNN(opts)

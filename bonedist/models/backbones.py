"""timm backbones and their weights: random init, a timm tag (hub download where allowed) or a local file.

Compute nodes often have no internet. ``bonedist weights fetch DIR`` on a login node saves the three backbones as
``DIR/<tag>.safetensors``; ``--pretrained DIR`` (or the file itself) then loads them offline. The Hugging Face cache
and ``HF_HUB_OFFLINE=1`` are honoured for tags, because timm downloads through ``huggingface_hub``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from bonedist import BonedistError

# The paper's ImageNet backbones; ResNet50's torchvision weights are the classic ones Keras ships too.
DEFAULT_TAGS = {
    "inception_v3": "inception_v3.tv_in1k",
    "legacy_xception": "legacy_xception.tf_in1k",
    "resnet50": "resnet50.tv_in1k",
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "last_linear.", "head.fc.", "AuxLogits.")
_FETCH_HINT = ("on a machine with internet run `bonedist weights fetch DIR`, copy DIR to this machine and pass "
               "--pretrained DIR (or the .safetensors file)")


def is_weight_request(pretrained: str | None) -> bool:
    return pretrained not in (None, "", "none", "None", False)


def create_backbone(arch: str, pretrained: str | None = None, in_chans: int = 3, **kwargs) -> nn.Module:
    """A headless timm backbone (``num_classes=0``) with the requested weights.

    Args:
        arch: timm architecture (``inception_v3``, ``legacy_xception``, ``resnet50``).
        pretrained: None/"none" for random init; "default" for the paper's tag (``DEFAULT_TAGS``); a timm tag such
            as ``resnet50.a1_in1k``; a weights file
            (.safetensors/.pth); or a folder written by ``bonedist weights fetch``.
        in_chans: input channels; RGB weights are adapted to 1 channel by summing the stem filters.
    """
    tag = DEFAULT_TAGS.get(arch, arch)
    if pretrained == "default":  # the paper's ImageNet weights for this architecture
        pretrained = tag
    if not is_weight_request(pretrained):
        return timm.create_model(tag, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    text = str(pretrained)
    path = Path(text).expanduser()
    looks_like_path = path.exists() or "/" in text or text.endswith(WEIGHT_SUFFIXES) or text.startswith(".")
    if not looks_like_path:
        if text.split(".")[0] != arch:
            raise BonedistError(f"pretrained tag {text!r} is not a {arch} tag (for example {tag!r})")
        try:
            return timm.create_model(text, pretrained=True, num_classes=0, in_chans=in_chans, **kwargs)
        except Exception as exc:  # network, hub or unknown-tag errors all mean: no weights here
            raise BonedistError(f"cannot load pretrained weights {text!r} ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); {_FETCH_HINT}") from exc
    file = _weights_file(path, tag)
    model = timm.create_model(tag, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    load_weights(model, file)
    return model


def _weights_file(path: Path, tag: str) -> Path:
    if path.is_dir():
        for suffix in WEIGHT_SUFFIXES:
            candidate = path / f"{tag}{suffix}"
            if candidate.is_file():
                return candidate
        raise BonedistError(f"no weights for {tag} in {path} (expected {tag}.safetensors); {_FETCH_HINT}")
    if not path.is_file():
        raise BonedistError(f"weights file {path} not found; {_FETCH_HINT}")
    return path


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file (loaded with ``weights_only=True``: never unpickles code)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BonedistError(f"cannot read weights file {file}: {exc.__class__.__name__}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BonedistError(f"{file} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, file: Path) -> None:
    """Load a backbone state dict, ignoring classifier layers, adapting the stem's channels; strict otherwise."""
    state = {}
    for key, value in read_state_dict(file).items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith(_CLASSIFIER_PREFIXES):
            state[key] = value
    own = model.state_dict()
    stem = model.pretrained_cfg.get("first_conv")
    stem_key = f"{stem}.weight" if stem else None
    if stem_key in state and stem_key in own and state[stem_key].shape[1] != own[stem_key].shape[1]:
        state[stem_key] = adapt_input_conv(own[stem_key].shape[1], state[stem_key])
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for label, keys in (("shape mismatch", mismatched), ("missing", missing),
                                               ("unexpected", unexpected)) if keys)
        raise BonedistError(f"weights file {file} does not fit {model.pretrained_cfg.get('architecture')}: {detail}")
    model.load_state_dict(state, strict=False)


def fetch_weights(out_dir: str | Path, tags: list[str] | None = None) -> list[Path]:
    """Download each backbone once (login node) and save ``out_dir/<tag>.safetensors`` for offline nodes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tag in tags or list(DEFAULT_TAGS.values()):
        try:
            model = timm.create_model(tag, pretrained=True, num_classes=0)
        except Exception as exc:
            raise BonedistError(f"cannot download {tag!r}: {exc.__class__.__name__}: {exc} "
                                "(this needs internet access to the Hugging Face hub)") from exc
        file = out_dir / f"{tag}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
        written.append(file)
    return written

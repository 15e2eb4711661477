"""Weights I/O: safetensors export, checked loading, and backbone-only (timm) initialisation.

Loading never unpickles arbitrary objects: torch files go through ``torch.load(weights_only=True)``.
A tensor whose shape differs from the model's is an error (naming the key and both shapes), except
for the classifier when the caller explicitly allows it (a new class set).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distseg.errors import UserError

StateDict = Mapping[str, torch.Tensor]
_CONTAINER_KEYS = ("state_dict", "model", "module")
_FULL_MODEL_PREFIX = "backbone.body."


class WeightsError(UserError, ValueError):
    """A weights file cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did: model keys absent from the source, source keys the model lacks, and
    classifier tensors left untouched because their shape changed."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    skipped_classifier: tuple[str, ...]


def nonfinite_keys(state: StateDict) -> list[str]:
    """Floating-point entries of a state dict that hold a NaN or ±inf (one host sync)."""
    keys = [k for k, v in state.items() if v.is_floating_point()]
    if not keys:
        return []
    flags = torch.stack([state[k].detach().isfinite().all() for k in keys]).tolist()
    return [k for k, ok in zip(keys, flags) if not ok]


def _refuse_nonfinite(state: StateDict, where: str, action: str) -> None:
    """No NaN/inf weights are ever written or loaded: a diverged model is an error, not a result."""
    bad = nonfinite_keys(state)
    if bad:
        raise WeightsError(f"{where}: refusing to {action} non-finite weights (NaN or inf in {len(bad)} of "
                           f"{len(state)} tensors, e.g. {bad[0]}); the training that made them diverged")


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model.state_dict()`` as safetensors (atomically), with optional string metadata.

    Non-finite weights are refused, and a failed write (full disk) leaves no temporary file behind.
    """
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise WeightsError(f"{path}: safetensors metadata must map str to str; bad entries: {bad}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _refuse_nonfinite(tensors, str(path), "write")
    write_safetensors(tensors, path, metadata, "weights")


def write_safetensors(tensors: StateDict, path: str | Path, metadata: dict[str, str], what: str) -> None:
    """Write CPU tensors to ``path`` through a temporary file, so a reader never sees a partial file and a failed
    write (full disk) leaves nothing behind; a safetensors failure becomes a WeightsError naming the file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports I/O failures (a full disk) as its own error type
        raise WeightsError(f"{path}: cannot write {what} ({type(exc).__name__}: {exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file by :func:`save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under a usual container key; anything else is an error."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read safetensors (by suffix) or a torch file with ``weights_only=True``, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # safetensors / unpickler errors, reported with the file name
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    return _unwrap(obj, path)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DDP and DeepSpeed wrappers add to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _classifier_keys(model: nn.Module) -> set[str]:
    classifier = getattr(model, "classifier", None)
    return {f"classifier.{k}" for k in classifier.state_dict()} if isinstance(classifier, nn.Module) else set()


def load_weights(model: nn.Module, source: str | Path | StateDict, *, allow_classifier_mismatch: bool = False,
                 strict: bool = False) -> LoadReport:
    """Load a state dict (or a file holding one) into ``model`` and report what did not match.

    A shape mismatch raises :class:`WeightsError`, unless it is in the classifier and
    ``allow_classifier_mismatch`` is set: then the model's classifier is kept and the keys are listed in
    ``skipped_classifier``. With ``strict``, missing or unexpected keys raise as well. A ``module.``
    prefix on every key (a DDP or DeepSpeed wrapper's state dict) is removed.
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    state = _strip_wrapper_prefix(dict(source) if isinstance(source, Mapping) else read_state_dict(source))
    _refuse_nonfinite(state, where, "load")
    own = model.state_dict()
    classifier = _classifier_keys(model)
    skipped, wrong = [], []
    for key in sorted(set(state) & set(own)):
        if state[key].shape == own[key].shape:
            continue
        if allow_classifier_mismatch and key in classifier:
            skipped.append(key)
        else:
            wrong.append(f"{key}: source {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
    if wrong:
        hint = ("; for a new class set pass allow_classifier_mismatch=True"
                if all(w.split(":")[0] in classifier for w in wrong) else "")
        raise WeightsError(f"{where}: shape mismatch for {'; '.join(wrong)}{hint}")
    report = LoadReport(missing=tuple(sorted(set(own) - set(state))),
                        unexpected=tuple(sorted(set(state) - set(own))), skipped_classifier=tuple(skipped))
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"{where}: missing keys {list(report.missing)[:5]}, "
                           f"unexpected keys {list(report.unexpected)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    return report


def _timm_key(feature_key: str) -> str:
    """Name of a feature-extractor tensor in the plain timm model.

    timm's feature wrappers flatten nested stages into their first name component (``blocks.0`` becomes
    ``blocks_0``); undo that on the first component only.
    """
    head, _, rest = feature_key.partition(".")
    if "_" in head and head.rsplit("_", 1)[1].isdigit():
        head = ".".join(head.rsplit("_", 1))
    return f"{head}.{rest}" if rest else head


def load_backbone_weights(backbone: nn.Module, source: str | Path | StateDict) -> LoadReport:
    """Initialise a :class:`~distseg.models.backbones.Backbone` from a timm state dict.

    The source may be the plain timm model's state dict (its classification head is reported as
    unexpected and ignored), the feature extractor's, or a whole ``DeepLabV3Plus`` state dict (only its
    ``backbone.body.`` tensors are used). Any backbone tensor left uncovered is an error: a partly random
    encoder is never what ``pretrained=PATH`` means.
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    if any(k.startswith(_FULL_MODEL_PREFIX) for k in state):
        state = {k[len(_FULL_MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(_FULL_MODEL_PREFIX)}
    body = backbone.body
    mapped, used = {}, set()
    for key in body.state_dict():
        candidate = key if key in state else _timm_key(key)
        if candidate in state:
            mapped[key] = state[candidate]
            used.add(candidate)
    try:
        report = load_weights(body, mapped)
    except WeightsError as exc:
        raise WeightsError(f"{where}: backbone weights do not fit: {exc}") from exc
    if report.missing:
        raise WeightsError(f"{where}: {len(report.missing)} backbone tensors missing, e.g. {list(report.missing)[:5]}"
                           f"; is this a state dict of the same timm model?")
    return LoadReport(missing=(), unexpected=tuple(sorted(set(state) - used)), skipped_classifier=())

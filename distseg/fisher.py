"""The diagonal Fisher information behind EWC: estimation, its file, and the per-stage ``fisher.safetensors``.

F is computed once, when a stage ends, on that stage's own training data (SPEC §3), and stored beside its weights;
the next stage's EWC reads it with the anchor weights θ*.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distseg.data.batch import Batch


def _image_log_likelihoods(
    logits: Tensor, target: Tensor | None, labels: str, ignore_index: int
) -> Tensor:
    """Mean per-pixel log-likelihood of each image (B values) under the chosen labels."""
    log_p = F.log_softmax(logits.float(), dim=1)
    if labels == "predicted":
        return log_p.max(dim=1).values.flatten(1).mean(1)
    valid = target != ignore_index
    picked = log_p.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    mask = valid.to(picked.dtype)
    return (picked * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


def _batches_with_progress(batches: Iterable[Batch], n_batches: int, progress: bool) -> Iterator[Batch]:
    """The first ``n_batches`` batches, with a rich progress bar when asked."""
    limited = (b for _, b in zip(range(n_batches), batches))
    if not progress:
        yield from limited
        return
    from rich.progress import track

    yield from track(limited, total=n_batches, description="Fisher")


@torch.no_grad()
def _accumulate_sq(acc: list[Tensor], grads: tuple[Tensor | None, ...]) -> None:
    """acc += g² for every parameter (a parameter unused by the graph has g = None and adds nothing)."""
    pairs = [(a, g) for a, g in zip(acc, grads) if g is not None]
    if pairs:
        torch._foreach_addcmul_([a for a, _ in pairs], [g.float() for _, g in pairs], [g.float() for _, g in pairs])


def _batch_target(batch: Batch, device: torch.device) -> Tensor:
    """The ground-truth mask of a batch, on ``device``; a clear error when the batch has none."""
    if batch.mask is None:
        raise ValueError("labels='target' needs labelled batches (with a mask)")
    return batch.mask.to(device)


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    n_batches: int,
    device: torch.device | str | None = None,
    *,
    labels: Literal["predicted", "target"] = "predicted",
    ignore_index: int = 255,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model`` on up to ``n_batches`` batches (fp32, by parameter name).

    F_i = mean over images of (∂ℓ/∂θ_i)², where ℓ is one image's mean per-pixel log-likelihood.
    Per image, not per batch: the square of a batch-mean gradient would shrink F by about the batch
    size. ``labels="predicted"`` (default) scores the model's own argmax prediction on the data it
    was trained on, so F measures how sharply the model's *current* answers depend on each weight
    and needs no labels; ``"target"`` uses the ground truth (the "empirical Fisher", biased where
    the model is wrong). The model runs in eval mode (BN statistics untouched) and its mode is
    restored; only parameters with ``requires_grad`` are scored. Images (and masks) of the
    :class:`~distseg.data.batch.Batch` objects are moved to ``device`` when given; the model must already be there.
    """
    if labels not in ("predicted", "target"):
        raise ValueError(f"labels must be 'predicted' or 'target', got {labels!r}")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n_images = 0
    was_training = model.training
    model.eval()
    try:
        for batch in _batches_with_progress(batches, n_batches, progress):
            images = batch.image if device is None else batch.image.to(device)
            target = _batch_target(batch, images.device) if labels == "target" else None
            ll = _image_log_likelihoods(model(images), target, labels, ignore_index)
            for i in range(ll.shape[0]):
                grads = torch.autograd.grad(ll[i], params, retain_graph=i < ll.shape[0] - 1, allow_unused=True)
                _accumulate_sq(acc, grads)
            n_images += ll.shape[0]
    finally:
        model.train(was_training)
    if n_images == 0:
        raise ValueError("compute_fisher: the batch iterable was empty")
    torch._foreach_div_(acc, float(n_images))
    return {name: a for (name, _), a in zip(named, acc)}


class FisherState(NamedTuple):
    """What a ``fisher.safetensors`` file holds."""

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor] | None


_FISHER, _ANCHOR = "fisher.", "anchor."


def save_fisher(path: str | Path, fisher: dict[str, Tensor], anchor: dict[str, Tensor] | None = None) -> None:
    """Write the Fisher (and optionally the anchor weights) to a safetensors file, atomically."""
    from distseg.models.weights import write_safetensors

    tensors = {_FISHER + k: v.detach().cpu().contiguous() for k, v in fisher.items()}
    if anchor is not None:
        tensors.update({_ANCHOR + k: v.detach().cpu().contiguous() for k, v in anchor.items()})
    write_safetensors(tensors, path, {"format": "distseg-fisher", "has_anchor": str(anchor is not None)}, "the Fisher")


def load_fisher(path: str | Path) -> FisherState:
    """Read a file written by :func:`save_fisher`; errors (``WeightsError``) name the file and the problem.

    A Fisher must be finite and non-negative (it is a mean of squares): anything else would turn EWC's penalty into
    NaN or reward drifting away from the anchor.
    """
    from distseg.models.weights import WeightsError, nonfinite_keys, read_state_dict

    path = Path(path)
    tensors = read_state_dict(path)
    fisher = {k[len(_FISHER):]: v for k, v in tensors.items() if k.startswith(_FISHER)}
    anchor = {k[len(_ANCHOR):]: v for k, v in tensors.items() if k.startswith(_ANCHOR)}
    if not fisher:
        raise WeightsError(f"{path}: holds no '{_FISHER}*' tensors, so it is not a Fisher file")
    bad = nonfinite_keys(tensors)
    if bad or any(bool((f < 0).any()) for f in fisher.values()):
        raise WeightsError(f"{path}: not a valid Fisher (NaN/inf in {bad[:3]} or negative entries); recompute it "
                           f"with `distseg fisher`")
    return FisherState(fisher, anchor or None)


def fisher_for_stage(folder: str | Path, shards: str, split: str, stream_cfg, n_batches: int, *, batch_size: int,
                     device: torch.device | str = "cpu") -> Path:
    """Compute F on ``n_batches`` of the stage's own training data and write ``fisher.safetensors``.

    The model is rebuilt from the exported weights with every parameter trainable, so the Fisher covers the whole
    network even when the stage itself trained only its classifier. The anchor weights θ* are stored with it.
    """
    from distseg.data.stream import build_loader
    from distseg.engine import checkpoint as ckpt

    folder = Path(folder)
    model, _ = ckpt.load_inference_model(folder, device)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = dataclasses.replace(stream_cfg, batch_size=batch_size)
    loader = build_loader(shards, split, cfg, rank=0, world_size=1, train=False)
    fisher = compute_fisher(model, iter(loader), n_batches, device, progress=True)
    anchor = {name: p.detach() for name, p in model.named_parameters()}
    path = folder / ckpt.FISHER
    save_fisher(path, fisher, anchor)
    return path

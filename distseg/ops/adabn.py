"""AdaBN: a trained model's BatchNorm running statistics re-estimated on the imagery it is about to map.

A segmenter normalises every feature map with the mean and variance it saw in training. Labels from one town and
imagery of another break that quietly: on drone imagery of Kampala, the Nairobi fine-tune's own statistics made it
find 29 % of the building pixels, and the same weights with statistics re-estimated on Nairobi's and Kampala's
unlabelled images found 40 %, with no training step (docs/ssl_findings.md). This is the cheapest adaptation there
is: forward passes only, minutes on a CPU, no labels and no weight changes.

The estimate is the plain average of per-batch statistics over one pass (PyTorch's cumulative mode,
``momentum=None``), not an exponential average, so every image counts the same whichever order it comes in; only
BatchNorm layers switch to training mode, so dropout and everything else behave as at inference. On several ranks
each layer's statistics are averaged over all ranks' batches, so every replica holds the same model.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of every BatchNorm layer of ``model`` with their average over the
    batches of ``images`` (image tensors already on the model's device), and return how many images were seen on
    all ranks.

    Weights are not touched and ``model`` is left in eval mode; a pass that fails leaves the statistics as it found
    them. A batch of one image (a pass's last, say) is skipped: a layer after global pooling sees one value per
    channel and image, and a variance of one value does not exist.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics: nothing to re-estimate")
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        seen = 0
        for batch in images:
            if batch.shape[0] < 2:
                continue
            model(batch)
            seen += batch.shape[0]
        return _average_over_ranks(layers, seen)
    except BaseException:
        for m, (_, mean, var, count) in zip(layers, saved):  # a failed pass leaves the statistics it found
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, (momentum, *_) in zip(layers, saved):
            m.momentum = momentum
        model.eval()


def _average_over_ranks(layers: list[nn.modules.batchnorm._BatchNorm], seen: int) -> int:
    """Weight each rank's statistics by its batch count, sum over ranks, and return the images seen on all ranks;
    refuses a pass that saw no image anywhere (the layers would keep the reset statistics, 0 and 1)."""
    batches = layers[0].num_batches_tracked.clone().float()
    counts = torch.tensor([float(seen), batches.item()], device=batches.device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(counts)
    if counts[1] == 0:
        raise ValueError("BatchNorm re-estimation saw no image")
    if distributed:
        for m in layers:
            weighted = torch.cat([m.running_mean * batches, m.running_var * batches])
            dist.all_reduce(weighted)
            c = m.running_mean.numel()
            m.running_mean.copy_(weighted[:c] / counts[1])
            m.running_var.copy_(weighted[c:] / counts[1])
            m.num_batches_tracked.fill_(int(counts[1].item()))
    return int(counts[0].item())

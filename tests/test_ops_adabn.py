"""AdaBN (ops/adabn.py): re-estimated BatchNorm statistics are the plain average of per-batch statistics, and
nothing else about the model changes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distseg.ops.adabn import batchnorm_layers, reestimate_bn


def _model() -> nn.Module:
    """Conv-BN twice, then a BatchNorm after global pooling (like ASPP's image branch), and a dropout."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.5),
                         nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1),
                         nn.BatchNorm2d(5)).eval()


def _batches(n: int, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) * (i + 1) + i for i in range(n)]


def _naive(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean over batches of each batch's own statistics: a fresh copy per batch whose BatchNorm
    layers take that batch's statistics whole (momentum 1), dropout off."""
    per_batch = []
    for x in batches:
        m = copy.deepcopy(model).eval()
        for bn in batchnorm_layers(m):
            bn.momentum = 1.0
            bn.train()
        with torch.no_grad():
            m(x)
        per_batch.append([(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(m)])
    return [(torch.stack([b[i][0] for b in per_batch]).mean(0), torch.stack([b[i][1] for b in per_batch]).mean(0))
            for i in range(len(per_batch[0]))]


def test_statistics_are_the_average_of_per_batch_statistics_and_nothing_else_changes():
    model, batches = _model(), _batches(3)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    expected = _naive(model, batches)
    seen = reestimate_bn(model, batches + [torch.randn(1, 3, 8, 8)])  # a one-image batch is skipped
    assert seen == 12
    for bn, (mean, var) in zip(batchnorm_layers(model), expected):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    assert not any(m.training for m in model.modules()), "the model is left in eval mode"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items()), "weights must not change"


def test_the_result_does_not_depend_on_the_statistics_it_replaces():
    a, b = _model(), _model()
    for bn in batchnorm_layers(b):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    reestimate_bn(a, _batches(2))
    reestimate_bn(b, _batches(2))
    for x, y in zip(batchnorm_layers(a), batchnorm_layers(b)):
        torch.testing.assert_close(x.running_mean, y.running_mean)
        torch.testing.assert_close(x.running_var, y.running_var)


def test_a_model_without_batchnorm_and_a_pass_without_images_are_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        reestimate_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), _batches(1))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="saw no image"):
        reestimate_bn(model, [torch.randn(1, 3, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused pass changes nothing"
    assert all(bn.momentum == 0.1 for bn in batchnorm_layers(model)) and not model.training

"""Polarized Self-Attention against a naive re-implementation of the SPEC §2 formulas."""
from __future__ import annotations

import pytest
import torch

from distseg.models.psa import PolarizedSelfAttention


def _conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """1×1 conv written as an einsum over channels (independent of the module's forward)."""
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


def _naive_channel_weights(block, x: torch.Tensor) -> torch.Tensor:
    """Channel-only weights, one image and one channel at a time."""
    out = torch.empty(x.shape[0], x.shape[1], 1, 1)
    for i in range(x.shape[0]):
        q = torch.softmax(_conv1x1(x[i:i + 1], block.query).reshape(-1), dim=0)  # HW
        v = _conv1x1(x[i:i + 1], block.value).reshape(block.value.out_channels, -1)  # C/2 × HW
        z = (v * q).sum(dim=1)  # C/2
        z = block.up.weight[:, :, 0, 0] @ z + block.up.bias  # C
        z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + block.norm.eps)
        out[i, :, 0, 0] = torch.sigmoid(z * block.norm.weight + block.norm.bias)
    return out


def _naive_spatial_weights(block, x: torch.Tensor) -> torch.Tensor:
    """Spatial-only weights with the formula's order: conv first, then global average pool."""
    q = _conv1x1(x, block.query).mean(dim=(2, 3))  # B × C/2
    q = torch.softmax(q, dim=1)
    v = _conv1x1(x, block.value)  # B × C/2 × H × W
    return torch.sigmoid(torch.einsum("bc,bchw->bhw", q, v)).unsqueeze(1)


def _randomised(layout: str, channels: int = 8) -> PolarizedSelfAttention:
    """A PSA block whose LayerNorm affine is not the identity, so the reference checks it too."""
    torch.manual_seed(0)
    block = PolarizedSelfAttention(channels, layout)
    with torch.no_grad():
        block.channel.norm.weight.uniform_(0.5, 1.5)
        block.channel.norm.bias.uniform_(-0.5, 0.5)
    return block


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_output_shape(layout):
    x = torch.randn(2, 8, 5, 7)
    assert PolarizedSelfAttention(8, layout)(x).shape == x.shape


def test_branch_weights_lie_in_open_unit_interval():
    block = _randomised("parallel", channels=16)
    x = 3 * torch.randn(3, 16, 6, 6)
    ch, sp = block.channel.weights(x), block.spatial.weights(x)
    assert ch.shape == (3, 16, 1, 1) and sp.shape == (3, 1, 6, 6)
    for w in (ch, sp):
        assert (w > 0).all() and (w < 1).all()
        assert w.std() > 0  # genuinely data-dependent, not a constant


def test_branches_match_naive_formulas():
    block = _randomised("parallel")
    x = torch.randn(2, 8, 4, 6)
    torch.testing.assert_close(block.channel.weights(x), _naive_channel_weights(block.channel, x))
    torch.testing.assert_close(block.spatial.weights(x), _naive_spatial_weights(block.spatial, x))


def test_parallel_layout_is_sum_of_weighted_inputs():
    block = _randomised("parallel")
    x = torch.randn(2, 8, 4, 6)
    expected = x * _naive_channel_weights(block.channel, x) + x * _naive_spatial_weights(block.spatial, x)
    torch.testing.assert_close(block(x), expected)


def test_sequential_layout_composes_channel_then_spatial():
    block = _randomised("sequential")
    x = torch.randn(2, 8, 4, 6)
    after_channel = x * _naive_channel_weights(block.channel, x)
    expected = after_channel * _naive_spatial_weights(block.spatial, after_channel)
    torch.testing.assert_close(block(x), expected)
    assert not torch.allclose(block(x), _randomised("parallel")(x))


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_gradients_reach_every_parameter(layout):
    block = _randomised(layout)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    (block(x) * torch.randn(2, 8, 5, 5)).sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="layout"):
        PolarizedSelfAttention(8, "stacked")
    with pytest.raises(ValueError, match="at least 2 channels"):
        PolarizedSelfAttention(1)

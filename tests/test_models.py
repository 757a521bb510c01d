"""Tests for flower_sparsepush.learn.models: sizes, shapes, norms, flat-parameter helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flower_sparsepush.learn import models
from flower_sparsepush.learn.models import build_model, flat_params, load_flat_params_, num_params, segment_sizes


@pytest.mark.parametrize("norm", ["group", "batch", "layer", "none"])
def test_resnet20_params_and_shape(norm):
    m = build_model("resnet20", 10, 3, norm)
    n = num_params(m)
    assert abs(n - 270_000) <= 10_000, n  # He et al.: 0.27M
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 19  # 1 + 3 stages * 3 blocks * 2 convs (option A: no 1x1 shortcut convs)
    assert len([x for x in m.modules() if isinstance(x, nn.Linear)]) == 1


def test_norm_layers_types():
    gn = build_model("resnet20", 10, 3, "group")
    assert not any(isinstance(x, nn.BatchNorm2d) for x in gn.modules())
    assert all(x.num_groups == models.DEFAULT_GROUPS for x in gn.modules() if isinstance(x, nn.GroupNorm))
    assert len(list(gn.buffers())) == 0  # nothing batch-dependent to keep local
    bn = build_model("resnet20", 10, 3, "batch")
    assert sum(isinstance(x, nn.BatchNorm2d) for x in bn.modules()) == 19
    g4 = build_model("resnet20", 10, 3, "group:4")
    assert {x.num_groups for x in g4.modules() if isinstance(x, nn.GroupNorm)} == {4}
    with pytest.raises(ValueError, match="valid norms"):
        build_model("resnet20", 10, 3, "weird")
    with pytest.raises(ValueError, match="divide"):
        build_model("resnet20", 10, 3, "group:3")


def test_groupnorm_is_batch_independent():
    m = build_model("resnet20", 10, 3, "group", seed=0).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        single = m(x[:1])
    assert torch.allclose(full[:1], single, atol=1e-5)


def test_vgg11_cnn_mlp_logreg():
    v = build_model("vgg11", 10, 3)
    assert v(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 9e6 < num_params(v) < 1e7
    assert sum(isinstance(x, nn.Conv2d) for x in v.modules()) == 8
    assert build_model("vgg11", 10, 1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)

    c = build_model("cnn", 10, 1)
    assert 90_000 <= num_params(c) <= 110_000
    assert c(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert build_model("cnn", 10, 3, input_shape=(3, 32, 32))(torch.randn(1, 3, 32, 32)).shape == (1, 10)

    mlp = build_model("mlp", 4, input_shape=(16,), hidden=(32, 8))
    assert num_params(mlp) == 16 * 32 + 32 + 32 * 8 + 8 + 8 * 4 + 4
    lr = build_model("logreg", 10, input_shape=(1, 28, 28))
    assert num_params(lr) == 784 * 10 + 10
    assert lr(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", 10)


def test_unknown_model():
    with pytest.raises(ValueError) as err:
        build_model("resnet18", 10)
    for name in models.MODEL_NAMES:
        assert name in str(err.value)


def test_seeded_init():
    a = flat_params(build_model("resnet20", 10, 3, seed=7))
    b = flat_params(build_model("resnet20", 10, 3, seed=7))
    c = flat_params(build_model("resnet20", 10, 3, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    build_model("cnn", 10, 1, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("name,shape", [("resnet20", (3, 32, 32)), ("cnn", (1, 28, 28)), ("mlp", (12,))])
def test_flat_params_roundtrip(name, shape):
    m = build_model(name, 10, shape[0], "batch", input_shape=shape, seed=0)
    sizes = segment_sizes(m)
    assert sizes == [p.numel() for p in m.parameters()] and sum(sizes) == num_params(m)
    v = flat_params(m)
    assert v.dim() == 1 and v.numel() == num_params(m)
    new = torch.randn_like(v)
    load_flat_params_(m, new)
    assert torch.equal(flat_params(m), new)  # exact round trip
    # segments line up with the tensors
    first = next(iter(m.parameters()))
    assert torch.equal(first.detach().reshape(-1), new[: sizes[0]])
    # flat_params is a copy, not a view
    v2 = flat_params(m)
    v2.zero_()
    assert torch.equal(flat_params(m), new)
    with pytest.raises(ValueError):
        load_flat_params_(m, new[:-1])


def test_batchnorm_buffers_not_in_flat_vector():
    m = build_model("resnet20", 10, 3, "batch", seed=0).train()
    n_bn = sum(x.num_features for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    before = flat_params(m)
    m(torch.randn(4, 3, 32, 32))  # updates running stats only
    assert torch.equal(flat_params(m), before)
    assert before.numel() == num_params(m)
    buffers = sum(b.numel() for b in m.buffers())
    assert buffers == 2 * n_bn + sum(1 for x in m.modules() if isinstance(x, nn.BatchNorm2d))


def test_gradients_flow():
    m = build_model("resnet20", 10, 3, seed=0)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())

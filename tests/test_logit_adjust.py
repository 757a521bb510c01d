"""Logit adjustment (run-config ``logit-adjust``, run/node_train.label_shift): the rule (the shift is tau times the
log of the node's add-one-smoothed label frequencies, off at 0, and the node's gradient is exactly that of the
cross-entropy of the shifted logits), its effect on label-skewed nodes in a small run (closer together, more
accurate, the push-sum weights conserved, no bit more sent), and bad values refused. Flower == in-process with it on:
tests/test_flower_switches.py; batched == node by node: tests/test_batched.py; the drop-in refuses it in a preset:
strategies/dropin_options.WHY_NOT."""

import math

import pytest
import torch
import torch.nn.functional as F

from flower_sparsepush.learn.evaluate import load_flat
from flower_sparsepush.run.config import ConfigError, validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import label_shift, node_batch, node_gradient
from flower_sparsepush.run.setup import get_setup

SKEW = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "graph": "exponential", "num-rounds": 20,
        "partition": "dirichlet:0.1"}  # fmt: skip


def test_the_shift_is_tau_log_the_nodes_smoothed_label_frequencies_and_the_gradient_is_the_shifted_losss():
    off = get_setup(validate(SKEW))
    assert label_shift(off, 0) is None
    setup = get_setup(validate(SKEW | {"logit-adjust": 0.7}))
    k = setup.ds.num_classes
    for node in range(4):
        y = setup.shards[node][1]
        counts = [int((y == c).sum()) for c in range(k)]
        want = torch.tensor([0.7 * math.log((n + 1) / (len(y) + k)) for n in counts])
        assert torch.allclose(label_shift(setup, node), want, atol=1e-6)
    assert min(counts) == 0 or max(counts) > 2 * min(counts)  # the partition is skewed: the shift is not flat
    point = setup.x0.clone()
    aug = torch.Generator()
    g, loss = node_gradient(setup, point, 1, 3, 0, aug)
    model = setup.model
    load_flat(model, point)
    model.zero_grad(set_to_none=True)
    xb, yb = node_batch(setup, 1, 3, 0, aug)
    manual = F.cross_entropy(model(xb) + label_shift(setup, 1), yb)
    manual.backward()
    want_g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(g, want_g) and loss == manual.item()
    plain_g, plain_loss = node_gradient(off, point, 1, 3, 0, aug)
    assert not torch.equal(g, plain_g)


def test_label_skewed_training_with_logit_adjustment():
    plain = run_inprocess(validate(SKEW), eval_every=20)
    adjusted = run_inprocess(validate(SKEW | {"logit-adjust": 1.0}), eval_every=20)
    p, a = plain.history[-1], adjusted.history[-1]
    # the nodes no longer push down the logits of the classes they lack: they sit closer and each is more accurate
    assert a["consensus_distance"] < 0.75 * p["consensus_distance"]
    assert a["acc_node_mean"] > p["acc_node_mean"] + 0.05 and a["acc_consensus"] > p["acc_consensus"]
    # the weights are conserved and the messages are the same kind: no bit more than the compressed models
    assert a["y_nodes"] + a["y_in_transit"] == pytest.approx(4.0, abs=1e-12)
    assert abs(a["bits_sent_per_node"] - p["bits_sent_per_node"]) < 0.01 * p["bits_sent_per_node"]


@pytest.mark.parametrize("bad", [-0.1, 2.5, "strong"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ConfigError, match="logit-adjust"):
        validate(SKEW | {"logit-adjust": bad})

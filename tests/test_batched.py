"""The batched (vmap) local SGD is the per-node local SGD: same batches, same arithmetic, float32 rounding apart."""

import pytest
import torch

from flower_sparsepush.learn.batched import BatchedSGD
from flower_sparsepush.learn.evaluate import consensus_metrics, evaluate, evaluate_many
from flower_sparsepush.run import inprocess
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import init_state, train, train_batched
from flower_sparsepush.run.setup import get_setup


def _cfg(**kw):
    base = {"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "graph": "exponential", "num-rounds": 6,
            "compressor": "topk:0.1+q:4", "gamma": 0.2, "lr": 0.1, "local-steps": 2}  # fmt: skip
    return validate(base | kw)


def _perturbed_states(setup, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = [init_state(setup) for _ in range(n)]
    for s in states:
        s.x = s.x + 0.05 * torch.randn(s.x.shape, generator=g)
        s.y = 1.0 + 0.1 * float(torch.rand(1, generator=g))
        s.x = s.x * s.y
    return states


def test_train_batched_equals_train_node_by_node():
    for qgm, drift, look in ((False, False, 0.0), (True, False, 0.0), (False, True, 0.0), (False, False, 0.7)):
        cfg = _cfg(qgm=qgm, **{"gradient-lookahead": look})
        setup = get_setup(cfg)
        a = _perturbed_states(setup, 4)
        b = _perturbed_states(setup, 4)
        if look:  # copies of other nodes' models on three nodes: their gradients are taken nearer those
            for i, (sa, sb) in enumerate(zip(a[:3], b[:3])):
                sa.refs_in = {j: b[j].z.clone() for j in range(4) if j != i}
                sb.refs_in = {j: r.clone() for j, r in sa.refs_in.items()}
        if drift:  # a drift correction (merge.correct_drift) on some nodes, subtracted from their gradients
            g = torch.Generator().manual_seed(7)
            for sa, sb in zip(a[:3], b[:3]):
                sa.drift = 0.5 * torch.randn(sa.x.shape, generator=g)
                sb.drift = sa.drift.clone()
        engine = BatchedSGD(setup.model, torch.device("cpu"))
        for rnd in range(3):  # momentum (or the qgm buffer) carries over between rounds
            losses = [train(setup, s, i, rnd) for i, s in enumerate(a)]
            blosses = train_batched(setup, engine, b, [0, 1, 2, 3], rnd)
            for sa, sb, la, lb in zip(a, b, losses, blosses):
                assert torch.allclose(sa.z, sb.z, rtol=1e-4, atol=1e-5)
                assert torch.allclose(sa.momentum, sb.momentum, rtol=1e-4, atol=1e-4)
                assert abs(la - lb) < 1e-4
        assert any(not torch.allclose(s.z, setup.x0) for s in b)  # the models did move


def test_evaluate_many_equals_evaluate():
    cfg = _cfg(**{"val-split": 0.2})
    setup = get_setup(cfg)
    states = _perturbed_states(setup, 4, seed=3)
    engine = BatchedSGD(setup.model, torch.device("cpu"))
    zs = torch.stack([s.z for s in states])
    for split in ("test", "val"):
        many = evaluate_many(setup, engine, zs, 100, split)
        for z, (acc, loss) in zip(zs, many):
            acc1, loss1 = evaluate(setup, z, 100, split)
            assert acc == acc1 and abs(loss - loss1) < 1e-4
    m1 = consensus_metrics(setup, list(zs), 100)
    m2 = consensus_metrics(setup, list(zs), 100, engine)
    assert m1.keys() == m2.keys() and {"val_acc_consensus", "val_acc_node_min"} <= m1.keys()
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-4, k


@pytest.mark.parametrize(
    "merges",
    [{}, {"gradient-lookahead": 0.8}, {"update-tracking": 0.5, "merge-every": 3, "merge-bits": 8}]
    + [{"logit-adjust": 1.0, "partition": "dirichlet:0.5"}]
    + [{"merge-every": 3, "merge-bits": 8, "drift-correction": m} for m in ("displacement", "gradient")],
)
def test_inprocess_loop_batched_equals_node_by_node(monkeypatch, merges):
    cfg = _cfg(**{"final-merge": True, "num-rounds": 8} | merges)
    plain = run_inprocess(cfg, eval_every=4)
    setup = get_setup(cfg)
    monkeypatch.setattr(inprocess, "make_engine", lambda s: BatchedSGD(s.model, torch.device("cpu")))
    batched = run_inprocess(cfg, eval_every=4)
    assert plain.bits_sent == batched.bits_sent
    for sa, sb in zip(plain.states, batched.states):
        assert torch.allclose(sa.z, sb.z, rtol=1e-3, atol=1e-4)
    for ha, hb in zip(plain.history, batched.history):
        assert abs(ha["acc_consensus"] - hb["acc_consensus"]) <= 2 / len(setup.ds.y_test)

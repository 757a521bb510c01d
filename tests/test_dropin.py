"""Drop-in mode (DecentralizedFedAvg + an ordinary ClientApp) against the native mode, the example app, mass, args.

Equivalence conditions: the drop-in ClientApp trains with the same ``training.local_sgd`` as the native node, on the
same batches (a pure function of seed, node, round), so the local work is identical. Momentum must be 0: an
ordinary ClientApp gets only the model and keeps no optimizer state, while the native node keeps its momentum
buffer in its state across rounds. Any number of local steps and any deterministic compressor then give the same
node models; random-k does too (both modes seed it from (seed, node, round)).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_sparsepush.strategies import DecentralizedFedAvg
from flower_sparsepush.strategies.dropin_options import PRESET_ARGS
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_sparsepush.core.router import Network
from flower_sparsepush.flower.launch import BACKEND_CONFIG, QUIET_ENV
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.inprocess import run_inprocess
from flower_sparsepush.run.node_train import local_sgd, torch_threads
from flower_sparsepush.run.presets import PRESETS
from flower_sparsepush.run.schedule import compressor_at
from flower_sparsepush.run.setup import get_setup

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pytorch-dropin"
CFG = {
    "dataset": "synthetic",
    "model": "mlp",
    "num-nodes": 4,
    "graph": "exponential",
    "strategy": "sparse-push",
    "compressor": "topk:0.1+q:4",
    "gamma": 0.3,
    "form": "ref",
    "num-rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.0,
    "nesterov": False,
    "weight-decay": 1e-4,
    "seed": 3,
}


def _run(server_app: ServerApp, client_app: ClientApp, n: int) -> None:
    from flwr.simulation import run_simulation

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app, client_app, num_supernodes=n, backend_config=BACKEND_CONFIG, verbose_logging=False)


def _layout(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in get_setup(cfg).model.named_parameters()]


def _split(vec: torch.Tensor, layout) -> ArrayRecord:
    out, off = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = Array(vec[off : off + size].reshape(shape).detach().numpy().copy())
        off += size
    return ArrayRecord(out)


def make_sgd_client_app(cfg: dict) -> ClientApp:
    """An ordinary FedAvg-contract ClientApp whose training is ``training.local_sgd`` (momentum 0: no state)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"info": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        setup = get_setup(cfg)
        node = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"]) - 1
        arrays = msg.content["arrays"]
        z = torch.cat([torch.from_numpy(np.array(arrays[k].numpy())).reshape(-1) for k in arrays])
        z_new, _, loss = local_sgd(setup, z, None, node, rnd)
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(setup.shards[node][1])})
        return Message(RecordDict({"arrays": _split(z_new, _layout(cfg)), "metrics": metrics}), reply_to=msg)

    return app


def _dropin(cfg, **kwargs):
    """Run the drop-in strategy with ``make_sgd_client_app(cfg)`` through the simulation engine."""
    torch.set_num_threads(1)
    setup = get_setup(cfg)
    holder: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = DecentralizedFedAvg(
            fraction_evaluate=0.0, num_nodes=cfg.num_nodes, node_order="partition-id", seed=cfg.seed, **kwargs
        )
        holder["strategy"] = strategy
        holder["result"] = strategy.start(grid, _split(setup.x0, _layout(cfg)), num_rounds=cfg.num_rounds)

    _run(server, make_sgd_client_app(cfg), cfg.num_nodes)
    assert "result" in holder, "the drop-in ServerApp did not finish"
    return holder["strategy"], holder["result"]


@pytest.fixture(scope="module")
def dropin_run():
    cfg = validate(CFG)
    # gossip_steps=1 and no lookahead: the native round (the defaults take more exchanges per round)
    strategy, result = _dropin(
        cfg,
        graph=cfg.graph,
        compressor=cfg.compressor,
        gamma=cfg.gamma,
        form=cfg.form,
        gossip_steps=1,
        gradient_lookahead=0.0,
    )
    return cfg, strategy, result


def test_dropin_equals_native(dropin_run):
    cfg, strategy, result = dropin_run
    ref = run_inprocess(cfg)
    got = strategy.node_vectors()
    assert len(got) == len(ref.states) == 4
    for i, state in enumerate(ref.states):
        np.testing.assert_allclose(got[i].numpy(), state.z.to(torch.float32).numpy(), atol=1e-5, rtol=0)
    x0 = get_setup(cfg).x0.numpy()
    assert all(np.abs(z.numpy() - x0).max() > 1e-3 for z in got)  # trained, and not all the same
    assert np.abs(got[0].numpy() - got[1].numpy()).max() > 1e-4
    # the peer-to-peer bits are those of the very messages the native nodes send
    assert strategy.peer_bits_sent == ref.bits_sent
    assert strategy.peer_bits_received == ref.bits_received
    # Flower moved dense float32 models both ways: 3 rounds x 4 bytes x params, per node
    dense = 8 * 4 * x0.size * cfg.num_rounds
    assert strategy.flower_bits_down == [dense] * 4 and strategy.flower_bits_up == [dense] * 4
    assert sum(strategy.peer_bits_sent) < sum(strategy.flower_bits_up) / 4
    # the Result holds the consensus model mean_i z_i
    zbar = torch.stack([z.double() for z in got]).mean(0).float().numpy()
    flat = np.concatenate([result.arrays[k].numpy().reshape(-1) for k in result.arrays])
    np.testing.assert_allclose(flat, zbar, atol=1e-6)
    metrics = result.train_metrics_clientapp[cfg.num_rounds]
    assert metrics["peer_bits_sent_per_node"] == pytest.approx(np.mean(ref.bits_sent))
    assert "train_loss" in metrics


def test_dropin_equals_native_for_the_466x_preset():
    """``DecentralizedFedAvg(preset="sp-466x")`` on the small model gives the native node models (1e-5) and bits:
    gradient-lookahead 0.5, sparsity-schedule lr over a cosine lr, top-1.2%+q:4, gamma 0.1 and the exact final
    merge, which leaves every node on the same model. The native run takes the preset's gossip and merge keys;
    weight decay 0 (an ordinary ClientApp decays the point it is sent, the shifted one; the native node decays z).
    Not bit for bit: the drop-in takes the reply minus the shift, ``(z + o - step) - o``, where the native node
    computes ``z - step``; the two round differently in the last bit."""
    keys = PRESETS["sp-466x"].keys
    switches = {k: keys[k] for k in PRESET_ARGS if k in keys}
    assert switches["gradient-lookahead"] == 0.5 and switches["sparsity-schedule"] == "lr" and switches["final-merge"]
    cfg = validate(CFG | switches | {"weight-decay": 0.0, "num-rounds": 4})
    assert cfg.compressor == "topk:0.012+q:4" and cfg.gamma == 0.1 and cfg.lr_schedule == "cosine"
    strategy, result = _dropin(cfg, preset="sp-466x")
    assert strategy.gradient_lookahead == 0.5 and strategy.sparsity_schedule == "lr" and strategy.gossip_steps == 1
    assert strategy.merges_done == [cfg.num_rounds - 1]  # the final merge ran, once
    with torch_threads(1):  # the ClientApp's thread count: the same float order
        ref = run_inprocess(cfg)
    got = strategy.node_vectors()
    for i, state in enumerate(ref.states):
        np.testing.assert_allclose(got[i].numpy(), state.z.float().numpy(), atol=1e-5, rtol=0)
    assert strategy.peer_bits_sent == ref.bits_sent and strategy.peer_bits_received == ref.bits_received
    x0 = get_setup(cfg).x0.numpy()
    assert all(np.abs(z.numpy() - x0).max() > 1e-3 for z in got)
    assert all(torch.equal(z, got[0]) for z in got)  # the exact merge: every node on the average
    assert sum(s.y for s in strategy.states) == pytest.approx(cfg.num_nodes, abs=1e-9)
    # the kept fraction followed the cosine lr: the first round's messages are larger than the last one's
    assert compressor_at(cfg, 0) != compressor_at(cfg, cfg.num_rounds - 1)


def test_dropin_quantized_periodic_merges_equal_native():
    """Periodic 4-bit merges with feedback (merge-every 2) and the final one, as arguments: drop-in == native, bit
    for bit (no lookahead: the same arithmetic on both sides)."""
    merges = {"merge-every": 2, "merge-bits": 4, "merge-feedback": True, "final-merge": True}
    cfg = validate(CFG | merges | {"num-rounds": 5})
    gossip = {"graph": cfg.graph, "compressor": cfg.compressor, "gamma": cfg.gamma, "form": cfg.form}
    merge_args = {PRESET_ARGS[k]: v for k, v in merges.items()}
    strategy, _ = _dropin(cfg, gossip_steps=1, gradient_lookahead=0.0, **gossip, **merge_args)
    assert strategy.merges_done == [1, 3, 4]
    with torch_threads(1):
        ref = run_inprocess(cfg)
    for i, state in enumerate(ref.states):
        np.testing.assert_array_equal(strategy.node_vectors()[i].numpy(), state.z.float().numpy())
    assert strategy.peer_bits_sent == ref.bits_sent
    assert sum(s.y for s in strategy.states) == pytest.approx(cfg.num_nodes, abs=1e-9)


def test_mass_conserved_on_server_states(dropin_run):
    cfg, strategy, _ = dropin_run
    m = strategy.mass()
    assert m["y_in_transit"] > 0  # the last round's messages wait in the router
    assert m["y_total"] == pytest.approx(cfg.num_nodes, abs=1e-9)
    # deliver what is in transit: the nodes then hold all the mass, sum_i y_i = n
    for i, node in enumerate(strategy.nodes):
        inbox, bounced = strategy.router.collect(i)
        assert not bounced and not node.begin(cfg.num_rounds, inbox)
    assert sum(s.y for s in strategy.states) == pytest.approx(cfg.num_nodes, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"fraction_train": 1.5}, "fraction_train"),
        ({"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ({"min_available_nodes": 1}, "min_available_nodes"),
        ({"num_nodes": 1}, "num_nodes"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 2}, "gamma"),
        ({"form": "bogus"}, "form"),
        ({"graph": "hypercube"}, "hypercube"),
        ({"graph": 7}, "graph"),
        ({"compressor": "topk:2.5"}, "compressor"),
        ({"compressor": 3}, "compressor"),
        ({"node_order": "random"}, "node_order"),
        ({"arrayrecord_key": ""}, "arrayrecord_key"),
        ({"arrayrecord_key": "x", "configrecord_key": "x"}, "differ"),
        ({"network": Network(churn=0.1)}, "churn"),
        ({"seed": -1}, "seed"),
        ({"train_metrics_aggr_fn": 5}, "train_metrics_aggr_fn"),
    ],
)
def test_bad_arguments_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecentralizedFedAvg(**kwargs)


def test_setup_rejects_mismatches():
    from flower_sparsepush.core.topology import make_graph

    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "steps": Array(np.zeros(1, np.int64))})
    s = DecentralizedFedAvg(graph=make_graph("ring", 3))
    with pytest.raises(ValueError, match="3 nodes"):
        s.setup([11, 12], arrays)
    s = DecentralizedFedAvg()
    with pytest.raises(ValueError, match="no floating-point"):
        s.setup([1, 2], ArrayRecord({"k": Array(np.zeros(3, np.int64))}))
    s.setup([5, 9, 7], arrays)  # non-floating arrays are passed through, not mixed
    assert s.x0.shape == (6,) and s.mass()["y_total"] == 3
    with pytest.raises(ValueError, match="shape"):
        s._flatten(ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)), "steps": Array(np.zeros(1, np.int64))}))
    bad = np.zeros((2, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):  # a broken node's NaN model is refused, not mixed in
        s._flatten(ArrayRecord({"w": Array(bad), "steps": Array(np.zeros(1, np.int64))}))


def test_example_app_one_line_and_runs(tmp_path, monkeypatch, fresh_ray):
    server_file = EXAMPLE / "dropin_example" / "server_app.py"
    fedavg_file = EXAMPLE / "dropin_example" / "server_app_fedavg.py"
    diff = [
        d
        for d in difflib.unified_diff(
            fedavg_file.read_text().splitlines(), server_file.read_text().splitlines(), lineterm="", n=0
        )
        if d[:1] in "+-" and not d.startswith(("+++", "---"))
    ]
    assert len(diff) == 2, diff  # one line out, one line in
    assert "strategy = FedAvg(" in diff[0] and "Decentralized" not in diff[0]
    assert "DecentralizedFedAvg(" in diff[1]

    # run the example unchanged: its own ServerApp and ClientApp objects, 4 nodes, 2 rounds
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLE), *sys.path]))  # for the Ray workers
    monkeypatch.chdir(tmp_path)  # the example saves final_model.pt in the working directory
    from dropin_example import client_app, server_app, task

    monkeypatch.setitem(task.DEFAULTS, "num-server-rounds", 2)
    made: list[DecentralizedFedAvg] = []

    class Recording(DecentralizedFedAvg):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(server_app, "DecentralizedFedAvg", Recording)
    _run(server_app.app, client_app.app, 4)
    assert len(made) == 1, "the example's ServerApp did not build the drop-in strategy"
    s = made[0]
    assert s.n == 4
    assert all(torch.isfinite(z).all() for z in s.node_vectors())
    assert min(s.peer_bits_sent) > 0 and all(b % 8 == 0 for b in s.peer_bits_sent)
    assert s.mass()["y_total"] == pytest.approx(4, abs=1e-9)
    assert not s.failures
    state = torch.load(tmp_path / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_quickstart_example_differs_from_fedavg_in_the_strategy_line_only():
    """examples/quickstart-dropin (docs/results.md): FedAvg and DecentralizedFedAvg with its defaults untouched."""
    app = EXAMPLE.parent / "quickstart-dropin" / "quickstart_dropin"
    old = (app / "server_app_fedavg.py").read_text().splitlines()
    new = (app / "server_app.py").read_text().splitlines()
    diff = [
        d for d in difflib.unified_diff(old, new, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")
    ]
    assert diff == [
        '-    strategy = FedAvg(fraction_train=1.0, min_available_nodes=cfg["num-nodes"])',
        '+    strategy = DecentralizedFedAvg(fraction_train=1.0, min_available_nodes=cfg["num-nodes"])',
    ]


def test_dropin_reports_its_consensus_as_the_native_routers_do(dropin_run):
    """The typed report: the same EvalReport (consensus model, distance, mass) the native ServerApp reads."""
    cfg, strategy, _ = dropin_run
    ev = strategy.consensus(cfg.num_rounds)  # (an earlier test delivered what was in transit: the states moved)
    zs = np.stack([z.double().numpy() for z in strategy.node_vectors()])
    np.testing.assert_allclose(ev.zbar, zs.mean(0), atol=1e-6)
    assert ev.consensus_distance == pytest.approx(float(((zs - zs.mean(0)) ** 2).sum(1).mean()), rel=1e-9)
    assert ev.consensus_distance > 0 and ev.num_evaluated == cfg.num_nodes
    assert ev.y_nodes + ev.y_mailboxes == pytest.approx(cfg.num_nodes, abs=1e-9)
    rep = strategy.report()
    assert rep.bits_sent == strategy.peer_bits_sent and rep.bits_received == strategy.peer_bits_received

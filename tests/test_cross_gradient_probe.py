"""simulations/cross_gradient_probe.py: bad input is refused with what to type; the control's second batch is the
node's own data but another batch; the relayed gradient is the previous round's in-neighbour's, exact with ``none``,
and with a compressor its error feedback loses nothing (sent + error = the gradients) and its bits are the encoded
payloads (its swap and in-neighbour are tested in tests/test_gradient_swap.py)."""

import pytest
import torch
from flower_sparsepush.simulations.cross_gradient_probe import Relay, main, second_source
from flower_sparsepush.simulations.gradient_swap import in_neighbour

from flower_sparsepush.core.codec import Message, encode
from flower_sparsepush.core.compression import make_compressor
from flower_sparsepush.core.topology import make_graph
from flower_sparsepush.learn.transforms import normalize
from flower_sparsepush.run import node_train
from flower_sparsepush.run.config import validate
from flower_sparsepush.run.setup import get_setup


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--seeds", "zero"], "comma-separated whole numbers"),
        (["--mix", "self", "--grad-compressor", "topk:0.001"], "not with --mix self"),
        (["--mix", "relay", "--grad-compressor", "topk:2.5"], "--grad-compressor"),
        (["--mix", "other"], "invalid choice"),
    ],
)
def test_bad_input_is_refused(capsys, argv, says):
    with pytest.raises(SystemExit):
        main(argv)
    assert says in capsys.readouterr().err


def test_the_controls_second_batch_is_the_nodes_own_data_but_another_batch():
    setup = get_setup(validate({"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "graph": "exponential",
                                "num-rounds": 3, "batch-size": 8}))  # fmt: skip
    aug = torch.Generator()
    j, other = second_source(setup, 2, 1, "self")
    assert j == 2 and other.shards is setup.shards and other.schedule.seed != setup.schedule.seed
    first, second = node_train.node_batch(setup, 2, 1, 0, aug), node_train.node_batch(other, 2, 1, 0, aug)
    assert not torch.equal(first[0], second[0])
    x, y = setup.shards[2]
    rows = normalize(x, setup.ds.mean, setup.ds.std).reshape(len(y), -1)
    for xb, yb in (first, second):  # every example of either batch is one of node 2's, with its label
        for xr, yr in zip(xb.reshape(len(yb), -1), yb, strict=True):
            hits = (rows == xr).all(dim=1)
            assert hits.any() and bool((y[hits] == yr).all())
    assert second_source(setup, 2, 1, "neighbour") == (in_neighbour(setup.graph, 1, 2), setup)


def test_relayed_gradients_are_the_previous_rounds_in_neighbours_and_exact_without_a_compressor():
    g, relay = make_graph("exponential", 8), Relay(8)
    grads = {
        (n, r): torch.randn(50, generator=torch.Generator().manual_seed(100 * r + n))
        for n in range(8)
        for r in range(5)
    }
    for r in range(5):
        for n in range(8):
            relay.record(n, r, grads[(n, r)])
        for n in range(8):
            got = relay.received(g, n, r)
            if r == 0:
                assert got is None
            else:
                j = in_neighbour(g, r - 1, n)
                assert torch.equal(got, grads[(j, r - 1)])
    assert all(b > 0 for b in relay.bits)


def test_compressed_relays_lose_nothing_to_error_feedback_and_count_the_encoded_bits():
    g, spec = make_graph("exponential", 4), "topk:0.1+q:4"
    relay = Relay(4, spec)
    total = torch.zeros(4, 200, dtype=torch.float64)
    sent = torch.zeros(4, 200, dtype=torch.float64)
    expected_bits = [0] * 4
    for r in range(6):
        for n in range(4):
            v = torch.randn(200, generator=torch.Generator().manual_seed(10 * r + n), dtype=torch.float64)
            relay.record(n, r, v)
            if r < 5:  # what round 5 records is never relayed
                total[n] += v
        if r == 0:
            continue
        for n in range(4):
            j = in_neighbour(g, r - 1, n)
            before = relay.error[j]
            got = relay.received(g, n, r)
            sent[j] += got.to(torch.float64)
            u = relay.own[(j, r - 1)].to(torch.float64) + (0 if before is None else before)
            c = make_compressor(spec)(u)
            expected_bits[j] += 8 * len(encode(Message(j, r - 1, 0.0, 0.0, c)))
            assert torch.count_nonzero(got) <= 20
    for n in range(4):
        assert torch.allclose(sent[n] + relay.error[n], total[n], atol=1e-5)
    assert relay.bits == expected_bits


def test_the_copy_is_held_by_the_node_it_sends_to_and_states_are_recorded_then_restored():
    from flower_sparsepush.simulations.cross_gradient_probe import out_neighbour, recorded_states

    from flower_sparsepush.run.inprocess import run_inprocess

    g = make_graph("exponential", 16)
    assert [out_neighbour(g, r, 3) for r in range(4)] == [4, 5, 7, 11]
    with pytest.raises(SystemExit, match="has 3 out-neighbours"):
        out_neighbour(make_graph("complete", 4), 0, 0)
    train, states = node_train.train, {}
    cfg = validate({"dataset": "synthetic", "model": "mlp", "num-nodes": 4, "graph": "exponential", "num-rounds": 3,
                    "compressor": "topk:0.2", "gamma": 0.2})  # fmt: skip
    with recorded_states(states):
        res = run_inprocess(cfg)
    assert node_train.train is train and sorted(states) == [0, 1, 2, 3]
    for i, st in states.items():  # the live states the run ended with (the ref form holds copies of in-neighbours)
        assert torch.equal(st.x, res.states[i].x) and st.refs_in


def test_the_partner_is_the_one_node_the_exponential_graph_links_both_ways():
    setup = get_setup(validate({"dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "exponential",
                                "num-rounds": 3}))  # fmt: skip
    g = setup.graph
    for i in range(8):
        j, other = second_source(setup, i, 5, "partner")
        assert other is setup and j == (i + 4) % 8
        both_ways = [r for r in range(3) if g.out_of(r, i) == [j] and g.out_of(r, j) == [i]]
        assert both_ways == [2]  # the round of shift n/2, and no other node shares an edge both ways with i
        assert all(k == j or not any(i in g.out_of(r, k) and k in g.out_of(r2, i) for r in range(3) for r2 in range(3))
                   for k in range(8) if k != i)  # fmt: skip
    ring = get_setup(
        validate({"dataset": "synthetic", "model": "mlp", "num-nodes": 8, "graph": "ring", "num-rounds": 3})
    )
    with pytest.raises(SystemExit, match="needs the exponential graph"):
        second_source(ring, 0, 0, "partner")

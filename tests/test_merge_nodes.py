"""A merge computed by the nodes (core/merge_nodes.py) through the relay's bookkeeping (core/merge_relay.py) is the
merge of core/merge.py, message by message; the relay refuses merge replies that are not what an honest node sends,
and a node that takes no part keeps its mass and learns the new base."""

import math

import pytest
import torch

from flower_sparsepush.core.guard import BadReply
from flower_sparsepush.core.merge import merge, merge_traffic
from flower_sparsepush.core.merge_nodes import DEVIATION, apply, catch_up, contribute, owners, reduce
from flower_sparsepush.core.merge_relay import MergeRelay, count
from flower_sparsepush.core.pushsum import NodeState

SEGMENTS = [40, 7, 153]
D = sum(SEGMENTS)


def _states(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((s,), f) for s, f in zip(SEGMENTS, (1.0, 0.01, 30.0))])
    out = []
    for i in range(n):
        y = 0.3 + float(torch.rand(1, generator=g))
        s = NodeState(x=(y * torch.randn(D, generator=g) * scale).float(), y=y)
        s.refs_out = {(i + 1) % n: torch.randn(D, generator=g)}
        s.refs_in = {(i - 1) % n: torch.randn(D, generator=g)}
        out.append(s)
    return out


def _by_nodes(states, base, bits, feedback, parts, relay=None, sent=None, recv=None):
    """One merge among ``parts`` through the relay, every node doing its part."""
    relay = relay or MergeRelay(len(states), SEGMENTS, bits, "ref")
    relay.open(0, parts)
    for i in parts:
        relay.give(i, contribute(states[i], base, bits, SEGMENTS, i, 0, "ref", feedback), states[i].y)
    orders, transfers = relay.assign()
    for owner, segs in orders.items():
        relay.take_average(
            owner, [(k, reduce(states[owner], k, SEGMENTS, bits, c, owner, 0, "ref", feedback)) for k, c in segs]
        )
    outcome = relay.close()
    for i in parts:
        transfers += relay.transfers(i, outcome)
        apply(states[i], outcome.averages, base, bits, SEGMENTS, "ref", outcome.participants)
    if sent is not None:
        count(transfers, sent, recv)
    return outcome


@pytest.mark.parametrize("bits, feedback", [(32, False), (8, False), (4, True)])
def test_the_nodes_compute_the_merge_of_merge_py(bits, feedback):
    ref, mine = _states(), _states()
    base = torch.randn(D)
    owner_err = torch.zeros(D, dtype=torch.float64) if feedback else None
    for _ in range(3):  # three merges: the feedback residuals of both sides carry over
        m = merge(ref, base, bits, SEGMENTS, "ref", owner_err)
        sent, recv = [0] * 5, [0] * 5
        _by_nodes(mine, base, bits, feedback, list(range(5)), sent=sent, recv=recv)
        for a, b in zip(ref, mine):
            torch.testing.assert_close(b.x, a.x, rtol=0, atol=1e-6)
            assert b.y == pytest.approx(a.y, abs=1e-15)
            torch.testing.assert_close(b.merge_base, m, rtol=0, atol=1e-6)
            assert all(torch.equal(r, b.merge_base) for r in [*b.refs_out.values(), *b.refs_in.values()])
            if feedback:
                torch.testing.assert_close(b.merge_err, a.merge_err, rtol=0, atol=1e-9)
        if feedback:  # the owners' residuals, each kept by the owner of its segment, add up to merge.py's one
            held = sum(s.owner_err for s in mine if s.owner_err is not None)
            torch.testing.assert_close(held, owner_err, rtol=0, atol=1e-9)
        assert sum(sent) == sum(recv) == merge_traffic(5, bits, SEGMENTS)
        base = m
        for s in ref + mine:  # the nodes move apart again before the next merge
            s.x = s.x + 0.1 * s.y


def test_owners_balance_the_values_and_cover_every_segment():
    assert owners([100, 1, 50, 60], [7, 2, 5]) == [2, 7, 7, 5]  # 100 -> 2, 60 -> 5, 50 -> 7, 1 -> the least: 7
    assert owners(SEGMENTS, [3]) == [3, 3, 3]
    with pytest.raises(ValueError, match="at least one participant"):
        owners(SEGMENTS, [])


def test_a_node_offline_at_a_merge_keeps_its_mass_and_learns_the_base():
    states = _states()
    base = torch.randn(D)
    sum_y = sum(s.y for s in states)
    kept = states[2].x.clone(), states[2].y, states[1].refs_out[2].clone(), states[3].refs_in[2].clone()
    outcome = _by_nodes(states, base, 8, False, [0, 1, 3, 4])
    assert outcome.participants == [0, 1, 3, 4] and 2 not in outcome.owners
    assert sum(s.y for s in states) == pytest.approx(sum_y, abs=1e-12)  # the weight is exact
    assert torch.equal(states[2].x, kept[0]) and states[2].y == kept[1]
    # the edges to and from the absent node keep their references at both ends; the others take the merged model
    assert torch.equal(states[1].refs_out[2], kept[2]) and torch.equal(states[3].refs_in[2], kept[3])
    assert torch.equal(states[1].refs_in[0], states[1].merge_base)
    catch_up(states[2], outcome.averages, base, 8, SEGMENTS)
    assert torch.equal(states[2].merge_base, states[0].merge_base)


def _relay_with_contributions(bits=8):
    states = _states()
    relay = MergeRelay(5, SEGMENTS, bits, "ref")
    relay.open(3, range(5))
    frames = {i: contribute(states[i], torch.zeros(D), bits, SEGMENTS, i, 3, "ref") for i in range(5)}
    return states, relay, frames


@pytest.mark.parametrize(
    "bad, kind",
    [
        (lambda f, s: f[:-1], "destinations"),  # a segment missing
        (lambda f, s: [f[0], f[0], f[2]], "destinations"),  # a segment twice
        (lambda f, s: [(k, d + b"\0") for k, d in f], "size"),
        (lambda f, s: [(k, d[:2] + b"\7" + d[3:]) for k, d in f], "message"),  # a wrong codec version
        (lambda f, s: contribute(s[1], torch.zeros(D), 8, SEGMENTS, 1, 3, "ref"), "sender"),
        (lambda f, s: contribute(s[0], torch.zeros(D), 8, SEGMENTS, 0, 4, "ref"), "round"),
        (lambda f, s: contribute(s[0], torch.zeros(D), 4, SEGMENTS, 0, 3, "ref"), "size"),
        (lambda f, s: contribute(s[0], torch.zeros(D), 8, SEGMENTS, 0, 3, "ref-x"), "message"),
    ],
)
def test_the_relay_refuses_a_contribution_that_an_honest_node_cannot_send(bad, kind):
    states, relay, frames = _relay_with_contributions()
    with pytest.raises(BadReply) as err:
        relay.give(0, bad(frames[0], states), states[0].y)
    assert err.value.kind == kind
    relay.give(0, frames[0], states[0].y)  # the honest one is still taken
    with pytest.raises(BadReply, match="already given"):
        relay.give(0, frames[0], states[0].y)


def test_the_relay_refuses_a_weight_the_node_does_not_hold_and_an_average_of_the_wrong_weight():
    states, relay, frames = _relay_with_contributions()
    for y in (states[0].y * 2, math.nan, -1.0):
        with pytest.raises(BadReply) as err:
            relay.give(0, frames[0], y)
        assert err.value.kind == "weight"
    for i in range(5):
        relay.give(i, frames[i], states[i].y)
    orders, _ = relay.assign()
    owner, segs = next(iter(orders.items()))
    good = [(k, reduce(states[owner], k, SEGMENTS, 8, c, owner, 3, "ref")) for k, c in segs]
    light = [(k, reduce(states[owner], k, SEGMENTS, 8, c[1:], owner, 3, "ref")) for k, c in segs]  # one left out
    with pytest.raises(BadReply) as err:
        relay.take_average(owner, light)
    assert err.value.kind == "weight"
    other = next(o for o in orders if o != owner)
    with pytest.raises(BadReply) as err:
        relay.take_average(other, good)  # not its segments (and not from it)
    assert err.value.kind in ("destinations", "sender")
    relay.take_average(owner, good)
    assert relay.close().averages is None  # the other owners have not answered: called off


def test_a_give_batch_handed_again_is_absorbed_once_and_a_train_batch_is_not_mistaken_for_it():
    from flower_sparsepush.flower.protocol import MERGE_BATCH, absorbs

    t = 5  # the node finished round 5 and absorbed the give batch of the merge after it
    assert not absorbs(MERGE_BATCH + t, done=t, absorbed=t)  # its give reply was lost: handed again, not absorbed
    assert absorbs(MERGE_BATCH + t, done=t, absorbed=t - 2)  # it never ran that give: absorbed now
    assert absorbs(t + 1, done=t, absorbed=t)  # round 6's batch, handed again after a lost train reply
    assert not absorbs(t, done=t, absorbed=-1)  # a round it finished


# --------------------------------------------------------------------------- the value bound on merge messages


def _bounded_merge(states, base, bits, bound, feedback=False):
    relay = MergeRelay(len(states), SEGMENTS, bits, "ref", bound=bound)
    relay.open(0, list(range(len(states))))
    for i, s in enumerate(states):
        relay.give(i, contribute(s, base, bits, SEGMENTS, i, 0, "ref", feedback, bound), s.y)
    orders, _ = relay.assign()
    for owner, segs in orders.items():
        avgs = [(k, reduce(states[owner], k, SEGMENTS, bits, c, owner, 0, "ref", feedback, bound)) for k, c in segs]
        relay.take_average(owner, avgs)
    outcome = relay.close()
    for i in range(len(states)):
        apply(states[i], outcome.averages, base, bits, SEGMENTS, "ref", outcome.participants)
    return outcome


@pytest.mark.parametrize("bits, feedback", [(32, False), (8, False), (4, True)])
def test_a_bound_that_binds_clips_honest_merges_and_the_relay_accepts_them(bits, feedback):
    """With a bound far below the nodes' values (segment 2 holds values up to ~100, the bound is 0.5), every honest
    node clips what it sends to merge_nodes.value_limit, so the relay refuses nothing, and the merged model is
    within the bound (exact) or within the deviation limit of the base (quantized); a bound that never binds is bit
    for bit the merge without one."""
    bound = 0.5
    states, base = _states(), torch.zeros(D)
    for _ in range(2):  # the second merge starts from a clipped base and fed-back residuals
        _bounded_merge(states, base, bits, bound, feedback)
        m = states[0].z
        limit = bound if bits == 32 else DEVIATION * bound
        assert float(m.abs().max()) <= limit * (1 + 1e-5) and torch.isfinite(m).all()
        base = states[0].merge_base.float()
    free, loose = _states(), _states()
    _bounded_merge(free, torch.zeros(D), bits, None, feedback)
    _bounded_merge(loose, torch.zeros(D), bits, 1e6, feedback)
    assert all(torch.equal(a.x, b.x) and a.y == b.y for a, b in zip(free, loose))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("value", [1e30, 3e38, float("nan")])
def test_the_relay_refuses_merge_messages_beyond_the_bound(bits, value):
    """A contribution or an average whose values are beyond its limit (of the weight it carries) is refused as kind
    "bound" (NaN already by the codec, as "message") before the relay keeps anything of it; the same contribution
    within the limit is taken."""
    kind = "message" if math.isnan(value) else "bound"
    bound, states, base = 10.0, _states(), torch.zeros(D)
    relay = MergeRelay(5, SEGMENTS, bits, "ref", bound=bound)
    relay.open(0, [0, 1, 2, 3, 4])
    honest = contribute(states[0], base, bits, SEGMENTS, 0, 0, "ref", False, bound)
    forged = list(honest)
    forged[1] = (1, _forge(honest[1][1], value, bits))
    with pytest.raises(BadReply) as err:
        relay.give(0, forged, states[0].y)
    assert err.value.kind == kind and 0 not in relay.given
    relay.give(0, honest, states[0].y)
    for i in range(1, 5):
        relay.give(i, contribute(states[i], base, bits, SEGMENTS, i, 0, "ref", False, bound), states[i].y)
    orders, _ = relay.assign()
    owner, segs = next(iter(orders.items()))
    avgs = [(k, reduce(states[owner], k, SEGMENTS, bits, c, owner, 0, "ref", False, bound)) for k, c in segs]
    bad = [(avgs[0][0], _forge(avgs[0][1], value, bits))] + avgs[1:]
    with pytest.raises(BadReply) as err:
        relay.take_average(owner, bad)
    assert err.value.kind == kind
    relay.take_average(owner, avgs)


def _forge(data: bytes, value: float, bits: int) -> bytes:
    """A merge message re-encoded with every value ``value`` (exact) or its quantization scale ``value``."""
    import numpy as np

    from flower_sparsepush.core.codec import Message, decode, encode
    from flower_sparsepush.core.compression import Compressed

    m = decode(data)
    c = m.payload
    if bits == 32:
        p = Compressed(c.dim, None, values=np.full(c.dim, value, np.float32))
    else:
        p = Compressed(c.dim, None, codes=c.codes, scale=value, bits=c.bits)
    return encode(Message(m.sender, m.round, m.a, m.y, p, form=m.form))

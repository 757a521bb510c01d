"""The relay's delivery ledger (core/ledger.py): what a node was handed stays held until the node acknowledges it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_sparsepush.core.codec import Message, encode
from flower_sparsepush.core.compression import Identity
from flower_sparsepush.core.ledger import DeliveryLedger


def msg(sender: int, rnd: int, y: float) -> bytes:
    return encode(Message(sender, rnd, 0.5, y, Identity()(torch.ones(3, dtype=torch.float64))))


def test_what_a_node_was_handed_is_held_and_handed_again_until_it_acknowledges():
    led = DeliveryLedger(3)
    a, b, back = [(1, msg(1, 0, 0.25))], [(2, msg(2, 1, 0.125))], [(1, msg(0, 0, 0.5))]
    assert led.hand(0, 1, 0, a, []) == ([], [])
    assert led.awaiting == {0: 1} and led.handed(0) == a
    led.straggle(0, 1, "no reply within the round timeout")
    # round 2: the round-0 inbox is handed again (redo), before the new inbox, and both are held
    redo, redo_bounced = led.hand(0, 2, 1, b, back)
    assert (redo, redo_bounced) == ([(0, a)], []) and led.handed(0) == a + b
    assert led.unacked[0] == [(0, a, []), (1, b, back)]
    event = led.straggle(0, 2, "error: boom")
    assert event["y_held"] == pytest.approx(0.875) and event["y_inbox"] == pytest.approx(0.625)
    assert led.handed(0) == []  # a straggler's reply is never read: nothing to reject against
    assert led.hand(0, 3, 2, [], []) == ([(0, a), (1, b)], [(1, back)])
    assert led.answer(0, 3)
    led.acknowledge(0, 2)  # a good reply for round 2: everything handed so far is absorbed
    assert led.acked[0] == 2 and led.unacked[0] == [] and led.awaiting == {}
    assert led.hand(0, 4, 3, [], []) == ([], [])
    assert led.not_returned() == [0]


def test_resent_outboxes_are_routed_once():
    """A node may resend the outboxes of the rounds it was handed since its last good reply, before the reply's
    own round; once routed (acknowledged) none of them again (the relay refuses a reply that does: test_guard.py)."""
    led = DeliveryLedger(2)
    for server_round, rnd in ((1, 0), (2, 1), (3, 2), (5, 4)):  # (offline in round 3: no train message)
        led.hand(0, server_round, rnd, [], [])
    assert led.resendable(0, 4) == [0, 1, 2]  # not the reply's own round, nor rounds it was not handed
    led.acknowledge(0, 1)
    led.hand(0, 6, 5, [], [])
    assert led.resendable(0, 5) == []
    assert led.resendable(1, 5) == []


def test_one_answer_per_train_message_and_the_silent_ones():
    led = DeliveryLedger(4)
    for p in (2, 0, 1):
        led.hand(p, 5, 4, [], [])
    assert not led.answer(3, 5)  # never asked
    assert not led.answer(0, 4)  # asked in another round
    assert led.answer(0, 5) and not led.answer(0, 5)  # a second reply to one train message
    assert led.answer(1, 5, error=True) and not led.answer(1, 5)
    assert led.awaiting == {2: 5, 1: 5}  # an error is no answer; node 0 answered
    assert led.unanswered(5) == [2] and led.replied(5) == 2
    assert led.unanswered(6) == [] and led.replied(6) == 0


def test_rejections_keep_what_was_handed_until_they_are_bounced():
    led = DeliveryLedger(2)
    inbox = [(1, msg(1, 0, 0.25))]
    led.hand(0, 1, 0, inbox, [])
    led.answer(0, 1)
    led.acknowledge(0, 0, keep_handed=True)
    assert led.take_handed(0) == inbox and led.take_handed(0) == []
    led.hand(0, 2, 1, inbox, [])
    led.acknowledge(0, 1)
    assert led.handed(0) == []


def test_exclusion_lets_the_mass_go_and_unabsorbed_weight():
    led = DeliveryLedger(3)
    led.hand(0, 1, 0, [(1, msg(1, 0, 0.25))], [])
    led.hand(0, 2, 1, [(2, msg(2, 1, 0.5))], [(1, msg(0, 0, 0.125))])
    led.hand(1, 2, 1, [(0, msg(0, 1, 0.0625))], [])
    # node 0 reports having finished round 0: its round-1 batch is absorbed by nobody yet
    assert led.unabsorbed_weight({0: 0, 1: 1}) == pytest.approx(0.625)
    led.exclude(0)
    assert led.unacked[0] == [] and 0 not in led.awaiting and led.unabsorbed_weight({0: -1}) == 0.0


def _lists(v):
    """``v`` with every tuple a list, as a checkpoint may give it back."""
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    return [_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def test_checkpoint_keeps_its_keys_and_survives_plain_lists():
    led = DeliveryLedger(2)
    led.hand(1, 1, 0, [(0, msg(0, 0, 0.5))], [(0, msg(1, 0, 0.25))])
    led.straggle(1, 1, "no reply within the round timeout")
    led.acknowledge(0, 0)
    d = led.state_dict()
    assert list(d) == ["acked", "unacked", "stragglers"]
    again = DeliveryLedger(2)
    again.load_state_dict(_lists(d))
    assert again.acked == [0, -1] and again.unacked == led.unacked and again.stragglers == led.stragglers
    assert again.state_dict() == d


EVENTS = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(["good", "error", "silent", "refused"]), st.floats(0.01, 1.0)),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS)
def test_handed_weight_is_acknowledged_or_held(events):
    """The invariant: every weight handed to a node since its last good reply is in ``unacked``."""
    led = DeliveryLedger(3)
    handed = [0.0] * 3  # handed since the last acknowledgement, counted here independently
    for server_round, (p, outcome, y) in enumerate(events, start=1):
        rnd = server_round - 1
        led.hand(p, server_round, rnd, [((p + 1) % 3, msg((p + 1) % 3, rnd, y))], [((p + 2) % 3, msg(p, rnd, y / 2))])
        handed[p] += 1.5 * y
        if outcome != "silent":
            assert led.answer(p, server_round, error=outcome == "error")
        if outcome == "good":
            led.acknowledge(p, rnd)
            handed[p] = 0.0
        elif outcome in ("error", "refused"):
            led.straggle(p, server_round, outcome)
        for q in range(3):
            held = led.unabsorbed_weight({q: -1})
            assert held == pytest.approx(handed[q], abs=1e-12)
        assert led.not_returned() == sorted(q for q, r in led.awaiting.items())
        assert all(led.awaiting.get(q) != server_round or q == p for q in range(3))
        if outcome in ("error", "silent"):
            assert led.awaiting[p] == server_round
        else:
            assert p not in led.awaiting

"""The fault campaign (simulations/campaign.py): honest faults and every kind of hostile reply, mixed by a seeded
schedule, at the relay's strategy level with real Flower records (no Ray). After every round the campaign itself
asserts that the push-sum mass is exact to 1e-9 and every node agrees with the relay's weight ledger, that no honest
node was refused, excluded or had to reject a message, and that every refusal is an injected attack charged to its
hostile node with an expected kind (docs/reliability.md, "Fault campaign")."""

from __future__ import annotations

import pytest
import torch
from flower_sparsepush.simulations.campaign import ATTACKS, Config, markdown, run

torch.set_num_threads(1)

ROUNDS = 90


@pytest.fixture(scope="module")
def figures():
    return run(Config(seed=1), ROUNDS, reference=False)


def test_every_kind_is_injected_and_refused_at_its_hostile_node(figures):
    faults = figures["faults_injected"]
    assert all(faults.get(a, 0) >= 3 for a in ATTACKS), faults  # every attack a few times
    honest = ("message dropped (drop, link down)", "node offline (churn)", "worker crash", "reply lost or late")
    assert all(faults.get(k, 0) >= 3 for k in honest), faults
    assert figures["replies_refused"] == figures["hostile_replies"]  # each attack refused, nothing else
    assert set(figures["refused_by_node"]) <= {"3", "7"} and figures["honest_nodes_refused"] == 0
    assert figures["nodes_excluded"] == [] and figures["honest_receiver_rejections"] == 0
    assert figures["max_mass_error"] <= 1e-9
    assert "| forged y=1e308 |" in markdown(figures, "cmd")


def test_the_nodes_still_reach_the_average_of_all_initial_vectors(figures):
    """Mass exact is not enough: the numerators must stay in step too. A resent outbox routed with a newer one,
    the older message of an edge dropped and the newer delivered, moved the numerator off (consensus error 0.45 for
    good; router.Router.post now bounces the newer one too)."""
    assert figures["consensus_error"] < 1e-3


def test_the_campaign_catches_a_relay_without_the_weight_ledger():
    """The per-round checks have teeth: without the weight ledger a forged weight is routed, and the campaign
    stops at the first round that has one."""
    with pytest.raises(AssertionError, match="not all refused|mass"):
        run(Config(seed=1, ledger=False), ROUNDS, reference=False)


def test_a_new_hostile_kind_is_one_table_entry(monkeypatch):
    from flower_sparsepush.simulations import campaign

    extra = campaign.Attack(("weight",), campaign._each(y=2.0))
    monkeypatch.setitem(campaign.ATTACKS, "forged y=2", extra)
    r = run(Config(seed=2), 30, reference=False)
    assert r["faults_injected"]["forged y=2"] >= 1 and r["max_mass_error"] <= 1e-9

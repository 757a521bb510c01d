"""Would cross-gradients rescue SCSP under label skew? A diagnostic with free, exact cross-gradients.

Cross-gradient methods (CGA, Esfandiari et al. 2021; NGC, Aketi et al. 2022) let node i step along gradients of its
neighbours' data taken at its own model: node j computes the gradient of its data at its copy of ``z_i`` and sends it
back. Here node i steps along the mean of its own gradient and its in-neighbour's data gradient of this round, both at
the point where i reads its gradients (``gradient-lookahead``), with the neighbour's gradient computed exactly at that
point and exchanged for free (no bits counted, twice the SGD compute): an upper bound on what a compressed
cross-gradient could do. It is not a run-config switch; this module swaps the gradient that ``run.node_train`` hands
to ``learn.sgd.sgd_steps``, in this process only, and runs the full 20-epoch ``scsp-400x`` claims row
(``scsp-h1-q8m-klr-la5``) on ``dirichlet:0.1``. The model gossip, its bits and the final merge are the row's.

``--mix self`` is the control: the second gradient is of a second batch of the node's own data (another permutation
stream of its shard) at the same point, so each step sees twice the data and twice the compute as with
``--mix neighbour``, but nothing of the neighbour's label mix. If the control gains as much, the gain is the larger
batch, not the skew averaged out.

``--mix relay`` is what a real node can afford: no extra compute and no model copies. Each node sends, with its
model message of round t, the gradient it stepped along in round t (at its own point); the receiver steps in round
t+1 along the mean of its own gradient and that relayed one (one round stale, at the sender's point).
``--mix copy`` is the cross-gradient a real node could compute: the node i sends to this round holds a copy of i's
model (the ref form's per-edge reference, lagging and compressed) and takes its data gradient there; here it reaches
i at once and free (a directed graph has no edge back).

``--mix partner`` asks whether one fixed partner would do: on the exponential graph node i and node i + n/2 are the
only pair that send to each other (in every log2(n)-th round), so they are the only return path a real cross-gradient
has there without new edges; the partner's data gradient is taken at i's point, free, every round.

``--grad-compressor`` compresses the second gradient as the other node would send it (error feedback at the sender:
one memory per sender for ``relay``, per edge for ``neighbour`` and ``copy``; ``none`` = exact) and counts its encoded
bits per node (``extra_bits_per_node``), on top of the row's.

``--copy-lag`` measures instead how far those copies are from the models they copy, in the row itself (after 10 to
400 rounds; writes ``cross_gradient_copy_lag_s<seeds>``).

``python -m flower_sparsepush.simulations.cross_gradient_probe [--seeds 0] [--mix neighbour] [--grad-compressor none]
[--out results]`` writes ``cross_gradient_probe_s<seeds>.json`` and ``.md`` (seeds joined by ``-``; the mix and the
gradient compressor appended when not the default; about 23 minutes a seed on one thread, 12 with
``relay``).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from flower_sparsepush.simulations.gradient_swap import in_neighbour, swapped_gradient
from flower_sparsepush.simulations.report_files import write_report

ROW, PARTITION = "scsp-h1-q8m-klr-la5", "dirichlet:0.1"
MIXES = ("neighbour", "self", "relay", "copy", "partner")
SECOND_STREAM = 10**6  # offset of the seed whose permutation stream draws the control's second own batch


def second_source(setup, node: int, rnd: int, mix: str):
    """Whose batch the second gradient of ``node`` in round ``rnd`` is, and the setup that draws it: the in-neighbour's
    (``neighbour``), or the node's own from a second permutation stream of its shard (``self``, the control)."""
    if mix == "neighbour":
        return in_neighbour(setup.graph, rnd, node), setup
    if mix == "partner":  # the one node the exponential graph links both ways (i <-> i + n/2, every log2(n) rounds)
        if setup.graph.name != "exponential" or setup.n % 2:
            raise SystemExit(
                f"--mix partner needs the exponential graph on an even number of nodes, not {setup.graph.name}"
            )
        return (node + setup.n // 2) % setup.n, setup
    if mix == "self":
        return node, replace(setup, schedule=replace(setup.schedule, seed=setup.schedule.seed + SECOND_STREAM))
    raise SystemExit(f"--mix {mix!r}: one of {', '.join(MIXES)}")


class Feedback:
    """Compressed gradients with error feedback (``compressor``; ``none`` = exact): one error memory per ``key`` (a
    sender, or an edge), and ``bits[sender]`` the encoded payloads that sender sent (codec.encode)."""

    def __init__(self, n: int, compressor: str = "none"):
        from flower_sparsepush.core.compression import make_compressor

        self.compress = make_compressor(compressor)
        self.error: dict[object, torch.Tensor | None] = {}
        self.bits = [0] * n

    def send(self, key, sender: int, rnd: int, g: torch.Tensor) -> torch.Tensor:
        """What the receiver decodes of ``g`` (float32), error feedback kept under ``key``."""
        from flower_sparsepush.core.codec import Message, encode
        from flower_sparsepush.core.compression import compress_with_feedback

        c, self.error[key] = compress_with_feedback(self.compress, g.to(torch.float64), self.error.get(key))
        self.bits[sender] += 8 * len(encode(Message(sender, rnd, 0.0, 0.0, c)))
        return c.to_dense(torch.float32)


class Relay:
    """The relayed gradients of ``--mix relay``: what node i receives in round t is the gradient its round t-1
    in-neighbour j stepped along in round t-1, compressed with error feedback at j (one memory per sender)."""

    def __init__(self, n: int, compressor: str = "none"):
        self.feedback = Feedback(n, compressor)
        self.own: dict[tuple[int, int], torch.Tensor] = {}  # (node, round) -> the gradient it stepped along
        self.sent: dict[tuple[int, int], torch.Tensor] = {}  # (node, round) -> what its out-neighbour decodes

    bits = property(lambda self: self.feedback.bits)
    error = property(lambda self: [self.feedback.error.get(j) for j in range(len(self.feedback.bits))])

    def record(self, node: int, rnd: int, g: torch.Tensor) -> None:
        self.own[(node, rnd)] = g.detach().clone()
        for key in [k for k in self.own if k[1] < rnd - 1]:
            del self.own[key]

    def received(self, graph, node: int, rnd: int) -> torch.Tensor | None:
        """The relayed gradient node ``node`` steps along in round ``rnd`` (None in round 0)."""
        if rnd == 0:
            return None
        j = in_neighbour(graph, rnd - 1, node)
        key = (j, rnd - 1)
        if key not in self.sent:  # j sends to one node a round: compressed once
            self.sent[key] = self.feedback.send(j, j, rnd - 1, self.own[key])
            for old in [k for k in self.sent if k[1] < rnd - 1]:
                del self.sent[old]
        return self.sent[key]


def out_neighbour(graph, rnd: int, i: int) -> int:
    """The one node ``i`` sends to in round ``rnd`` (it holds i's model copy)."""
    outs = graph.out_of(rnd, i)
    if len(outs) != 1:
        raise SystemExit(f"graph {graph.name}: node {i} has {len(outs)} out-neighbours in round {rnd}; need one")
    return outs[0]


@contextmanager
def recorded_states(states: dict[int, object]):
    """Within the block, ``states[node]`` is the state ``run.node_train.train`` last trained for ``node``."""
    from flower_sparsepush.run import node_train

    train = node_train.train

    def train_here(setup, state, node, rnd):
        states[node] = state
        return train(setup, state, node, rnd)

    node_train.train = train_here
    try:
        yield
    finally:
        node_train.train = train


def run_seed(seed: int, mix: str = "neighbour", grad_compressor: str = "none") -> dict[str, Any]:
    from flower_sparsepush.simulations.claims import plan, run_row

    from flower_sparsepush.learn.seeds import generator
    from flower_sparsepush.run.node_train import node_gradient

    relay, feedback, states = Relay(16, grad_compressor), Feedback(16, grad_compressor), {}

    def wrap_relay(gradient, setup, node, rnd):
        def relayed(point, k):
            g, loss = gradient(point, k)
            relay.record(node, rnd, g)
            gj = relay.received(setup.graph, node, rnd)
            return (g if gj is None else 0.5 * (g + gj)), loss

        return relayed

    def wrap(gradient, setup, node, rnd):
        if mix == "relay":
            return wrap_relay(gradient, setup, node, rnd)
        if mix == "copy":  # the node it sends to, at its copy of this node's model
            j, other = out_neighbour(setup.graph, rnd, node), setup
            copy = states[j].refs_in.get(node) if j in states else None
        else:
            (j, other), copy = second_source(setup, node, rnd, mix), None
        aug = generator(setup.schedule.seed, j, "aug", rnd + 10**6)  # the second batch's own augmentation

        def cross(point, k):
            g, loss = gradient(point, k)
            if mix == "copy" and copy is None:  # no copy yet: the node's own gradient alone
                return g, loss
            gj, _ = node_gradient(other, point if copy is None else copy.to(torch.float32), j, rnd, k, aug)
            if mix != "self":
                gj = feedback.send((j, node), j, rnd, gj)
            return 0.5 * (g + gj), loss

        return cross

    spec = next(
        s for s in plan(["fashion_mnist"], False, (seed,)) if s["id"] == f"fashion_mnist/{PARTITION}/{ROW}/s{seed}"
    )
    with swapped_gradient(wrap), recorded_states(states):
        r = run_row(spec | {"evals": 4}, "cross_gradient_probe")
    keep = ("id", "seed", "acc_consensus", "acc_node_mean", "acc_node_min", "val_acc_consensus", "bits_per_node")
    bits = relay.bits if mix == "relay" else feedback.bits
    extra = sum(bits) / len(bits) if mix != "self" else 0.0
    return {k: r[k] for k in keep + ("wall_s",)} | {
        "mix": mix,
        "grad_compressor": grad_compressor if mix != "self" else None,
        "extra_bits_per_node": extra,
        "history": r["history"],
    }


SECOND = {
    "neighbour": "its in-neighbour's data gradient at its own point (free, exact)",
    "self": "the gradient of a second batch of its own data at its own point (the control)",
    "relay": "the gradient its previous round's in-neighbour stepped along (relayed, one round stale)",
    "copy": "the data gradient of the node it sends to, at that node's (lagging) copy of its model",
    "partner": "the data gradient of its fixed partner i + n/2 (the one edge the exponential graph has both ways)",
}


LAG_ROUNDS = (10, 50, 100, 200, 400)


def copy_lag(seed: int, rounds: tuple[int, ...] = LAG_ROUNDS) -> list[dict[str, Any]]:
    """How far the copy a node's out-neighbour holds of its model is from the model, in the row itself (no swap):
    after each of ``rounds``, the median and largest ``|copy - z_i| / |z_i|`` over the nodes, and the nodes' mean
    distance to their average, for scale. Stops after the last of ``rounds``."""
    from flower_sparsepush.simulations.claims import plan, run_row

    class Done(Exception):
        pass

    states, out = {}, []

    def after(setup, node, rnd, z):
        if node != setup.n - 1 or rnd not in rounds:
            return
        rel, dist = [], []
        for i in range(setup.n):
            copy = states[out_neighbour(setup.graph, rnd, i)].refs_in.get(i)
            zi = states[i].z.to(torch.float32)
            if copy is not None:
                dist.append(float((copy.to(torch.float32) - zi).norm()))
                rel.append(dist[-1] / float(zi.norm()))
        zs = torch.stack([states[i].z.to(torch.float32) for i in range(setup.n)])
        spread = float((zs - zs.mean(0)).norm(dim=1).mean())
        rel.sort()
        dist.sort()
        out.append(
            {
                "round": rnd,
                "median": rel[len(rel) // 2],
                "max": rel[-1],
                "distance": dist[len(dist) // 2],
                "spread": spread,
            }
        )
        print(f"  copy lag after round {rnd}: median {rel[len(rel) // 2]:.3f}, spread {spread:.3f}", flush=True)
        if rnd == max(rounds):
            raise Done

    spec = next(
        s for s in plan(["fashion_mnist"], False, (seed,)) if s["id"] == f"fashion_mnist/{PARTITION}/{ROW}/s{seed}"
    )
    try:
        with swapped_gradient(lambda g, *a: g, after), recorded_states(states):
            run_row(spec | {"evals": 1}, "cross_gradient_probe")
    except Done:
        pass
    return out


def to_markdown(rows: list[dict[str, Any]], command: str, mix: str = "neighbour") -> str:
    lines = [
        f"Regenerate: `{command}`. `{ROW}` on `{PARTITION}`, 20 epochs, each node stepping along the mean of its own "
        f"gradient and {SECOND[mix]} (simulations/cross_gradient_probe.py). "
        "Test accuracy of the consensus model (= every node's after the final merge), validation in brackets. "
        "Bits per node: the row's model messages and merge; relayed gradients: their encoded bits on top.",
        "",
        "| seed | consensus | node min | bits per node | relayed gradients |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {100 * r['acc_consensus']:.2f} ({100 * r['val_acc_consensus']:.2f}) | "
            f"{100 * r['acc_node_min']:.2f} | {r['bits_per_node']:.4g} | {r.get('extra_bits_per_node', 0):.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument(
        "--mix",
        default="neighbour",
        choices=MIXES,
        help="the second gradient: the in-neighbour's data, or (the control) a second batch of the node's own",
    )
    ap.add_argument(
        "--grad-compressor",
        default="none",
        help="compressor spec of the second gradient as the other node sends it (error feedback at the sender, "
        "per edge for neighbour and copy), "
        "e.g. topk:0.001+q:4",
    )
    ap.add_argument(
        "--copy-lag",
        action="store_true",
        help="instead: measure how far out-neighbours' copies of each model lag it in the row itself "
        f"(after rounds {', '.join(map(str, LAG_ROUNDS))}; a few minutes)",
    )
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated whole numbers, e.g. 0,1,2")
    if args.grad_compressor != "none":
        if args.mix == "self":
            ap.error("--grad-compressor compresses what another node sends: not with --mix self")
        from flower_sparsepush.core.compression import CompressionError, make_compressor

        try:
            make_compressor(args.grad_compressor)
        except CompressionError as e:
            ap.error(f"--grad-compressor: {e}")
    torch.set_num_threads(1)
    if args.copy_lag:
        lag = [dict(r, seed=s) for s in seeds for r in copy_lag(s)]
        command = f"python -m flower_sparsepush.simulations.cross_gradient_probe --copy-lag --seeds {args.seeds}"
        lines = [
            f"Regenerate: `{command} --out {args.out}`. `{ROW}` on `{PARTITION}`: |copy - z_i| / |z_i| over the "
            "nodes i, the copy being the one the node i sends to in that round holds (the ref form's per-edge "
            "reference): median and largest over the nodes, the median distance |copy - z_i| itself, and the "
            "nodes' mean distance to their average (spread), for scale.",
            "",
            "| seed | round | median | max | median distance | spread |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['seed']} | {r['round']} | {r['median']:.3f} | {r['max']:.3f} | {r['distance']:.3f} | "
            f"{r['spread']:.3f} |"
            for r in lag
        ]
        name = f"cross_gradient_copy_lag_s{args.seeds.replace(',', '-')}"
        write_report(args.out, name, f"{command} --out {args.out}", lag, "\n".join(lines) + "\n")
        return
    rows = [run_seed(s, args.mix, args.grad_compressor) for s in seeds]
    mix_arg = "" if args.mix == "neighbour" else f" --mix {args.mix}"
    gc_arg = "" if args.grad_compressor == "none" else f" --grad-compressor {args.grad_compressor}"
    command = (
        "python -m flower_sparsepush.simulations.cross_gradient_probe "
        f"--seeds {args.seeds}{mix_arg}{gc_arg} --out {args.out}"
    )
    name = f"cross_gradient_probe_s{args.seeds.replace(',', '-')}" + ("" if args.mix == "neighbour" else f"_{args.mix}")
    name += "" if args.grad_compressor == "none" else "_" + args.grad_compressor.replace(":", "").replace("+", "_")
    write_report(args.out, name, command, rows, to_markdown(rows, command, args.mix))


if __name__ == "__main__":
    main()

"""Drop-in decentralized strategy: compressed push-sum for an unchanged FedAvg-style Flower ClientApp.

Swap ``FedAvg(...)`` for ``DecentralizedFedAvg(...)`` in a ServerApp and the same ClientApp (``@app.train()`` takes
an ``ArrayRecord`` under ``"arrays"`` and a ``ConfigRecord``, returns the trained ``ArrayRecord`` and a
``MetricRecord`` with ``"num-examples"``) trains decentralized: there is no global average that any node sees.

The ServerApp holds every node's push-sum state (:class:`~flower_sparsepush.core.pushsum.NodeState`: numerator x,
weight y, error memory, per-edge references) and plays the nodes' gossip with the project's own code
(:class:`~flower_sparsepush.core.pushsum.PushSum` encodes real messages, :class:`~flower_sparsepush.core.router.Router`
delivers them). Round t (``server_round = t + 1``) for every sampled node i:

1. the state absorbs the messages sent to i in earlier rounds (``PushSum.receive``; bounces first);
2. the node is sent its own de-biased model ``z_i = x_i / y_i`` as the usual ``"arrays"`` record (with
   ``gradient_lookahead=c``: the point ``z_i + c (mean of its copies of its in-neighbours' models - z_i)``);
3. the ClientApp trains and replies ``z_i'``; the strategy sets ``x_i = y_i z_i'`` (``PushSum.local_update``; with
   lookahead, ``z_i`` moves by the reply minus the point sent);
4. the state sends to ``graph.out_neighbours(g)[i]`` (``PushSum.send``): encoded bytes go into the router's
   mailboxes and ``8 * len(bytes)`` is counted as peer-to-peer bits;
5. ``gossip_steps - 1`` more exchanges (all absorb, then all send; exchange g = t * gossip_steps + k);
6. with ``final_merge`` / ``merge_every``, a global merge after the round (``run.merging.merge_among``, the code the
   in-process loop merges with): every node takes what is in flight to it, hands its contribution to the owner of
   each tensor, the owners average, every node takes the merged model. Every node takes part, since the ServerApp
   holds every state; the merge's messages are counted in the peer bits as they would travel between the nodes.

With ``gossip_steps=1`` this is exactly the order of ``run.node_train.node_round`` (the native mode), so with an
equivalent ClientApp both modes give the same node models (tests/test_dropin.py, also with sp-466x's gossip
switches). Two kinds of traffic are counted apart: ``peer_bits_*`` (what the peers would exchange
over the graph: real encoded messages) and ``flower_bits_*`` (the dense arrays Flower actually moves between the
ServerApp and the nodes, both ways; Flower's own envelopes are not counted).

Node identity: by default node i is the i-th Flower node id in sorted order (the node ids of the run are fixed at
:meth:`DecentralizedFedAvg.start`). With ``node_order="partition-id"`` the strategy first sends one query message
(``{"q": ConfigRecord}``) and expects ``content["info"]["partition-id"]`` in each reply (0..n-1), the protocol of
this project's ClientApp, so that node i holds data partition i.

The ArrayRecord the strategy returns to ``Strategy.start`` (``Result.arrays``, the ``arrays`` given to
``evaluate_fn``) is the consensus model ``z_bar = mean_i z_i``: a measurement; no node is ever sent it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from flower_sparsepush.core import bounds
from flower_sparsepush.core.merge_relay import MergeRelay
from flower_sparsepush.core.node import Node
from flower_sparsepush.core.pushsum import NodeState, PushSum
from flower_sparsepush.core.router import Network, Router
from flower_sparsepush.core.topology import Graph, GraphError, make_graph
from flower_sparsepush.flower import protocol
from flower_sparsepush.run.merging import MergeSetup, merge_among, merge_relay
from flower_sparsepush.run.schedule import merge_due
from flower_sparsepush.run.setup import make_rule

from .base import EvalReport, PushSumStrategy, wait_and_register
from .dropin_checks import MERGE_ARGS, check_callables, check_gossip, check_sampling, check_schedules, merge_config
from .dropin_options import compressor_of_round, resolve
from .dropin_reply import BadDropinReply, reply_arrays
from .dropin_state import DropinStates

MetricsAggr = Callable[[list[RecordDict], str], MetricRecord]
NodesEval = Callable[[int, list[ArrayRecord]], MetricRecord | None]


class DecentralizedFedAvg(DropinStates, PushSumStrategy):
    """Decentralized (push-sum gossip) training as a drop-in replacement for Flower's ``FedAvg``.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes that train in a round, in (0, 1]. A node left out is idle: it keeps its inbox (absorbed
        when it next takes part), does not train and does not send; mass is conserved either way. At least
        ``min_train_nodes`` nodes are sampled. With 1.0 every node takes part every round (synchronous push-sum).
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes that evaluate their own model ``z_i`` on an evaluation round, in [0, 1]; 0 skips
        federated evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation (when ``fraction_evaluate > 0``).
    min_available_nodes : int (default: 2)
        Nodes to wait for before round 1. Unless ``num_nodes`` is given, the nodes connected at that moment are
        the run's nodes (set it to the federation's size to use all of them).
    weighted_by_key : str (default: "num-examples")
        MetricRecord key used as the weight when averaging the nodes' metrics (as in FedAvg).
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord (the model) in messages to and from the ClientApp.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages to the ClientApp (``"server-round"`` is added, as FedAvg does).
    train_metrics_aggr_fn : callable, optional
        ``(list[RecordDict], str) -> MetricRecord`` for the train replies' metrics; default: weighted average.
    evaluate_metrics_aggr_fn : callable, optional
        ``(list[RecordDict], str) -> MetricRecord`` for the evaluate replies' metrics; default: weighted average.
    The gossip arguments (``graph`` .. ``lr_schedule``) default to ``None``: the value of ``preset`` if one is given,
    else the default shown (``dropin_options.DEFAULTS``, chosen on examples/quickstart-dropin's validation split:
    docs/dropin.md, "Defaults and why"). An argument given explicitly wins over the preset.

    graph : str or Graph, optional (default: "exponential")
        Directed, possibly time-varying communication graph: a name for ``topology.make_graph`` (built for the
        number of nodes at start) or a ``Graph`` with the same number of nodes. Exchange g of the run uses the
        graph's round g (``gossip_steps`` exchanges per Flower round).
    compressor : str or compressor object, optional (default: "topk:0.1+q:4")
        Message compressor: a spec for ``compression.make_compressor`` (``none``, ``topk:0.01``,
        ``topk:0.01+q:4``, ``randk:0.1``...; random ones draw from a (seed, node, exchange) generator, as the native
        mode does) or an object with ``__call__(vector) -> Compressed`` shared by all nodes.
    gamma : float, optional (default: 0.5)
        Consensus step size in (0, 1]. ``compressor="none"`` with ``gamma=1`` is SGP.
    form : str, optional (default: "ref")
        Push-sum form (``pushsum.FORMS``): ``ref`` (per-edge references in z-space), ``ef`` (error feedback),
        ``ref-x``.
    gradient_lookahead : float, optional (default: 1.0)
        c in [0, 1] (run-config ``gradient-lookahead``): node i is sent ``z_i + c (mean of its copies of its
        in-neighbours' models - z_i)`` instead of ``z_i``, so your ClientApp takes its gradients nearer the nodes'
        average, and the change it returns (its reply minus the point it was sent) is applied to ``z_i``. No extra
        bits (the copies are the ``ref`` form's per-edge references); ``form="ref"`` only; 0 = off.
    gossip_steps : int, optional (default: 6)
        Push-sum exchanges per Flower round (>= 1): after the training reply, the nodes that trained gossip K times
        (absorb, then send; the first send carries the update). Gossip costs no Flower time here, but every
        exchange's messages are counted in the peer bits: K exchanges cost K times the bits of one.
    sparsity_schedule : str, optional (default: "constant")
        ``"lr"`` (run-config ``sparsity-schedule``): the kept fraction F of a top-k/random-k compressor follows
        your ClientApp's learning rate, ``F * lr_t / mean(lr)`` (floored at F/20, capped at 1), over the
        ``num_rounds`` given to ``start``; the shape of that schedule is ``lr_schedule``.
    lr_schedule : str, optional (default: "constant")
        ``constant``, ``cosine`` or ``step:F1,F2,...``: the learning-rate schedule your ClientApp follows over the
        rounds (the strategy does not set it; only ``sparsity_schedule="lr"`` reads it).
    final_merge : bool, optional (default: False)
        Run-config ``final-merge``: after the last round (the ``num_rounds`` given to ``start``) every node takes
        the average of all nodes' models (exact with ``merge_bits=32``), so every node ends on the same model.
    merge_every : int, optional (default: 0)
        Run-config ``merge-every``: a global merge after every M-th round as well (0 = none).
    merge_bits : int, optional (default: 32)
        Run-config ``merge-bits``: 32 merges exactly; 1..8 sends every merge message quantized to that many bits.
    merge_feedback : bool, optional (default: False)
        Run-config ``merge-feedback``: a quantized merge keeps what its rounding dropped for the next merge.
    preset : str, optional
        A preset of ``run/presets.py`` (``sgp``, ``sp-466x``, ``sp-1000x``...): its gossip and merge keys (graph,
        compressor, gamma, form, gradient-lookahead, sparsity-schedule, lr-schedule, final-merge, merge-every,
        merge-bits, merge-feedback) become the defaults of the arguments above; an argument given explicitly wins.
        Keys of the ClientApp's training (lr, momentum, local steps...) are your app's. A key the drop-in cannot
        apply (``drift-correction``, ``qgm``: they change the node's SGD, which your ClientApp runs) is refused with
        one ValueError naming it and why.
    seed : int (default: 0)
        Seed of the graph (random graphs), of random compressors and of node sampling.
    num_nodes : int, optional
        Exact number of nodes to wait for and use (instead of ``min_available_nodes``).
    node_order : str (default: "node-id")
        ``"node-id"``: node i is the i-th sorted Flower node id. ``"partition-id"``: ask each node for its
        partition id with one query message (the ClientApp needs an ``@app.query()`` that answers
        ``{"info": ConfigRecord({"partition-id": p})}``).
    network : router.Network, optional
        Simulated link failures between peers (``drop``, ``link_down``); a lost message is bounced to its sender,
        who takes its mass back. Node churn is not supported here (use ``fraction_train``).
    evaluate_nodes_fn : callable, optional
        ``(server_round, [ArrayRecord of z_i for every node]) -> MetricRecord | None``, called after every
        round's federated evaluation; its metrics are merged into the evaluation metrics.
    register_timeout : float (default: 120.0)
        Seconds to wait for the nodes to connect (and answer the partition-id query).
    value_bound : float (default: 1e6, core.bounds.DEFAULT)
        The run-config key ``value-bound``: a reply with a model value beyond it (after the cast to float32) is a
        failure of that node, and the nodes' messages are clipped to it (core/bounds.py; 3.4e38 = off).
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggr | None = None,
        evaluate_metrics_aggr_fn: MetricsAggr | None = None,
        *,
        graph: str | Graph | None = None,
        compressor: Any = None,
        gamma: float | None = None,
        form: str | None = None,
        gradient_lookahead: float | None = None,
        gossip_steps: int | None = None,
        sparsity_schedule: str | None = None,
        lr_schedule: str | None = None,
        final_merge: bool | None = None,
        merge_every: int | None = None,
        merge_bits: int | None = None,
        merge_feedback: bool | None = None,
        preset: str | None = None,
        seed: int = 0,
        num_nodes: int | None = None,
        node_order: str = "node-id",
        network: Network | None = None,
        evaluate_nodes_fn: NodesEval | None = None,
        register_timeout: float = 120.0,
        value_bound: float = bounds.DEFAULT,
    ) -> None:
        keys = (weighted_by_key, arrayrecord_key, configrecord_key)
        check_sampling(
            fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, num_nodes, keys
        )
        given = {"graph": graph, "compressor": compressor, "gamma": gamma, "form": form}
        given |= {"gradient_lookahead": gradient_lookahead, "gossip_steps": gossip_steps}
        given |= {"sparsity_schedule": sparsity_schedule, "lr_schedule": lr_schedule}
        given |= {"final_merge": final_merge, "merge_every": merge_every, "merge_bits": merge_bits}
        given |= {"merge_feedback": merge_feedback}
        opts = resolve(preset, given)
        graph, compressor, gamma, form = opts["graph"], opts["compressor"], opts["gamma"], opts["form"]
        check_gossip(graph, compressor, gamma, form, seed, num_nodes, min_available_nodes, node_order, network)
        check_schedules(opts)
        merge_config(opts)
        try:
            value_bound = bounds.check_bound(value_bound)
        except ValueError as err:
            raise ValueError(f"value_bound: {err}") from None
        check_callables(
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            evaluate_nodes_fn=evaluate_nodes_fn,
        )

        super().__init__(num_nodes or 0, seed, register_timeout)
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn or aggregate_metricrecords
        self.graph_spec = graph
        self.compressor = compressor
        self.gamma = float(gamma)
        self.form = form
        self.gradient_lookahead = float(opts["gradient_lookahead"])
        self.gossip_steps = int(opts["gossip_steps"])
        self.sparsity_schedule = opts["sparsity_schedule"]
        self.lr_schedule = opts["lr_schedule"]
        self.merge_opts = {k: opts[k] for k in MERGE_ARGS}
        self.merge_cfg = None  # start() sets it: the merges as a run config over the planned rounds, or None
        self.preset = preset
        self.num_rounds_planned = 1  # start() sets it (the sparsity schedule follows the ClientApp's lr over them)
        self.seed = seed
        self.num_nodes_asked = num_nodes
        self.node_order = node_order
        self.network = network or Network()
        self.evaluate_nodes_fn = evaluate_nodes_fn
        self.register_timeout = float(register_timeout)
        self.value_bound = value_bound

        # filled in by start()
        self.node_ids: list[int] = []  # node index i -> Flower node id
        self.index_of: dict[int, int] = {}  # Flower node id -> node index
        self.graph: Graph | None = None
        self.nodes: list[Node] = []
        self.router: Router | None = None
        self.layout: list[tuple[str, tuple[int, ...], np.dtype, bool]] = []  # (key, shape, dtype, mixed?)
        self.segments: list[int] = []
        self.x0: torch.Tensor | None = None
        self.fixed: list[dict[str, np.ndarray]] = []  # per node: non-floating arrays, passed through unmixed
        self.flower_bits_down: list[int] = []  # dense arrays ServerApp -> node
        self.flower_bits_up: list[int] = []  # dense arrays node -> ServerApp
        self.failures: list[dict] = []  # {"round", "node", "reason"}: the routers' straggler events, same keys
        self.last_eval: EvalReport | None = None  # the consensus after the last evaluation round
        self._training: list[int] = []
        self._offsets: dict[int, torch.Tensor] = {}  # gradient-lookahead: the shift sent to each node this round
        self.merges: MergeRelay | None = None
        self.merges_done: list[int] = []  # core rounds after which a merge ran

    # -- set-up -------------------------------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.node_ids)

    def _connect(self, grid: Grid) -> list[int]:
        """Wait for the nodes; returns the Flower node ids in node-index order."""
        want = self.num_nodes_asked or self.min_available_nodes
        end = time.time() + self.register_timeout
        while len(ids := sorted(grid.get_node_ids())) < want:
            if time.time() > end:
                raise RuntimeError(f"only {len(ids)} of {want} nodes connected after {self.register_timeout:.0f} s")
            time.sleep(0.2)
        if self.num_nodes_asked is not None:
            ids = ids[: self.num_nodes_asked]
        if self.node_order == "node-id":
            return ids
        reg = wait_and_register(grid, len(ids), self.register_timeout)
        self.left_out = reg.left_out  # nodes that answered badly: not part of the run (reported in summary())
        return [nid for nid, _ in sorted(reg.node_to_part.items(), key=lambda kv: kv[1])]

    def setup(self, node_ids: list[int], initial_arrays: ArrayRecord) -> None:
        """Fix the node set and give every node the initial model with weight 1 (called by :meth:`start`)."""
        if len(node_ids) < 2:
            raise ValueError(f"decentralized training needs at least 2 nodes, got {len(node_ids)}")
        self.node_ids = list(node_ids)
        self.index_of = {nid: i for i, nid in enumerate(self.node_ids)}
        n = self.n
        if isinstance(self.graph_spec, Graph):
            if self.graph_spec.n != n:
                raise ValueError(f"the graph has {self.graph_spec.n} nodes but {n} nodes take part")
            self.graph = self.graph_spec
        else:
            try:
                self.graph = make_graph(self.graph_spec, n, self.seed)
            except GraphError as err:
                raise ValueError(f"graph {self.graph_spec!r} for {n} nodes: {err}") from None
        self.layout = []
        for key, arr in initial_arrays.items():
            a = arr.numpy()
            self.layout.append((key, tuple(a.shape), a.dtype, bool(np.issubdtype(a.dtype, np.floating))))
        if not any(mixed for *_, mixed in self.layout):
            raise ValueError("initial_arrays holds no floating-point array: nothing to train")
        self.segments = [int(np.prod(shape)) for _, shape, _, mixed in self.layout if mixed]
        self.x0 = self._flatten(initial_arrays)
        self.nodes = [Node(i, NodeState(x=self.x0.clone(), y=1.0), self._rule(i), self._outs(i)) for i in range(n)]
        fixed = {k: np.array(a.numpy()) for k, a in initial_arrays.items() if not self._mixed(k)}
        self.fixed = [dict(fixed) for _ in range(n)]
        self.router = Router(n, self.network, bounce=True)
        self.merge_cfg = merge_config(self.merge_opts | {"form": self.form}, self.num_rounds_planned)
        if self.merge_cfg is not None:
            self.merge_cfg = self.merge_cfg.replace(value_bound=self.value_bound)  # merges bounded as gossip is
            self.merges = merge_relay(MergeSetup(self.merge_cfg, self.n, self.segments, self.x0))
        self.num_nodes = n
        self.bits_sent = [0] * n
        self.flower_bits_down = [0] * n
        self.flower_bits_up = [0] * n

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs):
        """Wait for the nodes, fix their order, initialise their states, then run Flower's round loop."""
        self.num_rounds_planned = int(num_rounds)
        self.setup(self._connect(grid), initial_arrays)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, **kwargs)

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Decentralized push-sum (drop-in): %d nodes, graph %s, compressor %s, gamma %g, form %s, "
            "%d exchanges per round, gradient-lookahead %g, sparsity schedule %s, merges %s",
            self.n,
            self.graph.name if self.graph else self.graph_spec,
            self.compressor,
            self.gamma,
            self.form,
            self.gossip_steps,
            self.gradient_lookahead,
            self.sparsity_schedule,
            ", ".join(f"{k}={v}" for k, v in self.merge_opts.items()) if self.merge_cfg else "none",
        )
        log(
            INFO,
            "\t├──> Sampling: fraction train %.2f | evaluate %.2f; min nodes train %d | evaluate %d",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_nodes,
            self.min_evaluate_nodes,
        )
        log(
            INFO,
            "\t└──> Keys: weighted by '%s', ArrayRecord '%s', ConfigRecord '%s'; node order %s",
            self.weighted_by_key,
            self.arrayrecord_key,
            self.configrecord_key,
            self.node_order,
        )

    # -- sampling and the push-sum rule --------------------------------------------------------------------------------

    def _rule(self, node: int):
        """Node's push-sum rule of each exchange ``g`` (run.setup.make_rule, as the native mode builds it): the
        compressor of training round ``g // gossip_steps`` under the sparsity schedule, random draws seeded by g."""

        def rule(g: int):
            t = g // self.gossip_steps
            spec = compressor_of_round(
                self.compressor, self.sparsity_schedule, self.lr_schedule, self.num_rounds_planned, t
            )
            return make_rule(spec, self.segments, self.seed, node, g, self.gamma, self.form, self.x0, self.value_bound)

        return rule

    def _outs(self, node: int):
        return lambda rnd: self.graph.out_of(rnd, node)

    def _message(self, node: int, config: ConfigRecord, mtype: str, offset: torch.Tensor | None = None) -> Message:
        z = self.states[node].z if offset is None else self.states[node].z.to(torch.float32) + offset
        record = self._record(z, self.fixed[node])
        self.flower_bits_down[node] += 8 * sum(a.numpy().nbytes for a in record.values())
        content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: config})
        return Message(content=content, message_type=mtype, dst_node_id=self.node_ids[node])

    # -- train ---------------------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node absorbs its inbox, then is sent its own de-biased model z_i (shifted by the
        gradient-lookahead offset when that is on: the ClientApp's gradients are taken there)."""
        g = protocol.core_round(server_round) * self.gossip_steps
        self._training = self.sample(self.fraction_train, self.min_train_nodes)
        config["server-round"] = server_round
        messages = []
        self._offsets = {}
        for i in self._training:
            self._absorb(server_round, i, g)
            offset = PushSum.lookahead_offset(self.states[i], self.gradient_lookahead)
            if offset is not None:
                self._offsets[i] = offset
            messages.append(self._message(i, config, MessageType.TRAIN, offset))
        log(INFO, "configure_train: %d of %d nodes train", len(messages), self.n)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """x_i = y_i z_i' for every node that replied, then every one of them sends to its out-neighbours.

        A node whose reply is an error (or malformed) keeps its state and skips this round's sending: no mass is
        lost, since the state lives here. Returns the consensus model and the aggregated metrics.
        """
        g = protocol.core_round(server_round) * self.gossip_steps
        trained, contents = [], []
        for r in replies:
            i = self.index_of.get(r.metadata.src_node_id)
            if i is None:
                continue
            if r.has_error():
                self._fail(server_round, i, r.error.reason)
                continue
            try:
                record = r.content[self.arrayrecord_key]
                z_new, fixed = reply_arrays(record, self.layout, self.value_bound, f"node {i}'s reply")
            except (KeyError, BadDropinReply) as err:
                self._fail(server_round, i, f"bad reply: {err}")
                continue
            self.flower_bits_up[i] += 8 * sum(a.numpy().nbytes for a in record.values())
            self.fixed[i] = fixed
            if i in self._offsets:  # the node moved from the shifted point: apply that change to z_i
                z_new = z_new - self._offsets[i]
            trained.append((i, z_new))
            contents.append(r.content)
        done = sorted(i for i, _ in trained)
        for i, z_new in sorted(trained, key=lambda e: e[0]):
            self._send(i, g, self.nodes[i].finish(g, z_new))  # x_i = y_i z_i', then this round's messages
        for k in range(1, self.gossip_steps):  # gossip-only exchanges: all absorb, then all send
            for i in done:
                self._absorb(server_round, i, g + k)
            for i in done:
                self._send(i, g + k, self.nodes[i].finish(g + k))
        t = protocol.core_round(server_round)
        if self.merge_cfg is not None and merge_due(self.merge_cfg, t + 1, self.num_rounds_planned):
            self._merge(server_round, t)
        metrics = MetricRecord()
        if contents:
            try:
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            except Exception as err:  # noqa: BLE001 - metrics are a report; the training step already happened
                log(WARNING, "train metrics could not be aggregated: %s", err)
        metrics.update(self.traffic())
        return self.consensus_arrays(), metrics

    def _merge(self, server_round: int, t: int) -> None:
        """The global merge after core round ``t`` among all nodes (``merging.merge_among``); in-flight messages are
        absorbed with the rule of the next round's first exchange, as a native node absorbs them."""
        g_next = (t + 1) * self.gossip_steps
        parts = list(range(self.n))
        setup = MergeSetup(self.merge_cfg, self.n, self.segments, self.x0)
        merge_among(
            setup,
            self.states,
            parts,
            t,
            self.merges,
            lambda i: self._absorb(server_round, i, g_next),
            self.bits_sent,
            self.router.delivered_bits,
        )
        self.merges_done.append(t)
        log(
            INFO,
            "round %d: global merge among %d nodes (merge-bits %d)",
            server_round,
            len(parts),
            self.merge_cfg.merge_bits,
        )

    def _absorb(self, server_round: int, i: int, g: int) -> None:
        rejected = self.nodes[i].begin(g, *self.router.collect(i))
        if rejected:
            raise RuntimeError(f"round {server_round}: node {i} rejected a message: {rejected[0]}")

    def _send(self, i: int, g: int, msgs: dict[int, bytes]) -> None:
        self.router.post(i, g, msgs)
        self.bits_sent[i] += sum(8 * len(d) for d in msgs.values())

    def _fail(self, server_round: int, i: int, reason: str) -> None:
        self.failures.append({"round": server_round, "node": i, "reason": reason})
        log(WARNING, "round %d: node %d did not train (%s); its state is kept", server_round, i, reason)

    # -- evaluate ------------------------------------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sampled nodes evaluate their own model z_i (not the consensus model)."""
        if self.fraction_evaluate == 0:
            return []
        config["server-round"] = server_round
        nodes = self.sample(self.fraction_evaluate, self.min_evaluate_nodes)
        return [self._message(i, config, MessageType.EVALUATE) for i in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.last_eval = self.consensus(server_round)
        contents = []
        for r in replies:
            if r.has_error():
                log(
                    WARNING,
                    "round %d: evaluation failed on node %s: %s",
                    server_round,
                    self.index_of.get(r.metadata.src_node_id),
                    r.error.reason,
                )
            else:
                contents.append(r.content)
        metrics = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        if self.evaluate_nodes_fn is not None:
            extra = self.evaluate_nodes_fn(server_round, self.node_arrays())
            if extra is not None:
                metrics = MetricRecord({**(metrics or {}), **extra})
        return metrics

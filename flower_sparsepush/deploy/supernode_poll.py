"""``flower-supernode`` with shorter idle waits: ``python -m flower_sparsepush.deploy.supernode_poll SECONDS ARGS...``.

Flower 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s whenever it pulls no
message from the SuperLink, and 0.5 s between checks for its ClientApp's reply; neither is configurable. So every
message batch of a round waits up to 3 s on each SuperNode before it even starts. This runs the same SuperNode
(``flwr.supernode.cli.flower_supernode``, same arguments) with those waits capped at ``SECONDS``, by replacing the
``time`` module that start_client_internal sees with one whose ``sleep`` is capped (and its ``pull_objects`` with
one whose first retry comes after ``SECONDS``). It is a patch of Flower's
internals, checked against 1.42 only: with another Flower version, or if the module no longer uses ``time.sleep``
that way, it warns and runs the SuperNode unpatched. Cost: the SuperNode polls the SuperLink every ``SECONDS``
while idle (one HTTP request each) instead of every 3 s. ``sparsepush node --supernode-poll S`` uses it.
"""

from __future__ import annotations

import functools
import sys
import time
import types


def capped_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep(s)`` sleeps ``min(s, cap)``."""
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    shim.sleep = lambda s: time.sleep(min(s, cap))
    return shim


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cap = float(argv.pop(0))
    import flwr
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if flwr.__version__.startswith("1.42.") and getattr(sci, "time", None) is time and hasattr(sci, "pull_objects"):
        sci.time = capped_time(cap)
        # a message's objects can reach the SuperLink after the message itself: retry after cap, not 1 s
        sci.pull_objects = functools.partial(sci.pull_objects, initial_backoff=cap, backoff_cap=max(cap, 0.5))
    else:
        print(
            f"supernode_poll: Flower {flwr.__version__} is not the patched 1.42 layout; running unpatched",
            file=sys.stderr,
        )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())

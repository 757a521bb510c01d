"""Test-session settings shared by every test module."""

from __future__ import annotations

import os
import tempfile

import pytest

# Node state files of Flower runs (store.py) go to a folder of this session, not to the user's cache; set before any
# test starts Ray, whose workers inherit the environment.
os.environ.setdefault("SPARSEPUSH_NODE_STORE", tempfile.mkdtemp(prefix="sparsepush-node-store-"))


# Ray start-up costs 7-9 s (flower-notes.md) and Flower's RayBackend shuts Ray down at the end of every simulation,
# so each of the suite's ~50 simulations paid it. Here the backend ends a run by terminating its ClientApp actors
# (as it does) but leaves Ray running for the next simulation of this session; Ray stops when the session ends.
# Every run still builds its own actor pool, in new actor processes. A test that needs Ray started anew (another
# environment for the workers, its own Ray cluster) asks for the `fresh_ray` fixture.
def _keep_ray_between_simulations() -> None:
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError:  # no Flower simulation engine: nothing to keep
        return

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    raybackend.RayBackend.terminate = terminate


_keep_ray_between_simulations()


def _shutdown_ray() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def fresh_ray():
    """Ray is not running when the test starts (the next simulation starts it with the environment of this test)."""
    _shutdown_ray()
    yield
    _shutdown_ray()


def pytest_sessionfinish(session, exitstatus):
    _shutdown_ray()

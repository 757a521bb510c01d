"""Test-session settings shared by every test module."""

from __future__ import annotations

import os
import tempfile

# Node state files of Flower runs (store.py) go to a folder of this session, not to the user's cache; set before any
# test starts Ray, whose workers inherit the environment.
os.environ.setdefault("SPARSEPUSH_NODE_STORE", tempfile.mkdtemp(prefix="sparsepush-node-store-"))

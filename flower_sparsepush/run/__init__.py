"""Runs: the typed run config, run setup, the in-process loop, checkpoints, results files, progress lines and the
subprocess helpers the launchers share.

May import: ``core``, ``learn``. Never ``flwr``, ``flower``, ``deploy`` or the strategies: the in-process loop is the
reference the Flower paths are tested against, so it must run without them.
"""

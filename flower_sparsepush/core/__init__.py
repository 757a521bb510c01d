"""The algorithm, with no Flower in it: graphs, compressors, the wire codec, the push-sum forms, one node's round,
the network and router, the relay's reply checks, the global merges, and the averaging-only experiments.

May import: torch, numpy, scipy and ``flower_sparsepush.core`` itself. Never ``flwr``, and nothing from the other
layers (tests/test_layers.py checks it). The same code runs in the ClientApp, in the drop-in strategy on the
ServerApp, and in the in-process loop the Flower paths are tested against.
"""

"""The Flower adapters: the message protocol, the ClientApp and its node handlers, the node store, the ServerApp,
the simulation launcher behind ``sparsepush train``, and the Flower 1.42 workarounds (``linkstate``).

May import: ``flwr``, ``core``, ``learn``, ``run``, ``flower_sparsepush.strategies``. Never ``deploy``.
"""

"""flower-sparsepush: decentralized training with compressed push-sum gossip on Flower."""

__version__ = "0.1.0"

"""Learning: data sources and partitions, models, local SGD and evaluation.

May import: torch, torchvision, numpy, flwr-datasets' partitioners, ``core``. Never ``flwr`` itself, ``run``,
``flower``, ``deploy`` or the strategies.
"""

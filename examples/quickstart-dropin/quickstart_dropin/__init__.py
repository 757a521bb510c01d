"""Flower's quickstart-pytorch, shaped the same (LeNet-style CNN, CIFAR-10 subset), for the drop-in strategy."""

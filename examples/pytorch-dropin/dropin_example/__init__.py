"""An ordinary Flower PyTorch app used to show the drop-in decentralized strategy."""

"""IMU: Influence-guided Machine Unlearning (arXiv 2508.01620), a pure-PyTorch engine."""

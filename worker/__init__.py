"""Lethe worker: Celery execution of unlearning jobs; `worker.imu` is the pure-PyTorch engine."""

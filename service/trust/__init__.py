"""Trust: what lets a privacy officer rely on a release.

The audit chain and its signed checkpoints, signing keys, receipts, the release policy,
purge and retention.
"""

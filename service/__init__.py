"""Lethe service: HTTP API, settings, database, storage, audit log and domain logic."""

__version__ = "0.1.0"

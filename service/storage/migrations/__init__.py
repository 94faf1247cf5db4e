"""Alembic migration scripts, shipped inside the package so `lethe migrate` works when installed."""

"""The Alembic migration scripts (env.py, versions/): a top-level package of the distribution.

Shipped with the installed package (pyproject's package discovery includes it), so `lethe
migrate` finds them without the source tree; `service.storage.migrate` locates this folder.
"""

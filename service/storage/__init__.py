"""Persistence: the database (engine, ORM models, migrations, SQL helpers) and the object store."""

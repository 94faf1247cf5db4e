"""`python -m service.cli ...` is the same as the `lethe` console script."""

from service.cli import app

app(prog_name="lethe")

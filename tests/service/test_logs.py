"""service.logs: the JSON line format, the id filter and the process-wide configuration that
`lethe serve` and the embedded executor apply (run in a fresh interpreter, real stderr)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from service.logs import ContextFilter, JsonFormatter, accept_request_id, log_context

SCRIPT = """
import logging
from service.logs import configure_logging, log_context
configure_logging("json", "INFO")
logging.getLogger("lethe.api").debug("hidden")
with log_context(request_id="r-1", job_id="j-1"):
    logging.getLogger("uvicorn.access").info("GET /healthz %s", 200)
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("lethe.worker").exception("boom")
"""


def test_json_configuration_in_a_fresh_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(lines) == 2  # DEBUG is below LETHE_LOG_LEVEL
    access, boom = lines
    assert access["logger"] == "uvicorn.access" and access["message"] == "GET /healthz 200"
    assert (access["request_id"], access["job_id"], access["level"]) == ("r-1", "j-1", "INFO")
    assert access["timestamp"].endswith("+00:00")
    assert "request_id" not in boom and "ZeroDivisionError" in boom["exc_info"]


def test_text_format_and_context_reset() -> None:
    record = logging.LogRecord("lethe.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
    with log_context(job_id="j-2"):
        ContextFilter().filter(record)
    after = logging.LogRecord("lethe.x", logging.INFO, __file__, 1, "m", (), None)
    ContextFilter().filter(after)
    assert record.job_id == "j-2" and after.job_id is None  # type: ignore[attr-defined]
    assert json.loads(JsonFormatter().format(record))["job_id"] == "j-2"


def test_request_ids_are_bounded_and_plain() -> None:
    assert accept_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "a" * 129, "has space", "new\nline", "é"):
        made = accept_request_id(bad)
        assert made != bad and len(made) == 32

"""Smoke test of bench/api_throughput.py: a one-second run per route on SQLite. It checks the
shape of what the script writes, never the timings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import api_throughput

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing: apt-get install wrk")
def test_api_throughput_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    rc = api_throughput.main(
        [
            "--duration",
            "1",
            "--connections",
            "8",
            "--backends",
            "sqlite",
            "--records",
            "5000",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    (sqlite,) = result["backends"]
    assert sqlite["backend"] == "sqlite" and sqlite["workers"] == "auto"
    assert set(sqlite["routes"]) == set(api_throughput.ROUTES)
    for route in api_throughput.ROUTES:
        measured = sqlite["routes"][route]
        assert measured["requests"] > 0 and measured["req_per_s"] > 0
        assert measured["p50_ms"] <= measured["p99_ms"]
        assert measured["non_2xx"] == 0, measured["first_failure"]
    assert sqlite["routes"]["healthz"]["ratio_to_healthz"] == 1.0
    assert set(sqlite["goals"]) == {"get_job", "post_deletion"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_wrk_reads_latency_units() -> None:
    sample = """Running 1s test @ http://127.0.0.1:1/healthz
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.50s
  1234 requests in 1.00s, 200.00KB read
  Non-2xx or 3xx responses: 7
Requests/sec:   1234.50
"""
    parsed = api_throughput.parse_wrk(sample)
    assert parsed["req_per_s"] == 1234.5 and parsed["requests"] == 1234
    assert parsed["p50_ms"] == 0.85 and parsed["p99_ms"] == 1500.0
    assert parsed["non_2xx"] == 7

"""bench/influence_speed.py keeps working (tiny sizes; the real run is `make bench`)."""

from __future__ import annotations

import json

from bench import influence_speed


def test_tiny_run_writes_results(tmp_path) -> None:
    out = tmp_path / "speed.json"
    rc = influence_speed.main(
        [
            "--device",
            "cpu",
            "--ns",
            "16,48",
            "--archs",
            "cnn,resnet18_cifar",
            "--cnn-width",
            "4",
            "--resnet-width",
            "4",
            "--repeats",
            "1",
            "--no-memory",
            "--no-plot",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["torch"] and data["quick"] is True
    methods = {(r["arch"], r["n"], r["method"]) for r in data["results"]}
    assert len(methods) == 2 * 2 * 4
    assert all(r["seconds"] > 0 for r in data["results"])
    ratio = data["ratios"]["cnn"]["48"]
    assert ratio["closed_form_over_forward"] > 0 and ratio["loop_over_closed_form"] > 0
    assert data["parity_max_rel_err_vs_loop"]
    assert all(err < 1e-4 for err in data["parity_max_rel_err_vs_loop"].values())  # float32


def test_memory_probe_reports_peak_over_baseline() -> None:
    row = influence_speed.memory_probe("cnn", 4, 1000, 256, "closed_form", 64, "cpu")
    assert row["theta_numel"] == 1000 * 33
    assert row["n_times_theta_mb"] > 30 and row["extra_peak_mb"] >= 0

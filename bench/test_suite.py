"""Smoke test of the benchmark suite (``python bench/suite.py --quick``): every case runs, every
peer validates against the native round, and the outputs are written. Timings are not checked."""

import json

import suite


def test_suite_quick(tmp_path, capsys):
    assert suite.main(["--quick", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [d["case"] for d in lines] == ["meta", *suite.CASES]
    by = {d["case"]: d for d in lines}
    assert by["paper_round"]["threads_bit_identical"] and by["thread_scaling"]["bit_identical"]
    assert set(by["paper_round"]["peer_ms"]) >= {"numpy_loop", "numpy_vectorised", "reference_oracle"}
    assert all(0 < r["peak_fraction"] < 1 for r in by["kernel_efficiency"]["rows"])
    assert by["scale"]["sparse_route"]["peak_rss_mib"] > 0 and by["aggregation"]["gb_per_s"]["1"] > 0
    text = (tmp_path / "results.md").read_text()
    assert all(f"## {case}" in text for case in suite.CASES)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["results"].keys() == set(suite.CASES)


def test_suite_synthetic_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDRECON_ML1M", str(tmp_path / "absent"))
    assert suite.main(["--quick", "--cases", "paper_round", "--out", str(tmp_path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert out[-1]["data"].startswith("synthetic") and out[-1]["load_seconds"] is None
    assert "synthetic" in (tmp_path / "results.md").read_text()

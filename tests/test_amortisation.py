"""Smoke test: benchmarks/amortisation_gap.py runs end to end at a tiny size and tabulates its runs."""

import json

from test_benchmarks import load


def test_amortisation_gap_records_gaps_and_tabulates(tmp_path):
    module = load("amortisation_gap")
    out = tmp_path / "gap.jsonl"
    common = ["--data", "bars0.3", "--seeds", "1", "--n", "60", "--steps", "5", "--out", str(out)]
    module.main(["--configs", "res2-lowrank", "--refine", "3"] + common)
    text = module.main(["--configs", "h100-diag", "--recipe", "semi2"] + common)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"], r["recipe"]) for r in records] == [("res2-lowrank", "lbfgs"), ("h100-diag", "semi2")]
    for record in records:
        # The per-point optimum is at least as good as any encoder at the same model (up to its tolerance).
        assert record["gap_train"] > -1e-4 and record["gap_test"] > -1e-4
        assert 0 <= record["bars_found"] <= 10
    assert records[0]["refined_gap_test"] < records[0]["gap_test"]
    assert "| bars0.3   | 2D + 2 res(3D), ELU, lowrank 5" in text and "semi2" in text

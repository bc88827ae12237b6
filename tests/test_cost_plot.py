"""The accuracy-vs-cost points (tah/eval/cost_plot.py) against the statistics written out by hand: the
mean and the standard error of the mean across seeds, the binomial error of a single run, methods that
appear in some runs only; and the command's files."""

from __future__ import annotations

import json
import math

import pytest

from tah.eval.cost_plot import main, points


def _row(method: str, acc: float, depth: float, tps: float, problems: int = 150) -> dict:
    return {"method": method, "accuracy": acc, "avg_depth": depth, "decode_tokens_per_s": tps,
            "pct_iterated": 100 * (depth - 1), "problems": problems}


def test_points_over_seeds_are_mean_and_standard_error():
    runs = [[_row("standard", 0.70, 1.0, 3000), _row("tah_plus", 0.72, 1.04, 2000)],
            [_row("standard", 0.66, 1.0, 3200), _row("tah_plus", 0.74, 1.05, 2100)],
            [_row("standard", 0.68, 1.0, 3100)]]
    pts = {p["method"]: p for p in points(runs)}
    assert [p["method"] for p in points(runs)] == ["standard", "tah_plus"]
    s = pts["standard"]
    mean = (0.70 + 0.66 + 0.68) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in (0.70, 0.66, 0.68)) / 2)  # sample sd (n - 1)
    assert s["runs"] == 3 and s["accuracy"] == pytest.approx(mean)
    assert s["accuracy_err"] == pytest.approx(sd / math.sqrt(3))
    assert s["decode_tokens_per_s"] == pytest.approx(3100) and s["decode_tokens_per_s_err"] == pytest.approx(100 / math.sqrt(3))
    t = pts["tah_plus"]  # only in two runs
    assert t["runs"] == 2 and t["avg_depth"] == pytest.approx(1.045)
    assert t["avg_depth_err"] == pytest.approx(abs(1.05 - 1.04) / math.sqrt(2) / math.sqrt(2))


def test_one_run_has_the_binomial_error_of_its_problems():
    (p,) = points([[_row("tah", 0.3, 1.04, 2500, problems=50)]])
    assert p["accuracy_err"] == pytest.approx(math.sqrt(0.3 * 0.7 / 50))
    assert p["avg_depth_err"] == 0.0


def test_command_writes_table_json_and_figure(tmp_path):
    for seed, acc in ((0, 0.6), (1, 0.7)):
        row = {**_row("standard", acc, 1.0, 3000), "mental": acc / 2}
        (tmp_path / f"r{seed}.json").write_text(json.dumps({"seed": seed, "domains": ["mental"], "rows": [row]}))
    main([str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "--out", str(tmp_path / "agg")])
    doc = json.loads((tmp_path / "agg" / "seeds.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["points"][0]["accuracy"] == pytest.approx(0.65)
    assert "| standard | 2 | 0.650 ± 0.050 | 0.325 ± 0.025 |" in (tmp_path / "agg" / "seeds.md").read_text()
    assert doc["domains"] == ["mental"]
    assert (tmp_path / "agg" / "seeds.png").stat().st_size > 5000


def test_domain_accuracy_is_averaged_with_its_own_error():
    a, b = _row("standard", 0.6, 1.0, 3000), _row("standard", 0.7, 1.0, 3100)
    a["mental"], b["mental"] = 0.30, 0.50
    (p,) = points([[a], [b]], ("mental",))
    assert p["mental"] == pytest.approx(0.40) and p["mental_err"] == pytest.approx(math.sqrt(2 * 0.1 ** 2) / math.sqrt(2))  # sample sd / sqrt(n)


def test_merge_seeds_replaces_a_rerun_methods_rows_per_seed(tmp_path):
    """--merge-seeds: a later file of the same seed replaces that seed's row of each method it carries and
    keeps the others; without it every file is a run of its own."""
    for seed in (0, 1):
        rows = [_row("standard", 0.5 + seed / 10, 1.0, 3000), _row("tah2", 0.2, 1.2, 2000)]
        (tmp_path / f"full{seed}.json").write_text(json.dumps({"seed": seed, "rows": rows}))
        (tmp_path / f"rerun{seed}.json").write_text(json.dumps({"seed": seed, "rows": [_row("tah2", 0.4 + seed / 10, 1.1, 2100)]}))
    files = [str(tmp_path / f) for f in ("full0.json", "full1.json", "rerun0.json", "rerun1.json")]
    pts = {p["method"]: p for p in main([*files, "--merge-seeds", "--out", str(tmp_path / "m")])}
    assert pts["tah2"]["runs"] == 2 and pts["tah2"]["accuracy"] == pytest.approx(0.45)  # the reruns only
    assert pts["standard"]["runs"] == 2 and pts["standard"]["accuracy"] == pytest.approx(0.55)
    assert json.loads((tmp_path / "m" / "seeds.json").read_text())["seeds"] == [0, 1]
    plain = {p["method"]: p for p in main([*files, "--out", str(tmp_path / "p")])}
    assert plain["tah2"]["runs"] == 4 and plain["tah2"]["accuracy"] == pytest.approx((0.2 + 0.2 + 0.4 + 0.5) / 4)


def test_merge_seeds_refuses_a_file_without_a_seed(tmp_path):
    """A results.json with no seed cannot be placed beside a full run: --merge-seeds stops with the file's
    name and writes nothing, where the plain aggregation counts each file as a run of its own."""
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps({"rows": [_row("standard", 0.5, 1.0, 3000)]}))
    files = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    with pytest.raises(SystemExit, match="b.json: no seed recorded"):
        main([*files, "--merge-seeds", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    assert main([*files, "--out", str(tmp_path / "p")])[0]["runs"] == 2

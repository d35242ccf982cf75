"""The benchmark core (benchmarks/common.py, run_all.py): one way to report a result, goals judged from numbers
(not parsed from text), a summary of the goals met and missed."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all

    import common

    return common, run_all


def test_goals_are_judged_from_the_numbers(bench, tmp_path, monkeypatch, capsys):
    common, _ = bench
    assert common.judge(1.10, "<= 1.15") is True and common.judge(1.2, "<= 1.15") is False
    assert common.judge(50.0, ">= 50") is True and common.judge(None, ">= 1") is None
    assert common.judge(float("nan"), ">= 1") is None and common.judge(3.0, None) is None
    with pytest.raises(ValueError, match="goal"):
        common.judge(1.0, "about 1")
    out = tmp_path / "r.jsonl"
    monkeypatch.setenv(common.RESULTS_ENV, str(out))
    assert common.emit("a_speed", "12 img/s, ratio 1.20 vs bare", value=12.0, unit="img/s", ratio=1.2,
                       goal="<= 1.15") is False
    assert common.emit("a_memory", "2 GB", value=2.0, unit="GB", goal="<= 8", on="value") is True
    assert common.emit("a_note", "no goal") is None
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["a_speed: 12 img/s, ratio 1.20 vs bare [goal: ratio <= 1.15: MISSED]",
                       "a_memory: 2 GB [goal: value <= 8: met]", "a_note: no goal"]
    rows = common.read_results(out)
    assert [(r["name"], r["met"]) for r in rows] == [("a_speed", False), ("a_memory", True), ("a_note", None)]
    assert rows[0]["ratio"] == 1.2 and rows[1]["value"] == 2.0 and common.read_results(tmp_path / "none") == []


def test_run_all_reads_the_results_and_ends_with_the_goals(bench, tmp_path, monkeypatch, capsys):
    _, run_all = bench
    here = tmp_path / "benchmarks"  # the table goes into the benchmarks' README, found by its markers
    here.mkdir()
    (here / "common.py").write_text((BENCH / "common.py").read_text())
    (here / "bench_fake.py").write_text(
        "from common import emit\n"
        "print('free text that is not a result: ignored')\n"
        "emit('fast_thing', 'ratio 2.0 vs slow', ratio=2.0, goal='>= 1.5')\n"
        "emit('slow_thing', 'ratio 0.5 vs fast', ratio=0.5, goal='>= 1.5')\n")
    (here / "README.md").write_text("# b\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    monkeypatch.setattr(run_all, "HERE", here)
    monkeypatch.setattr(run_all, "SCRIPTS", {"bench_fake.py": ([], None), "bench_gpu_only.py": (None, [])})
    assert run_all.main([]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-2] == "goals met: 1 of 2; missed: slow_thing (ratio >= 1.5)"
    table = (here / "README.md").read_text()
    assert "| `fast_thing` | ratio 2.0 vs slow | ratio >= 1.5: met | `bench_fake.py` |" in table
    assert "| `slow_thing` | ratio 0.5 vs fast | ratio >= 1.5: **missed** | `bench_fake.py` |" in table
    assert "old" not in table and "goals met: 1 of 2" in table
    (here / "bench_fake.py").write_text("import sys\nsys.exit(3)\n")
    assert run_all.main(["--no-readme"]) == 3


def test_every_benchmark_reports_through_emit():
    """No benchmark prints a result line by hand (run_all would not see it)."""
    import re

    for script in sorted(BENCH.glob("bench_*.py")):
        text = script.read_text()
        hand = re.findall(r'print\(f?"[a-z0-9_{}]+: ', text)
        assert not hand, (script.name, hand)
        assert "from common import" in text and "emit(" in text, script.name


def _arm(mean, per_seed_delta=None):
    a = {"seeds": 4, "test": {"macro_auc": {"mean": mean, "std": 0.01}}}
    if per_seed_delta is not None:
        a["paired_vs_default"] = {"mean": per_seed_delta, "t_ci": [per_seed_delta - 0.01, per_seed_delta + 0.01],
                                  "verdict": "within noise"}
    return a


def test_arch_table_auc_reads_every_study_and_pairs_each_network_with_its_own_default(bench, tmp_path,
                                                                                       monkeypatch):
    # the arch table's AUC column: resnet34 from the first study, each other network from the first study that
    # holds it, with its paired difference from that study's default (the studies ran on different CPUs)
    import json

    import bench_archs

    (tmp_path / "a.json").write_text(json.dumps({"arms": {"default": _arm(0.88), "resnet18": _arm(0.90, 0.02),
                                                          "default_ema": _arm(0.95, 0.07)}}))
    (tmp_path / "b.json").write_text(json.dumps({"arms": {
        "default": _arm(0.70), "resnet18": _arm(0.10, -0.6), "resnet34_attn_se": _arm(0.71, 0.01),
        "resnet34_attn_cbam": _arm(0.72, 0.02), "convnext_tiny": _arm(0.66, -0.04)}}))
    cells = bench_archs.study_auc(("a", "missing", "b"), tmp_path)
    assert set(cells) == {"resnet34", "resnet18", "resnet34_attn", "convnext_tiny"}  # default_ema is a recipe arm
    assert cells["resnet34"] == "0.8800 ± 0.0100 (4 seeds)"
    assert cells["resnet18"] == "0.9000 ± 0.0100 (4 seeds); Δ +0.0200 [+0.0100, +0.0300], within noise (`a`)"
    assert cells["convnext_tiny"].startswith("0.6600 ± 0.0100 (4 seeds); Δ -0.0400 [-0.0500, -0.0300]")
    assert cells["convnext_tiny"].endswith("(`b`)")
    assert cells["resnet34_attn"].startswith("se: 0.7100") and "; cbam: 0.7200" in cells["resnet34_attn"]
    # a bf16 arm: left out beside its network's fp32 arm, marked where it stands alone
    (tmp_path / "c.json").write_text(json.dumps({"arms": {
        "default": _arm(0.76), "default_bf16": _arm(0.75, -0.01), "d4net": _arm(0.87, 0.10),
        "d4net_bf16": _arm(0.86, 0.09), "lensnet_bf16": _arm(0.83, 0.065)}}))
    cells = bench_archs.study_auc(("c",), tmp_path)
    assert cells["resnet34"] == "0.7600 ± 0.0100 (4 seeds)" and cells["d4net"].startswith("0.8700 ± 0.0100")
    assert cells["lensnet"].startswith("bf16: 0.8300 ± 0.0100 (4 seeds); Δ +0.0650")

"""Paired comparison of two report rows: trials matched by detection seed, t interval and test by hand."""

import json
import math
import os

import pytest
from conftest import load_tool

from experiments.report import PUBLISHED_VOC, paired, published_markdown, summarize, write_report

# AP50 of five paired trials (seed -> value): differences 2, 3, 1, 4, 0 (mean 2, sample sd sqrt(2.5))
MOCO = {0: 12.0, 1: 13.0, 2: 11.0, 3: 14.0, 4: 10.0}
RANDOM = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0}
# t(0.975, df 4) = 2.7764451; half-width = 2.7764451 * sqrt(2.5 / 5)
HALF_WIDTH = 2.7764451 * math.sqrt(0.5)
# one-sided p of t = 2 / sqrt(0.5) = 2.8284 with 4 df (scipy.stats.t.sf), written out: 0.023710
P_ONE_SIDED = 0.023710


def _runs(root, label, by_seed, shuffle=False):
    seeds = sorted(by_seed, reverse=shuffle)  # run folder order must not matter
    for i, seed in enumerate(seeds):
        folder = os.path.join(root, f"{label}_{i}")
        os.makedirs(folder)
        with open(os.path.join(folder, "final_metrics.json"), "w") as f:
            json.dump(
                {
                    "task": "voc",
                    "seed": seed,
                    "metrics": {"bbox": {"AP50": by_seed[seed], "AP": 1.0, "AP75": 1.0}},
                },
                f,
            )
    return [os.path.join(root, f"{label}_{i}") for i in range(len(seeds))]


def test_paired_difference_matches_hand_computation(tmp_path):
    table = summarize(
        {
            "moco": _runs(tmp_path, "moco", MOCO, shuffle=True),
            "random": _runs(tmp_path, "random", RANDOM),
        }
    )
    result = paired(table, "moco", "random")
    assert result.metric == "AP50" and result.n_pairs == 5
    assert result.mean_diff == pytest.approx(2.0)
    assert result.ci95 == pytest.approx((2.0 - HALF_WIDTH, 2.0 + HALF_WIDTH), abs=1e-6)
    assert result.p_value == pytest.approx(P_ONE_SIDED, abs=1e-5)
    assert result.to_dict() == {
        "metric": "AP50",
        "n_pairs": 5,
        "mean_diff": pytest.approx(2.0),
        "ci95": [pytest.approx(2.0 - HALF_WIDTH), pytest.approx(2.0 + HALF_WIDTH)],
        "p_value": pytest.approx(P_ONE_SIDED, abs=1e-5),
        "unpaired": {},
    }
    assert "moco is ahead of random" in result.line()
    reverse = paired(table, "random", "moco")
    assert reverse.mean_diff == pytest.approx(-2.0) and reverse.p_value == pytest.approx(
        1 - P_ONE_SIDED, abs=1e-5
    )
    assert "random is behind moco" in reverse.line()


def test_paired_uses_only_shared_seeds_and_says_when_an_interval_is_impossible(tmp_path):
    table = summarize(
        {
            "moco": _runs(tmp_path, "moco", {0: 12.0, 7: 30.0}),
            "random": _runs(tmp_path, "random", {0: 10.0, 1: 50.0}),
        }
    )
    one = paired(table, "moco", "random")
    assert one.n_pairs == 1 and one.mean_diff == pytest.approx(2.0) and one.ci95 is None
    assert "too few pairs" in one.line()
    other = summarize(
        {"a": _runs(tmp_path / "x", "a", {3: 1.0}), "b": _runs(tmp_path / "y", "b", {4: 1.0})}
    )
    with pytest.raises(ValueError, match="share no detection seed"):
        paired(other, "a", "b")


def test_an_interval_containing_zero_is_reported_as_no_difference(tmp_path):
    table = summarize(
        {
            "moco": _runs(tmp_path, "moco", {0: 11.0, 1: 9.0, 2: 10.5}),
            "random": _runs(tmp_path, "random", {0: 10.0, 1: 10.0, 2: 10.0}),
        }
    )
    result = paired(table, "moco", "random")
    assert result.ci95[0] < 0 < result.ci95[1]
    assert "no difference shown" in result.line()


def test_published_rows_are_labelled_and_kept_out_of_the_table(tmp_path):
    table = summarize({"moco": _runs(tmp_path, "moco", MOCO)})
    paths = write_report(table, str(tmp_path / "report"), published=True)
    text = open(paths["md"]).read()
    assert "not measured here" in text and "| MoCo IN-1M | 81.5 | 55.9 | 62.6 |" in text
    assert "| Jigsaw (Goyal et al.) | AP50 | 70.5 | 61.4 (-9.1) |" in text
    assert [r.label for r in table.rows] == ["moco"]  # the statistics see measured rows only
    assert dict(PUBLISHED_VOC)["random init"] == (60.2, 33.8, 33.1)
    assert published_markdown() in text


def test_report_cli_pairs_any_runs_by_seed_and_writes_a_row_per_trial(tmp_path, capsys):
    """tools/report.py on runs of its caller's: the pipeline's paired line (hand-computed numbers
    above), the unpaired seeds named and left out, and transfer_trials.csv one row per run."""
    import csv

    moco = {**MOCO, 9: 40.0}  # seed 9: no random trial to pair with
    _runs(tmp_path, "moco", moco, shuffle=True)
    random = {**RANDOM, 8: 0.0}
    _runs(tmp_path, "random", random)
    out = tmp_path / "report"
    argv = [f"moco={tmp_path}/moco_*", f"random={tmp_path}/random_*", "--output-dir", str(out)]
    assert load_tool("report").main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    lo, hi = 2.0 - HALF_WIDTH, 2.0 + HALF_WIDTH
    line = (
        f"moco vs random: AP50 paired difference +2.00, 95% CI [{lo:+.2f}, {hi:+.2f}], "
        f"one-sided p = {P_ONE_SIDED:.3g} (n = 5 pairs): moco is ahead of random; "
        "unpaired, left out: moco seed 9; random seed 8"
    )
    assert line in printed.splitlines()
    assert f"- {line}" in (out / "transfer.md").read_text()
    with open(out / "transfer_trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "label", "seed", "AP50", "AP", "AP75", "iterations", "weights_sha256", "run"
    ]  # fmt: skip
    assert len(rows) == 12 and {r["label"] for r in rows} == {"moco", "random"}
    by = {(r["label"], int(r["seed"])): float(r["AP50"]) for r in rows}
    expected = {("moco", s): v for s, v in moco.items()}
    expected.update({("random", s): v for s, v in random.items()})
    assert by == expected
    # labels that share no seed: a line that says so, the report still written
    _runs(tmp_path / "x", "other", {20: 5.0, 21: 6.0})
    argv = [f"moco={tmp_path}/moco_*", f"other={tmp_path}/x/other_*"]
    assert load_tool("report").main(argv) == 0
    assert "moco vs other: not paired, rows 'moco' and 'other' share no detection seed" in (
        capsys.readouterr().out
    )

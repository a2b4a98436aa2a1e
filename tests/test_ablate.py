"""experiments.ablate / tools/ablate.py: fail detector, table / CSV / JSON / plot with 95% CIs,
paired differences by seed (scipy), named variants, a real tiny sweep with a NaN run labeled fail
and the key encoder's drift, lanes (worker processes) giving the in-process results, reuse of
finished runs, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from experiments.ablate import (
    aggregate,
    detect_failure,
    load_ablation_cfg,
    markdown_table,
    paired_rows,
    plan_runs,
    report_finished,
    run_ablation,
    write_report,
)
from experiments.report import paired_difference

TOOL = os.path.join(REPO, "tools", "ablate.py")


def test_fail_detector_on_synthetic_metrics():
    decreasing = [8.0 - 0.2 * i for i in range(20)]
    assert detect_failure(decreasing, knn_top1=40.0, chance=10.0) is None
    # MoCo's loss rises while the queue fills (first quarter), then falls: not a failure
    assert detect_failure([2.0, 3.0, 6.0, 7.0, 7.0, 6.8, 6.5, 6.0, 5.5, 5.0, 4.8, 4.5]) is None
    oscillating = [7.0, 5.0, 7.2, 5.1] * 5
    assert detect_failure(oscillating).startswith("loss not decreasing")
    assert detect_failure(decreasing[:5] + [float("nan")]) == "loss not finite"
    assert detect_failure(decreasing, knn_top1=10.5, chance=10.0).startswith("accuracy at chance")
    assert detect_failure(decreasing, knn_top1=10.5, chance=10.0, chance_margin=0.0) is None
    # fewer than 8 logged losses: the trend is not judged
    assert detect_failure([5.0, 6.0, 7.0]) is None


def _records():
    recs = []
    for value, accs in ((0.0, [None, None]), (0.9, [50.0, 54.0]), (0.99, [60.0, None])):
        for seed, acc in enumerate(accs):
            recs.append(
                {
                    "series": "moco",
                    "value": value,
                    "seed": seed,
                    "dir": f"d{value}{seed}",
                    "status": "ok" if acc is not None else "fail",
                    "reason": None if acc is not None else "loss not decreasing (1 -> 1)",
                    "knn_top1": acc,
                    "knn_untrained": 40.0 + seed,
                    "below_untrained": False,
                    "lincls_top1": None,
                }
            )
    return recs


def test_table_csv_json_and_plot(tmp_path):
    acfg = load_ablation_cfg()
    acfg.SETTING = "m"
    rows = write_report(_records(), acfg, output_dir=str(tmp_path))
    assert [r["value"] for r in rows] == [0.0, 0.9, 0.99]
    assert rows[1]["knn_top1"] == pytest.approx(52.0) and rows[1]["knn_top1_std"] == pytest.approx(
        2.828, abs=1e-3
    )
    # 95% t interval of [50, 54]: 52 +- t(0.975, 1) * 2 = 52 +- 25.41
    assert rows[1]["knn_top1_ci95"] == pytest.approx([52 - 25.412, 52 + 25.412], abs=1e-2)
    assert rows[1]["knn_untrained"] == pytest.approx(40.5)
    md = (tmp_path / "ablation.md").read_text().splitlines()
    assert md[0] == (
        "| mechanism | m | kNN top-1 | 95% CI | untrained kNN | seeds | below untrained |"
    )
    assert md[2] == "| moco | 0 | fail | - | 40.5 | 2 | 0/2 |"
    assert md[3] == "| moco | 0.9 | 52.0 ± 2.8 | [26.6, 77.4] | 40.5 | 2 | 0/2 |"
    assert md[4] == "| moco | 0.99 | 60.0 ± 0.0 (1/2 fail) | - | 40.5 | 2 | 0/2 |"
    # adjacent pairs, by seed over the seeds where both runs are ok: 0.9 - 0 has none,
    # 0.99 - 0.9 has seed 0 only (+10, no interval)
    assert "| moco:0.9 - moco:0 | kNN top-1 | 0 | - | - | - |" in md
    assert "| moco:0.99 - moco:0.9 | kNN top-1 | 1 | +10.0 | - | - |" in md
    csv_lines = (tmp_path / "ablation.csv").read_text().splitlines()
    assert csv_lines[1].startswith("moco,0.0,,,") and csv_lines[1].endswith(",2,2,0,fail")
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["setting"] == "m" and len(data["runs"]) == 6
    assert data["rows"][0]["reasons"] == [f"seed {s}: loss not decreasing (1 -> 1)" for s in (0, 1)]
    assert [(p["a"], p["b"], p["n_pairs"]) for p in data["pairs"]] == [
        ("moco:0.9", "moco:0", 0),
        ("moco:0.99", "moco:0.9", 1),
    ]
    png = (tmp_path / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the failed runs measured no kNN: no second table of pairs
    assert data["pairs_any_status"] == [] and "failed runs included" not in "\n".join(md)


def test_runs_the_fail_rule_flags_are_paired_in_a_second_table(tmp_path):
    """Issue 23: the fail rule reads the loss; a flagged run whose kNN was measured (v1 at T 0.07:
    the loss fell, then plateaued) is left out of the ok-only pairs, and paired in a second table."""
    from scipy import stats

    acfg = load_ablation_cfg()
    acfg.SETTING = "m"
    recs = [r for r in _records() if r["value"] == 0.9]
    for seed, acc in enumerate([70.0, 66.0]):
        recs.append(
            {**recs[seed], "value": 0.99, "status": "fail", "reason": "loss", "knn_top1": acc}
        )
    write_report(recs, acfg, output_dir=str(tmp_path))
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert [(p["a"], p["n_pairs"]) for p in data["pairs"]] == [("moco:0.99", 0)]
    [row] = data["pairs_any_status"]
    assert (row["a"], row["b"], row["n_pairs"], row["mean_diff"]) == (
        "moco:0.99",
        "moco:0.9",
        2,
        16.0,
    )
    assert row["p_value"] == pytest.approx(stats.ttest_rel([70.0, 66.0], [50.0, 54.0]).pvalue)
    md = (tmp_path / "ablation.md").read_text()
    assert "The same pairs over every run that measured it, failed runs included:" in md
    assert "| moco:0.99 - moco:0.9 | kNN top-1 | 2 | +16.0 |" in md


def test_paired_differences_by_seed_match_scipy():
    from scipy import stats

    def rec(value, seed, acc):
        return {"series": "moco", "value": value, "seed": seed, "status": "ok", "knn_top1": acc}

    a = [61.0, 64.5, 59.0, 66.0]
    b = [60.0, 61.0, 58.5, 62.0]
    # seed order differs between the cells: pairing is by seed, not by position
    recs = [rec(0.99, s, b[s]) for s in (3, 1, 0, 2)] + [rec(0.999, s, a[s]) for s in range(4)]
    recs.append(rec(0.999, 7, 99.0))  # a seed the other cell lacks: not paired
    acfg = load_ablation_cfg()
    (pair,) = paired_rows(recs, acfg, metrics=("knn_top1",))
    diffs = [x - y for x, y in zip(a, b)]
    lo, hi = stats.t.interval(0.95, 3, loc=sum(diffs) / 4, scale=stats.sem(diffs))
    assert pair["a"] == "moco:0.999" and pair["b"] == "moco:0.99" and pair["n_pairs"] == 4
    assert pair["mean_diff"] == pytest.approx(sum(diffs) / 4)
    assert pair["ci95"] == pytest.approx([lo, hi])
    assert pair["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    n, mean, ci, p = paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0], "two-sided")
    assert (n, mean) == (3, 3.0) and ci == pytest.approx([3 - 2.4841, 3 + 2.4841], abs=1e-4)
    # COMPARE names cells; an unknown or ambiguous name is one line listing the cells
    acfg.PAIR_ADJACENT = False
    acfg.COMPARE = [["0.99", "0.999"]]
    (pair,) = paired_rows(recs, acfg, metrics=("knn_top1",))
    assert pair["mean_diff"] == pytest.approx(-sum(diffs) / 4)
    acfg.COMPARE = [["moco:0.5", "0.99"]]
    with pytest.raises(ValueError, match=r"COMPARE: 'moco:0.5' is no cell of this sweep; cells: "):
        paired_rows(recs, acfg)


def test_k_sweep_table_has_one_line_per_mechanism(tmp_path):
    recs = [
        {
            "series": s,
            "value": k,
            "seed": 0,
            "dir": "",
            "status": "ok",
            "reason": None,
            "knn_top1": 30.0 + k / 64,
            "knn_untrained": 20.0,
            "lincls_top1": 20.0,
        }
        for s in ("end_to_end", "memory_bank", "moco")
        for k in (64, 128)
    ]
    rows = aggregate(recs)
    assert [(r["series"], r["value"]) for r in rows][:2] == [
        ("end_to_end", 64),
        ("end_to_end", 128),
    ]
    assert "| linear top-1 |" in markdown_table(rows, "K")
    acfg = load_ablation_cfg()
    acfg.SETTING = "K"
    write_report(recs, acfg, output_dir=str(tmp_path))  # log-2 axis, three lines
    assert (tmp_path / "ablation.png").stat().st_size > 5000


def _tiny_acfg(synthetic_root, out, **kw):
    data = os.path.join(synthetic_root, "imagefolder")
    acfg = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", "momentum.yaml"))
    acfg.PRETRAIN_CONFIG = os.path.join(REPO, "configs", "pretrain", "moco_v1_R18_cpu.yaml")
    acfg.OPTS = list(acfg.OPTS) + [
        "DATA.ROOT",
        data,
        "KNN.DATA",
        data,
        "KNN.AT_START",
        "True",
        "KNN.PERIOD",
        "1",
        "SOLVER.CHECKPOINT_PERIOD",
        "5",
        "SOLVER.IMS_PER_BATCH",
        "8",
        "MODEL.K",
        "16",
        "SOLVER.EPOCHS",
        "1",
        "INPUT.CROP_SIZE",
        "32",
        "MODEL.DIM",
        "16",
        "MODEL.SPLIT_BN_GROUPS",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "KNN.BATCH_SIZE",
        "16",
        "LOG_PERIOD",
        "1",
    ]
    acfg.SEEDS = [0]
    acfg.JOBS = 1
    acfg.FAIL.CHANCE_MARGIN = -100.0  # 3 iterations cannot beat chance; judge only NaN here
    acfg.OUTPUT_DIR = str(out)
    for k, v in kw.items():
        acfg[k] = v
    return acfg


# T = 1e-45 is a float32 denormal: the logits overflow to inf and the loss is NaN at step 0
VARIANTS = [["m0.9", "MODEL.M", 0.9], ["m0.9999", "MODEL.M", "0.9999"], ["nan", "MODEL.T", 1e-45]]


def test_tiny_variant_sweep_labels_a_nan_run_fail_logs_drift_and_reuses_runs(
    synthetic_root, tmp_path, one_thread
):
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="variant", VARIANTS=VARIANTS, VALUES=[])
    rows, records = run_ablation(acfg)
    fast, slow, nan = records
    for ok in (fast, slow):
        assert ok["status"] == "ok" and ok["knn_top1"] is not None and ok["iterations"] == 3
        assert ok["knn_untrained"] is not None  # KNN.AT_START's pass, beside the final one
        assert ok["knn_gain"] == pytest.approx(ok["knn_top1"] - ok["knn_untrained"])
        start, end = ok["key_encoder_drift"]
        assert (start["epoch"], end["epoch"]) == (0, 1)
        # the key encoder starts as a copy of the query encoder
        assert start["key_drift_start"] == 0.0 and start["key_gap_query"] == 0.0
        assert end["key_drift_start"] > 0 and end["key_gap_query"] > 0
    # m = 0.9999 moves its key encoder ~1000x less than m = 0.9 in 3 steps (1 - m^3)
    drift = [r["key_encoder_drift"][-1]["key_drift_start"] for r in (fast, slow)]
    assert drift[1] < drift[0] / 100, drift
    assert nan["status"] == "fail" and "nan" in nan["reason"].lower(), nan["reason"]
    assert os.path.isfile(os.path.join(fast["dir"], "pretrain_summary.json"))
    assert os.path.basename(os.path.dirname(fast["dir"])) == "variant=m0.9"
    assert os.path.basename(fast["dir"]).startswith("seed0-")  # keyed by its config
    md = (tmp_path / "ablation.md").read_text()
    assert "| moco | nan | fail | - |" in md
    assert "| moco:m0.9999 - moco:m0.9 | kNN top-1 | 1 |" in md
    for name in ("ablation.csv", "ablation.json", "ablation.png"):
        assert (tmp_path / name).is_file()
    # a second call reuses the finished runs and retries the one that raised
    _, again = run_ablation(acfg)
    assert again[0]["reused"] and again[0]["knn_top1"] == fast["knn_top1"]
    assert again[1]["key_encoder_drift"] == slow["key_encoder_drift"]
    assert not again[2]["reused"] and again[2]["status"] == "fail"
    # a sweep sharing the folder, with its own REPORT_DIR, reuses the run both name and keeps
    # its report apart
    other = acfg.clone()
    other.VALUES, other.REPORT_DIR = ["m0.9"], "other"
    _, shared = run_ablation(other)
    assert shared[0]["reused"] and shared[0]["knn_top1"] == fast["knn_top1"]
    assert [
        r["value"] for r in json.loads((tmp_path / "other" / "ablation.json").read_text())["runs"]
    ] == ["m0.9"]
    assert "| moco | nan | fail | - |" in (tmp_path / "ablation.md").read_text()
    # the report of a sweep still running: finished runs in the tables, the others listed, and
    # a pair with an unfinished cell left out (not reported as an unknown cell); a name that is
    # no cell of the sweep still fails
    acfg.VARIANTS = VARIANTS + [["m0.5", "MODEL.M", "0.5"]]
    acfg.COMPARE = [["m0.9999", "m0.9"], ["m0.5", "m0.9"]]
    acfg.PAIR_ADJACENT = False
    typo = acfg.clone()
    typo.COMPARE = [["m0.25", "m0.9"]]
    with pytest.raises(ValueError, match="COMPARE: 'm0.25' is no cell of this sweep"):
        report_finished(typo)
    rows, partial, not_run = report_finished(acfg)
    assert [r["value"] for r in partial] == ["m0.9", "m0.9999", "nan"] and not_run == [
        os.path.join("moco", "variant=m0.5", "seed0")
    ]
    assert partial[0]["knn_top1"] == fast["knn_top1"] and partial[2]["status"] == "fail"
    md = (tmp_path / "ablation.md").read_text()
    assert "Not finished, so not in the tables (1 runs): moco/variant=m0.5/seed0" in md
    assert "| moco:m0.9999 - moco:m0.9 | kNN top-1 | 1 |" in md and "m0.5 - " not in md
    acfg.OUTPUT_DIR = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="no finished run of this sweep in .*empty yet"):
        report_finished(acfg)


def test_a_resumed_run_keeps_its_untrained_knn_and_drift_from_before_the_resume(
    tmp_path, monkeypatch
):
    """The summary of a resumed run has only the entries after the resume; the record takes the
    earlier ones from metrics.json (rows at the step's index: i is i + 1 steps done)."""
    import experiments.ablate as ablate
    from moco.config import get_cfg

    rows = [
        {"iteration": 0, "knn_top1": 42.0, "key_drift_start": 0.0, "key_gap_query": 0.0},
        {"iteration": 4, "total_loss": 7.0},
        {"iteration": 9, "total_loss": 6.5, "key_drift_start": 0.2, "key_gap_query": 0.01},
        # the resumed process's rows (start_iter 10), also in its summary
        {"iteration": 19, "total_loss": 6.0, "key_drift_start": 0.3, "key_gap_query": 0.02},
        {"iteration": 20, "knn_top1": 55.0},
    ]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "start_iter": 10,
        "max_iter": 20,
        "iters_per_epoch": 10,
        "knn": [{"epoch": 2, "iteration": 20, "top1": 55.0}],
        "knn_chance": 10.0,
        "key_encoder_drift": [
            {"epoch": 2, "iteration": 20, "key_drift_start": 0.3, "key_gap_query": 0.02}
        ],
        "last_checkpoint": str(tmp_path / "checkpoint_0002.pth.tar"),
    }
    (tmp_path / "pretrain_summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(ablate, "launch_training", lambda *args, **kwargs: None)
    out = ablate.pretrain_run(get_cfg(), 1, str(tmp_path), True)
    assert out["error"] is None and out["losses"] == [7.0, 6.5, 6.0]
    assert out["knn_untrained"] == 42.0 and out["knn_top1"] == 55.0
    assert [e["epoch"] for e in out["knn"]] == [0, 2]
    assert [(e["epoch"], e["key_drift_start"]) for e in out["key_encoder_drift"]] == [
        (0, 0.0),
        (1, 0.2),
        (2, 0.3),
    ]


def test_lanes_run_in_worker_processes_with_the_same_results(synthetic_root, tmp_path, one_thread):
    one = _tiny_acfg(synthetic_root, tmp_path / "one", SETTING="m", VALUES=[0.9, 0.99], SEEDS=[0])
    _, in_process = run_ablation(one)
    two = _tiny_acfg(
        synthetic_root, tmp_path / "two", SETTING="m", VALUES=[0.9, 0.99], SEEDS=[0], JOBS=2
    )
    _, lanes = run_ablation(two)
    for a, b in zip(in_process, lanes):
        assert not b["reused"] and b["status"] == "ok"
        # one thread each, same seed: the lane's run is the in-process run, bit for bit
        assert (a["knn_top1"], a["loss_last"]) == (b["knn_top1"], b["loss_last"])
        assert "kNN top-1" in open(os.path.join(b["dir"], "console.log")).read()
        assert not os.path.exists(os.path.join(a["dir"], "console.log"))


def test_end_to_end_k_is_the_batch_with_linear_lr_scaling(synthetic_root, tmp_path):
    acfg = _tiny_acfg(
        synthetic_root, tmp_path, SETTING="K", VALUES=[16, 20], SERIES=["end_to_end", "moco"]
    )
    with pytest.raises(
        ValueError, match=r"ablation run moco K=20: MODEL.K \(--moco-k\) = 20 is not a multiple"
    ):
        plan_runs(acfg)
    acfg.VALUES = [16]
    e2e, moco = plan_runs(acfg)
    assert e2e["cfg"].SOLVER.IMS_PER_BATCH == 16 and e2e["cfg"].MODEL.MECHANISM == "end_to_end"
    assert e2e["cfg"].SOLVER.BASE_LR == pytest.approx(moco["cfg"].SOLVER.BASE_LR * 2)
    assert moco["cfg"].SOLVER.IMS_PER_BATCH == 8 and moco["cfg"].MODEL.K == 16
    acfg.SKIP = ["end_to_end:16"]
    (only,) = plan_runs(acfg)
    assert only["series"] == "moco"


def test_variants_are_named_override_lists(synthetic_root, tmp_path):
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="variant", VARIANTS=VARIANTS, VALUES=[])
    runs = plan_runs(acfg)
    assert [r["value"] for r in runs] == ["m0.9", "m0.9999", "nan"]  # all, in order
    assert [r["cfg"].MODEL.M for r in runs[:2]] == [0.9, 0.9999]
    assert runs[2]["cfg"].MODEL.T == pytest.approx(1e-45)
    acfg.VALUES = ["m0.9999"]
    (run,) = plan_runs(acfg)
    assert run["cfg"].MODEL.M == 0.9999
    acfg.VALUES = ["v3"]
    with pytest.raises(ValueError, match=r"VALUES \(--values\) \['v3'\] are not VARIANTS"):
        plan_runs(acfg)
    acfg.VALUES, acfg.VARIANTS = [], [["odd", "MODEL.M"]]
    with pytest.raises(ValueError, match="VARIANTS 'odd': overrides must be KEY VALUE pairs"):
        plan_runs(acfg)
    acfg.VARIANTS = [["bad", "MODEL.NOPE", 1]]
    with pytest.raises(ValueError, match="ablation run moco variant=bad: .*MODEL.NOPE"):
        plan_runs(acfg)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--setting", "m", "--values", "a"], "values of m must be floats"),
        (
            ["--setting", "K", "--values", "64", "--series", "simclr"],
            "SERIES (--series) names mechanisms",
        ),
        (["--preset", "nope.yaml"], "--preset nope.yaml does not exist"),
        (["--jobs", "two"], "--jobs must be auto or a number >= 1, got 'two'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, TOOL, *args, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate.py: error: ") and message in lines[0], (
        lines
    )


def test_a_changed_configuration_gets_a_new_folder(synthetic_root, tmp_path):
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="m", VALUES=[0.9])
    (run,) = plan_runs(acfg)
    assert plan_runs(acfg)[0]["dir"] == run["dir"]  # the same configuration: the same folder
    acfg.OPTS = list(acfg.OPTS) + ["SOLVER.BASE_LR", "0.5"]
    (other,) = plan_runs(acfg)
    assert other["dir"] != run["dir"]
    assert os.path.dirname(other["dir"]) == os.path.dirname(run["dir"])  # moco/m=0.9/


def test_data_changed_in_place_gets_a_new_folder(synthetic_root, tmp_path, monkeypatch):
    """The run folder's key holds what the data is, not only its path: a set regenerated under
    the same root (another seed, another file) must not reuse the old runs (issue 27's rule)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.join(synthetic_root, "imagefolder"), data)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    acfg = _tiny_acfg(synthetic_root, tmp_path / "out", SETTING="m", VALUES=[0.9])
    acfg.OPTS = list(acfg.OPTS) + ["DATA.ROOT", "$DETECTRON2_DATASETS/data", "KNN.DATA", ""]
    (run,) = plan_runs(acfg)
    assert plan_runs(acfg)[0]["dir"] == run["dir"]
    first = next(p for p in sorted(data.rglob("*.jpg")))
    first.write_bytes(first.read_bytes() + b"\0" * 7)  # the same names, one file rewritten
    assert plan_runs(acfg)[0]["dir"] != run["dir"]


def test_named_cells_are_fine_tuned_in_paired_detection_trials(
    synthetic_root, tmp_path, one_thread, monkeypatch
):
    """Issue 23: the mechanisms' checkpoints at the largest K go through conversion and the
    embedded detection fine-tune as paired trials, reported with the pipeline's statistics."""
    from test_train_net import TINY

    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(synthetic_root))
    acfg = _tiny_acfg(
        synthetic_root,
        tmp_path,
        SETTING="K",
        VALUES=[16],
        SERIES=["moco", "memory_bank"],
        PAIR_ADJACENT=False,
    )
    acfg.OPTS = [*acfg.OPTS, "MODEL.ARCH", "resnet18_w16"]  # the detection config's backbone
    acfg.DETECTION.CELLS = ["moco:16", "memory_bank:16"]
    acfg.DETECTION.OPTS = [*TINY, "SOLVER.MAX_ITER", "2", "TEST.PRECISE_BN.NUM_ITER", "1"]
    acfg.DETECTION.TRIALS = 0  # the cells named, detection off (--detection-trials 0)
    run_ablation(acfg)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(("detect_", "convert_"))]
    assert not os.path.exists(tmp_path / "detection")
    with open(tmp_path / "ablation.json") as f:
        assert json.load(f)["detection"] == []
    assert report_finished(acfg)[2] == []  # no detection is owed either
    acfg.DETECTION.TRIALS = 2  # then on: the pretrainings are reused, the trials run
    _, records = run_ablation(acfg)
    assert [r["status"] for r in records] == ["ok", "ok"] and all(r["reused"] for r in records)
    runs = sorted(d for d in os.listdir(tmp_path) if d.startswith("detect_"))
    assert [d.rsplit("-", 1)[0] for d in runs] == [
        "detect_memory_bank_16_s0",
        "detect_memory_bank_16_s1",
        "detect_moco_16_s0",
        "detect_moco_16_s1",
    ]
    for d in runs:  # each trial fine-tuned its cell's converted checkpoint with its own seed
        with open(tmp_path / d / "final_metrics.json") as f:
            final = json.load(f)
        cell = d.rsplit("_s", 1)[0][len("detect_") :]
        assert os.path.basename(final["weights"]) == f"{cell}.pkl"
        assert final["seed"] == int(d.rsplit("_s", 1)[1].split("-")[0])
    md = (tmp_path / "detection" / "transfer.md").read_text()
    assert "| moco_16 | 2 |" in md and "| memory_bank_16 | 2 |" in md
    line = "moco_16 vs memory_bank_16: AP50 paired difference"
    assert line in md and line in (tmp_path / "ablation.md").read_text()
    with open(tmp_path / "ablation.json") as f:
        assert json.load(f)["detection"][0].startswith(line)
    # a second call reuses every stage, detection included
    mtimes = {d: os.path.getmtime(tmp_path / d / "final_metrics.json") for d in runs}
    _, again = run_ablation(acfg)
    assert all(r["reused"] for r in again)
    assert mtimes == {d: os.path.getmtime(tmp_path / d / "final_metrics.json") for d in runs}
    # --report-only finds the same detection report, and lists a cell with a trial unfinished
    with open(tmp_path / "ablation.json") as f:
        detection = json.load(f)["detection"]
    _, _, not_run = report_finished(acfg)
    assert not_run == []
    with open(tmp_path / "ablation.json") as f:
        assert json.load(f)["detection"] == detection
    # a sweep with its own REPORT_DIR in the same folder: its detection report goes there too
    acfg.REPORT_DIR = "other"
    report_finished(acfg)
    assert (tmp_path / "other" / "detection" / "transfer.md").read_text() == md
    with open(tmp_path / "other" / "ablation.json") as f:
        assert json.load(f)["detection"] == detection
    acfg.REPORT_DIR = ""
    os.remove(tmp_path / runs[3] / "stage.json")  # moco_16's second trial, as if still running
    _, _, not_run = report_finished(acfg)
    assert not_run == ["detection of moco:16"]
    with open(tmp_path / "ablation.json") as f:
        assert json.load(f)["detection"] == []  # one cell left: no pair to compare
    assert "| memory_bank_16 | 2 |" in (tmp_path / "detection" / "transfer.md").read_text()


def test_detection_cells_must_be_cells_of_the_sweep(synthetic_root, tmp_path):
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="m", VALUES=[0.9, 0.5], SEEDS=[0, 1])
    acfg.DETECTION.CELLS = ["moco:0.99"]
    with pytest.raises(  # each cell named once, not once per seed
        ValueError,
        match=r"DETECTION.CELLS: 'moco:0.99' is not a cell of this sweep \(moco:0.9, moco:0.5\)$",
    ):
        run_ablation(acfg)
    acfg.DETECTION.TRIALS = 0  # named but not fine-tuned: still a cell of the sweep
    with pytest.raises(ValueError, match="DETECTION.CELLS: 'moco:0.99' is not a cell"):
        run_ablation(acfg)
    acfg.DETECTION.CELLS, acfg.DETECTION.TRIALS = ["moco:0.9"], -1
    with pytest.raises(ValueError, match=r"DETECTION.TRIALS \(--detection-trials\) must be >= 0"):
        run_ablation(acfg)


@pytest.mark.parametrize(
    "preset",
    sorted(os.listdir(os.path.join(REPO, "configs", "ablation"))),
    ids=lambda p: p[: -len(".yaml")],
)
def test_every_shipped_preset_plans_its_runs_and_names_cells_it_has(preset, synthetic_root):
    """Each configs/ablation preset, on the tests' small set: its runs plan (every override is a
    key, every value trains), its COMPARE pairs and DETECTION.CELLS name cells of the sweep, and
    its detection config exists."""
    from experiments.ablate import cell_name, pair_list
    from experiments.ablation_transfer import check_cells

    acfg = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", preset))
    data = os.path.join(synthetic_root, "imagefolder")
    acfg.OPTS = list(acfg.OPTS) + ["DATA.ROOT", data, "KNN.DATA", data]
    runs = plan_runs(acfg)
    assert len({r["dir"] for r in runs}) == len(runs)
    records = [{k: r[k] for k in ("series", "value", "seed")} for r in runs]
    assert len(pair_list(records, acfg)) >= 1
    check_cells(acfg, [cell_name(r["series"], r["value"]) for r in runs])
    if acfg.DETECTION.CELLS:  # fine-tuned, or named for --detection-trials N
        assert os.path.isfile(os.path.join(REPO, acfg.DETECTION.CONFIG))


def test_v2_levers_shares_the_ladders_runs_and_reports_apart(synthetic_root):
    """configs/ablation/v2_levers.yaml's v1, mlp and aug+ cells are v1_to_v2.yaml's runs (same
    folders, so either preset reuses the other's, linear evaluations and fine-tunes included); its
    report is its own."""
    from experiments.ablate import report_dir

    data = os.path.join(synthetic_root, "imagefolder")
    plans = {}
    for name in ("v1_to_v2", "v2_levers"):
        acfg = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", f"{name}.yaml"))
        acfg.OPTS = list(acfg.OPTS) + ["DATA.ROOT", data, "KNN.DATA", data]
        plans[name] = (acfg, {(r["value"], r["seed"]): r["dir"] for r in plan_runs(acfg)})
    (ladder, ladder_dirs), (levers, levers_dirs) = plans["v1_to_v2"], plans["v2_levers"]
    shared = set(ladder_dirs) & set(levers_dirs)
    assert {v for v, _ in shared} == {"v1", "mlp", "aug+"} and len(shared) == 9
    assert all(ladder_dirs[k] == levers_dirs[k] for k in shared)
    assert len(set(levers_dirs.values()) - set(ladder_dirs.values())) == 6
    ladder.LINEAR.EPOCHS = 5  # the ladder's --linear-epochs 5
    assert dict(ladder.LINEAR) == dict(levers.LINEAR)
    assert report_dir(levers) != report_dir(ladder)
    # their fine-tunes of those cells are the same stages too: one detector, the same trials
    assert ladder.DETECTION.TRIALS == 0  # the ladder's AP50 is opt-in: --detection-trials 5
    ladder.DETECTION.TRIALS = 5
    same = ("CONFIG", "OPTS", "TRIALS", "SEED", "PRETRAIN_SEED")
    assert [ladder.DETECTION[k] for k in same] == [levers.DETECTION[k] for k in same]
    assert set(levers.DETECTION.CELLS) < set(ladder.DETECTION.CELLS)
    # aug_plus_parts: the ladder's v1 and aug+ runs, and 6 of its own (blur off, blur scaled)
    parts = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", "aug_plus_parts.yaml"))
    parts.OPTS = list(parts.OPTS) + ["DATA.ROOT", data, "KNN.DATA", data]
    runs = plan_runs(parts)
    dirs = {(r["value"], r["seed"]): r["dir"] for r in runs}
    assert {k for k in dirs if dirs[k] in ladder_dirs.values()} == {
        (v, s) for v in ("v1", "aug+") for s in (0, 1, 2)
    }
    blur = {r["value"]: (r["cfg"].INPUT.BLUR_PROB, tuple(r["cfg"].INPUT.BLUR_SIGMA)) for r in runs}
    assert blur["aug+_noblur"][0] == 0.0 and blur["aug+_blur_scaled"] == (0.5, (0.0143, 0.286))
    assert report_dir(parts) not in (report_dir(ladder), report_dir(levers))


def test_values_leave_out_the_pairs_and_cells_of_other_values(synthetic_root, tmp_path):
    """--values runs part of a preset: the COMPARE pairs and DETECTION.CELLS naming the values
    left out go with them (the report of head_budget's 2x pair once failed after its runs); a
    COMPARE name that is no cell at all is one line before any run."""
    from experiments.ablate import pair_list, select_values

    data = os.path.join(synthetic_root, "imagefolder")
    acfg = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", "head_budget.yaml"))
    acfg.OPTS = list(acfg.OPTS) + ["DATA.ROOT", data, "KNN.DATA", data]
    select_values(acfg, ["linear_x2", "mlp_x2"])
    assert acfg.COMPARE == [["mlp_x2", "linear_x2"]]
    assert pair_list(plan_runs(acfg), acfg) == [(("moco", "mlp_x2"), ("moco", "linear_x2"))]
    levers = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", "v2_levers.yaml"))
    select_values(levers, ["v1", "mlp"])
    assert levers.COMPARE == [["mlp", "v1"]]
    assert levers.DETECTION.CELLS == ["moco:v1", "moco:mlp"]
    tiny = _tiny_acfg(synthetic_root, tmp_path / "sweep", SETTING="m", VALUES=[0.9])
    tiny.COMPARE = [["0.9", "0.99"]]
    with pytest.raises(ValueError, match="COMPARE: '0.99' is no cell of this sweep"):
        run_ablation(tiny)
    assert not os.path.exists(tmp_path / "sweep")

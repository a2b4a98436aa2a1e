"""experiments.ablate / tools/ablate.py: fail detector, table / CSV / JSON / plot, a real tiny sweep with a
NaN run labeled fail, reuse of finished runs, one-line errors."""

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
    plan_runs,
    run_ablation,
    write_report,
)

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
    md = (tmp_path / "ablation.md").read_text().splitlines()
    assert md[0] == "| mechanism | m | kNN top-1 | seeds |"
    assert md[2] == "| moco | 0 | fail | 2 |"
    assert md[3] == "| moco | 0.9 | 52.0 ± 2.8 | 2 |"
    assert md[4] == "| moco | 0.99 | 60.0 ± 0.0 (1/2 fail) | 2 |"
    csv_lines = (tmp_path / "ablation.csv").read_text().splitlines()
    assert csv_lines[1].startswith("moco,0.0,,,") and csv_lines[1].endswith(",2,2,fail")
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["setting"] == "m" and len(data["runs"]) == 6
    assert data["rows"][0]["reasons"] == ["loss not decreasing (1 -> 1)"] * 2
    png = (tmp_path / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


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
    acfg = load_ablation_cfg(os.path.join(REPO, "configs", "ablation", "momentum_cpu.yaml"))
    acfg.PRETRAIN_CONFIG = os.path.join(REPO, "configs", "pretrain", "moco_v1_R18_cpu.yaml")
    acfg.OPTS = list(acfg.OPTS) + [
        "DATA.ROOT",
        data,
        "KNN.DATA",
        data,
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
    acfg.FAIL.CHANCE_MARGIN = -100.0  # 3 iterations cannot beat chance; judge only NaN here
    acfg.OUTPUT_DIR = str(out)
    for k, v in kw.items():
        acfg[k] = v
    return acfg


def test_tiny_sweep_labels_a_nan_run_fail_and_reuses_finished_runs(
    synthetic_root, tmp_path, one_thread
):
    # T = 1e-45 is a float32 denormal: the logits overflow to inf and the loss is NaN at step 0
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="T", VALUES=[0.2, 1e-45])
    rows, records = run_ablation(acfg)
    ok, nan = records
    assert ok["status"] == "ok" and ok["knn_top1"] is not None and ok["iterations"] == 3
    assert nan["status"] == "fail" and "nan" in nan["reason"].lower(), nan["reason"]
    assert os.path.isfile(os.path.join(ok["dir"], "pretrain_summary.json"))
    assert ok["dir"].endswith(os.path.join("moco", "T=0.2", "seed0"))
    md = (tmp_path / "ablation.md").read_text()
    assert "| moco | 1e-45 | fail | 1 |" in md
    for name in ("ablation.csv", "ablation.json", "ablation.png"):
        assert (tmp_path / name).is_file()
    # a second call reuses the finished run and retries the failed one
    _, again = run_ablation(acfg)
    assert again[0]["reused"] and again[0]["knn_top1"] == ok["knn_top1"]
    assert not again[1]["reused"] and again[1]["status"] == "fail"


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--setting", "m", "--values", "a"], "values of m must be floats"),
        (
            ["--setting", "K", "--values", "64", "--series", "simclr"],
            "SERIES (--series) names mechanisms",
        ),
        (["--preset", "nope.yaml"], "config file nope.yaml does not exist"),
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


def test_a_folder_of_another_configuration_is_not_reused(synthetic_root, tmp_path):
    acfg = _tiny_acfg(synthetic_root, tmp_path, SETTING="m", VALUES=[0.9])
    (run,) = plan_runs(acfg)
    os.makedirs(run["dir"])
    with open(os.path.join(run["dir"], "config.yaml"), "w") as f:
        f.write(run["cfg"].dump())
    assert len(plan_runs(acfg)) == 1  # the same configuration: reused / resumed
    acfg.OPTS = list(acfg.OPTS) + ["SOLVER.BASE_LR", "0.5"]
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        plan_runs(acfg)

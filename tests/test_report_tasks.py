"""tools/report.py on the MoCo paper's other tasks (issue 26): keypoint AP^kp, LVIS AP^mk with
APr / APc / APf, Cityscapes AP^mk and semantic segmentation mIoU, read from final_metrics.json as
detection.trainer writes them (write_final_metrics, from results shaped as Detectron2's
evaluators return them), with the same mean ± std, deltas and paired CIs as VOC, checked by hand."""

import argparse
import csv
import json
import os

import pytest
from conftest import REPO, load_tool
from detectron2.data import DatasetCatalog, MetadataCatalog

from detection.config import load_cfg
from detection.trainer import write_final_metrics
from experiments.report import comparisons, parse_groups, summarize, to_markdown

TASKS = os.path.join(REPO, "configs", "tasks")
# task -> (embedded config, evaluator_type of its test set, {section: {key: base value}})
RESULTS = {
    "coco_kp": (
        "embedded_kp_R_18w16_FPN",
        "coco",
        {
            "bbox": {"AP": 20.0, "AP50": 40.0, "AP75": 15.0},
            "keypoints": {"AP": 30.0, "AP50": 50.0, "AP75": 25.0, "APm": 28.0, "APl": 31.0},
        },
    ),
    "lvis": (
        "embedded_lvis_R_18w16_FPN",
        "lvis",
        {
            "bbox": {"AP": 20.0, "AP50": 40.0, "AP75": 15.0, "APr": 5.0, "APc": 10.0, "APf": 25.0},
            "segm": {
                **{"AP": 30.0, "AP50": 50.0, "AP75": 25.0, "APs": 12.0, "APm": 28.0, "APl": 31.0},
                **{"APr": 20.0, "APc": 40.0, "APf": 60.0},
            },
        },
    ),
    "cityscapes": (
        "embedded_cityscapes_R_18w16_FPN",
        "cityscapes_instance",
        {"segm": {"AP": 30.0, "AP50": 50.0}},
    ),
    "sem_seg": (
        "embedded_voc_sem_seg_R_18w16_FCN",
        "sem_seg",
        {"sem_seg": {"mIoU": 30.0, "fwIoU": 70.0, "mACC": 40.0, "pACC": 80.0, "IoU-disk": 9.0}},
    ),
}
COLUMNS = {
    "coco_kp": ["AP^kp", "AP^kp_50", "AP^kp_75"],
    "lvis": ["AP^mk", "AP^mk_50", "AP^mk_75", "APr", "APc", "APf"],
    "cityscapes": ["AP^mk", "AP^mk_50"],
    "sem_seg": ["mIoU"],
}
# where each column's value is in the evaluator's results
KEYS = {
    "coco_kp": [("keypoints", k) for k in ("AP", "AP50", "AP75")],
    "lvis": [("segm", k) for k in ("AP", "AP50", "AP75", "APr", "APc", "APf")],
    "cityscapes": [("segm", "AP"), ("segm", "AP50")],
    "sem_seg": [("sem_seg", "mIoU")],
}
# each label's offset from the base value, per seed: supervised mean +2 (std 2), moco +6 (std 3,
# delta +4, paired differences 3 / 4 / 5), random -19 (std 1, delta -21)
OFFSETS = {"supervised": (0, 2, 4), "moco": (3, 6, 9), "random": (-20, -19, -18)}


@pytest.fixture
def test_sets():
    """A registered test set per evaluator_type (write_final_metrics names the task by it)."""
    names = {}
    for task, (_, kind, _) in RESULTS.items():
        name = f"test_report_tasks_{task}"
        DatasetCatalog.register(name, list)
        MetadataCatalog.get(name).set(evaluator_type=kind)
        names[task] = name
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _results(task, offset, absent=()):
    """Detectron2's evaluator output for ``task``, every score moved by ``offset``; the keys of
    ``absent`` as LVISEvaluator gives a group without ground truth (LVISEval's -1, x 100)."""
    _, _, sections = RESULTS[task]
    return {
        section: {k: -100.0 if k in absent else v + offset for k, v in scores.items()}
        for section, scores in sections.items()
    }


def _write(folder, task, test_set, seed, results, weights=True):
    config = os.path.join(TASKS, RESULTS[task][0] + ".yaml")
    opts = ["OUTPUT_DIR", str(folder), "DATASETS.TEST", f"('{test_set}',)", "SEED", str(seed)]
    opts += ["MODEL.WEIGHTS", "w16.pkl" if weights else ""]
    cfg = load_cfg(config, opts)
    args = argparse.Namespace(config_file=config, eval_only=False, opts=opts)
    os.makedirs(folder, exist_ok=True)
    load = {"file": "w16.pkl", "backbone_tensors": 40, "matched": 40, "allow_partial": False}
    write_final_metrics(
        cfg,
        args,
        results,
        train_seconds=100.0 + seed,
        weights_load=load if weights else None,
    )
    return folder


def _runs(root, task, test_set, absent=()):
    for label, offsets in OFFSETS.items():
        for seed, offset in enumerate(offsets):
            results = _results(task, offset, absent)
            _write(root / f"{label}_{seed}", task, test_set, seed, results, label != "random")
    return parse_groups([f"{label}={root}/{label}_*" for label in OFFSETS])


@pytest.mark.parametrize("task", sorted(RESULTS))
def test_every_task_gets_its_columns_means_deltas_and_paired_cis(task, test_sets, tmp_path):
    groups = _runs(tmp_path, task, test_sets[task])
    with open(tmp_path / "moco_0" / "final_metrics.json") as f:
        assert json.load(f)["task"] == task  # as the trainer names it
    table = summarize(groups, baseline="supervised")
    assert table.task == task and table.columns == COLUMNS[task] and not table.omitted
    _, _, sections = RESULTS[task]
    base = {name: sections[s][k] for name, (s, k) in zip(table.columns, KEYS[task])}
    rows = {r.label: r for r in table.rows}
    for i, name in enumerate(table.columns):
        sup, moco, rnd = (rows[label].stats[i] for label in ("supervised", "moco", "random"))
        assert (sup.mean, sup.std, sup.n) == pytest.approx((base[name] + 2, 2.0, 3))
        assert (moco.mean, moco.std) == pytest.approx((base[name] + 6, 3.0))
        assert (rnd.mean, rnd.std) == pytest.approx((base[name] - 19, 1.0))
        assert rows["moco"].deltas[i] == pytest.approx(4.0)
        assert rows["random"].deltas[i] == pytest.approx(-21.0)
    text = to_markdown(table)
    first = table.columns[0]
    assert f"| moco | 3 | {base[first] + 6:.1f}±3.0 (+4.0) |" in text
    results, lines = comparisons(table, [("moco", "supervised"), ("moco", "random")])
    paired = {"coco_kp": "AP^kp_50", "lvis": "AP^mk_50", "cityscapes": "AP^mk_50"}
    column = paired.get(task, "mIoU")
    # differences 3, 4, 5: mean 4, sem 1/sqrt(3), t(0.975, 2) = 4.303 -> [1.52, 6.48]
    assert lines[0].startswith(
        f"moco vs supervised: {column} paired difference +4.00, 95% CI [+1.52, +6.48]"
    )
    assert results["moco_vs_supervised"]["metric"] == column
    assert results["moco_vs_random"]["mean_diff"] == pytest.approx(25.0)


def test_lvis_groups_without_ground_truth_are_left_out_or_refused(test_sets, tmp_path):
    # no rare category in the test set: APr is null in every run, its column left out
    groups = _runs(tmp_path / "no_rare", "lvis", test_sets["lvis"], absent=("APr",))
    with open(tmp_path / "no_rare" / "moco_1" / "final_metrics.json") as f:
        assert json.load(f)["metrics"]["segm"]["APr"] is None  # -100 written as null
    table = summarize(groups, baseline="supervised")
    assert table.columns == ["AP^mk", "AP^mk_50", "AP^mk_75", "APc", "APf"]
    assert table.omitted == ["APr"]
    assert "APr left out: null in every run" in to_markdown(table)
    # null in one run only: that run has no score to average, one line naming it
    one = tmp_path / "one"
    groups = _runs(one, "lvis", test_sets["lvis"])
    _write(one / "moco_1", "lvis", test_sets["lvis"], 1, _results("lvis", 6, ("APr",)))
    with pytest.raises(ValueError, match="moco_1/final_metrics.json: metrics.segm.APr is null"):
        summarize(groups)


def test_tasks_are_not_mixed_in_one_table(test_sets, tmp_path):
    _write(tmp_path / "a", "lvis", test_sets["lvis"], 0, _results("lvis", 0))
    _write(tmp_path / "b", "cityscapes", test_sets["cityscapes"], 0, _results("cityscapes", 0))
    with pytest.raises(ValueError, match="runs mix LVIS and Cityscapes results") as e:
        summarize(parse_groups([f"x={tmp_path}/a", f"y={tmp_path}/b"]))
    assert "\n" not in str(e.value)
    bad = tmp_path / "c" / "final_metrics.json"
    os.makedirs(bad.parent)
    bad.write_text(json.dumps({"task": "densepose", "metrics": {}}))
    with pytest.raises(ValueError, match="needs 'task' voc/coco/coco_kp/lvis/cityscapes/sem_seg"):
        summarize(parse_groups([f"x={bad.parent}"]))


def test_report_cli_writes_the_semantic_segmentation_report(test_sets, tmp_path, capsys):
    _runs(tmp_path / "runs", "sem_seg", test_sets["sem_seg"])
    out = tmp_path / "report"
    argv = [f"{label}={tmp_path}/runs/{label}_*" for label in OFFSETS]
    code = load_tool("report").main([*argv, "--baseline", "supervised", "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| pretraining | n | mIoU |" in printed
    assert "| moco | 3 | 36.0±3.0 (+4.0) |" in printed
    assert "semantic segmentation: mean±std" in printed
    assert "supervised vs moco: mIoU paired difference -4.00, 95% CI [-6.48, -1.52]" in printed
    with open(out / "transfer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["pretraining"] for r in rows] == list(OFFSETS)
    assert float(rows[1]["mIoU_mean"]) == pytest.approx(36.0)
    assert os.path.getsize(out / "transfer.png") > 0
    with open(out / "transfer_trials.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 9

"""The main job end to end at CI scale: every stage's artefact, the three-row report, reuse."""

import csv
import json
import os

import pytest
import torch

from detection.checkpoint import safe_load_pickle
from experiments.pipeline import load_pipeline_cfg, run_pipeline, synthetic_spec
from experiments.runs import stage_key

# the CI preset on a smaller embedded set: the plumbing, not the numbers
TINY = [
    "DATA.SPEC", "['cls_train_per_class', 8, 'cls_val_per_class', 2, 'det_trainval_images', 8, "
    "'det_test_images', 10]",
    "PRETRAIN.OPTS", "['SOLVER.EPOCHS', 2, 'SOLVER.IMS_PER_BATCH', 32, 'MODEL.K', 64, "
    "'MODEL.SPLIT_BN_GROUPS', 4, 'DATALOADER.NUM_WORKERS', 0, 'KNN.BATCH_SIZE', 64]",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    opts = ["RUN_DIR", str(tmp / "run"), "DATA.ROOT", str(tmp / "moco_det_synthetic")] + TINY
    cfg = load_pipeline_cfg("configs/pipeline/ci.yaml", opts)
    paths = run_pipeline(cfg)
    return cfg, paths


def _stage_dirs(run_dir, name):
    return [d for d in os.listdir(run_dir) if d.startswith(name + "-")]


def test_pipeline_writes_every_artefact(pipeline_run):
    cfg, paths = pipeline_run
    run_dir = cfg.RUN_DIR
    for stage in ("data", "pretrain_moco", "pretrain_supervised", "convert_moco",
                  "convert_supervised", "detect_moco_s0", "detect_supervised_s0", "detect_random_s0"):
        dirs = _stage_dirs(run_dir, stage)
        assert len(dirs) == 1, (stage, dirs)
        with open(os.path.join(run_dir, dirs[0], "stage.json")) as f:
            assert json.load(f)["name"] == stage

    moco_dir = os.path.join(run_dir, _stage_dirs(run_dir, "pretrain_moco")[0])
    ckpt = torch.load(os.path.join(moco_dir, "checkpoint_0001.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 2 and "module.encoder_q.conv1.weight" in ckpt["state_dict"]
    sup_dir = os.path.join(run_dir, _stage_dirs(run_dir, "pretrain_supervised")[0])
    sup = torch.load(os.path.join(sup_dir, "model_final.pth"), weights_only=True)
    assert sup["fc.weight"].shape[0] == 10  # a torchvision ResNet over the 10 classes

    for label in ("moco", "supervised"):
        conv = os.path.join(run_dir, _stage_dirs(run_dir, f"convert_{label}")[0], f"{label}.pkl")
        model = safe_load_pickle(conv)["model"]
        assert "stem.conv1.weight" in model and "res5.1.conv2.norm.running_var" in model
        assert not any(k.startswith("fc") for k in model)

    for init in ("moco", "supervised", "random"):
        run = os.path.join(run_dir, _stage_dirs(run_dir, f"detect_{init}_s0")[0])
        with open(os.path.join(run, "final_metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["task"] == "voc" and set(metrics["metrics"]["bbox"]) >= {"AP", "AP50", "AP75"}
        assert metrics["weights"].endswith(f"{init}.pkl") if init != "random" else metrics["weights"] == ""

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["pretraining"] for r in rows] == ["moco", "supervised", "random"]
    with open(paths["md"]) as f:
        md_rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| ")}
    assert "(" not in md_rows["supervised"]  # the baseline row has no delta
    for label in ("moco", "random"):  # the others: three cells "mean (+delta)"
        assert md_rows[label].count("(+") + md_rows[label].count("(-") == 3, md_rows[label]
    assert os.path.getsize(paths["png"]) > 1000
    with open(paths["md"]) as f:
        verdict_lines = [line for line in f if line.startswith("- moco vs ")]
    assert [line.split(":")[0] for line in verdict_lines] == ["- moco vs random", "- moco vs supervised"]
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        verdicts = json.load(f)["verdicts"]
    assert verdicts[0].startswith("moco vs random: AP ") and verdicts[1].startswith("moco vs supervised: AP ")


def test_pipeline_rerun_reuses_finished_stages(pipeline_run, capsys):
    cfg, _ = pipeline_run
    before = {d: os.path.getmtime(os.path.join(cfg.RUN_DIR, d, "stage.json"))
              for d in os.listdir(cfg.RUN_DIR) if os.path.isfile(os.path.join(cfg.RUN_DIR, d, "stage.json"))}
    run_pipeline(cfg)
    out = capsys.readouterr().out
    assert out.count("done earlier, reusing") == 8
    after = {d: os.path.getmtime(os.path.join(cfg.RUN_DIR, d, "stage.json")) for d in before}
    assert after == before


def test_stage_key_follows_the_config():
    a = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml")
    b = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml", ["DATA.SEED", "1"])
    assert stage_key(dict(a.DATA)) != stage_key(dict(b.DATA))
    assert stage_key(dict(a.DATA)) == stage_key(dict(load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml").DATA))
    assert synthetic_spec(b).seed == 1


def test_bad_pipeline_settings_fail_clearly():
    with pytest.raises(FileNotFoundError, match="--preset nope.yaml"):
        load_pipeline_cfg("nope.yaml")
    with pytest.raises(ValueError, match="DETECTION.TRIALS"):
        load_pipeline_cfg(None, ["DETECTION.TRIALS", "0"])
    with pytest.raises(ValueError, match="DATA.SPEC"):
        synthetic_spec(load_pipeline_cfg(None, ["DATA.SPEC", "['colour', 3]"]))

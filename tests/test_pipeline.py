"""The main job end to end at CI scale: every stage's artefact, the three-row report with paired
comparisons, worker processes, reuse."""

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
    "DATA.SPEC",
    "['cls_train_per_class', 8, 'cls_val_per_class', 2, 'det_trainval_images', 8, "
    "'det_test_images', 10]",
    "PRETRAIN.OPTS",
    "['SOLVER.EPOCHS', 2, 'SOLVER.IMS_PER_BATCH', 32, 'MODEL.K', 64, "
    "'MODEL.SPLIT_BN_GROUPS', 4, 'DATALOADER.NUM_WORKERS', 0, 'KNN.BATCH_SIZE', 64, 'KNN.PERIOD', 2]",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    opts = ["RUN_DIR", str(tmp / "run"), "DATA.ROOT", str(tmp / "moco_det_synthetic")] + TINY
    opts += ["JOBS", "2"]  # worker processes whatever the machine's cores (auto on 2 cores)
    cfg = load_pipeline_cfg("configs/pipeline/ci.yaml", opts)
    paths = run_pipeline(cfg)
    return cfg, paths


def _stage_dirs(run_dir, name):
    return [d for d in os.listdir(run_dir) if d.startswith(name + "-")]


def test_pipeline_writes_every_artefact(pipeline_run):
    cfg, paths = pipeline_run
    run_dir = cfg.RUN_DIR
    for stage in (
        "data",
        "pretrain_moco",
        "pretrain_supervised",
        "convert_moco",
        "convert_supervised",
        "detect_moco_s0",
        "detect_supervised_s0",
        "detect_random_s0",
        "detect_moco_s1",
        "detect_supervised_s1",
        "detect_random_s1",
    ):
        dirs = _stage_dirs(run_dir, stage)
        assert len(dirs) == 1, (stage, dirs)
        with open(os.path.join(run_dir, dirs[0], "stage.json")) as f:
            assert json.load(f)["name"] == stage

    moco_dir = os.path.join(run_dir, _stage_dirs(run_dir, "pretrain_moco")[0])
    ckpt = torch.load(os.path.join(moco_dir, "checkpoint_0001.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["state_dict"]["module.encoder_q.conv1.weight"].shape[0] == 16
    sup_dir = os.path.join(run_dir, _stage_dirs(run_dir, "pretrain_supervised")[0])
    sup = torch.load(os.path.join(sup_dir, "model_final.pth"), weights_only=True)
    assert sup["fc.weight"].shape[0] == 10  # a torchvision ResNet over the 10 classes

    for label in ("moco", "supervised"):
        conv = os.path.join(run_dir, _stage_dirs(run_dir, f"convert_{label}")[0], f"{label}.pkl")
        model = safe_load_pickle(conv)["model"]
        assert (
            model["stem.conv1.weight"].shape[0] == 16 and "res5.1.conv2.norm.running_var" in model
        )
        assert not any(k.startswith("fc") for k in model)

    for init in ("moco", "supervised", "random"):
        run = os.path.join(run_dir, _stage_dirs(run_dir, f"detect_{init}_s0")[0])
        with open(os.path.join(run, "final_metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["task"] == "voc" and set(metrics["metrics"]["bbox"]) >= {
            "AP",
            "AP50",
            "AP75",
        }
        assert (
            metrics["weights"].endswith(f"{init}.pkl")
            if init != "random"
            else metrics["weights"] == ""
        )

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["pretraining"] for r in rows] == ["moco", "supervised", "random"]
    with open(paths["md"]) as f:
        md_rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| ")}
    assert "(" not in md_rows["supervised"]  # the baseline row has no delta
    for label in ("moco", "random"):  # the others: three cells "mean (+delta)"
        assert md_rows[label].count("(+") + md_rows[label].count("(-") == 3, md_rows[label]
    assert os.path.getsize(paths["png"]) > 1000
    assert paths["curves"].endswith("pretraining_curves.png")
    assert os.path.getsize(paths["curves"]) > 1000
    with open(paths["md"]) as f:
        text = f.read()
    assert "## What was run" in text and "- moco: 2 trial(s), seeds 0, 1; config configs/" in text
    verdict_lines = [line for line in text.splitlines() if line.startswith("- moco vs ")]
    assert [line.split(":")[0] for line in verdict_lines] == [
        "- moco vs random",
        "- moco vs supervised",
    ]
    assert all("paired difference" in line and "(n = 2 pairs)" in line for line in verdict_lines)
    assert "Published figures" in text and "not measured here" in text
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    for name in ("moco_vs_random", "moco_vs_supervised"):
        c = summary["comparisons"][name]
        assert c["metric"] == "AP50" and c["n_pairs"] == 2 and len(c["ci95"]) == 2
        assert c["ci95"][0] <= c["mean_diff"] <= c["ci95"][1] and 0.0 <= c["p_value"] <= 1.0
    for name in ("moco", "supervised"):
        knn = summary["pretraining"][name]
        assert 0.0 <= knn["knn_untrained"] <= 100.0 and 0.0 <= knn["knn_final"] <= 100.0
    assert 0.0 <= summary["pretraining"]["supervised"]["val_top1"] <= 100.0
    # JOBS 2: pretraining and detection ran in worker processes, each stage's console in its folder
    moco_dir = os.path.join(run_dir, _stage_dirs(run_dir, "pretrain_moco")[0])
    assert "kNN top-1" in open(os.path.join(moco_dir, "console.log")).read()


def test_pipeline_rerun_reuses_finished_stages(pipeline_run, capsys):
    cfg, _ = pipeline_run
    before = {
        d: os.path.getmtime(os.path.join(cfg.RUN_DIR, d, "stage.json"))
        for d in os.listdir(cfg.RUN_DIR)
        if os.path.isfile(os.path.join(cfg.RUN_DIR, d, "stage.json"))
    }
    run_pipeline(cfg)
    out = capsys.readouterr().out
    assert out.count("done earlier, reusing") == 11
    after = {d: os.path.getmtime(os.path.join(cfg.RUN_DIR, d, "stage.json")) for d in before}
    assert after == before


def test_stage_key_follows_the_config():
    a = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml")
    b = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml", ["DATA.SEED", "1"])
    assert stage_key(dict(a.DATA)) != stage_key(dict(b.DATA))
    assert stage_key(dict(a.DATA)) == stage_key(
        dict(load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml").DATA)
    )
    assert synthetic_spec(b).seed == 1


def test_a_preset_may_be_named_by_its_file_name():
    assert (
        load_pipeline_cfg("ci.yaml").dump() == load_pipeline_cfg("configs/pipeline/ci.yaml").dump()
    )


def test_bad_pipeline_settings_fail_clearly():
    with pytest.raises(FileNotFoundError, match="--preset nope.yaml"):
        load_pipeline_cfg("nope.yaml")
    with pytest.raises(ValueError, match="DETECTION.TRIALS"):
        load_pipeline_cfg(None, ["DETECTION.TRIALS", "0"])
    with pytest.raises(ValueError, match=r"JOBS must be >= 1, or 0 for auto"):
        load_pipeline_cfg(None, ["JOBS", "-1"])
    assert load_pipeline_cfg(None).JOBS == 0  # auto by default
    with pytest.raises(ValueError, match="DATA.SPEC"):
        synthetic_spec(load_pipeline_cfg(None, ["DATA.SPEC", "['colour', 3]"]))


def test_methods_add_cmc_and_cpc_rows_reusing_the_moco_only_stages(pipeline_run, capsys):
    cfg, _ = pipeline_run
    opts = [
        "RUN_DIR",
        cfg.RUN_DIR,
        "DATA.ROOT",
        cfg.DATA.ROOT,
        *TINY,
        "METHODS",
        "['moco', 'cmc', 'cpc']",
    ]
    paths = run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts))
    assert capsys.readouterr().out.count("done earlier, reusing") == 11  # all of the MoCo-only run
    with open(paths["csv"]) as f:
        assert [r["pretraining"] for r in csv.DictReader(f)] == [
            "moco",
            "cmc",
            "cpc",
            "supervised",
            "random",
        ]
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    assert {f"{m}_vs_{o}" for m in ("moco", "cmc", "cpc") for o in ("random", "supervised")} == set(
        summary["comparisons"]
    )
    for method, key in (
        ("cmc", "module.l.encoder_q.conv1.weight"),
        ("cpc", "module.context.0.weight"),
    ):
        pretrain = os.path.join(cfg.RUN_DIR, _stage_dirs(cfg.RUN_DIR, f"pretrain_{method}")[0])
        ckpt = torch.load(os.path.join(pretrain, "checkpoint_0001.pth.tar"), weights_only=True)
        assert key in ckpt["state_dict"]
        for seed in (0, 1):
            run = os.path.join(cfg.RUN_DIR, _stage_dirs(cfg.RUN_DIR, f"detect_{method}_s{seed}")[0])
            with open(os.path.join(run, "final_metrics.json")) as f:
                metrics = json.load(f)
            assert metrics["weights"].endswith(f"{method}.pkl")
            assert (
                metrics["weights_load"]["matched"]
                == metrics["weights_load"]["backbone_tensors"]
                > 0
            )
            assert metrics["config_file"].endswith("_cmc.yaml") == (method == "cmc")
    with pytest.raises(ValueError, match="METHODS \\['moco', 'byol'\\]: expected distinct names"):
        load_pipeline_cfg("configs/pipeline/ci.yaml", ["METHODS", "['moco', 'byol']"])


def test_a_reused_data_stage_regenerates_a_set_overwritten_with_another_spec(pipeline_run, capsys):
    """Another command may regenerate the data folder with its own spec; a rerun must not
    train on that set because the data stage's record says it finished."""
    from moco.data.synthetic.spec import SyntheticSpec
    from moco.data.synthetic.writers import ensure_generated, read_manifest

    cfg, _ = pipeline_run
    wanted = read_manifest(cfg.DATA.ROOT)["spec"]
    ensure_generated(
        cfg.DATA.ROOT,
        SyntheticSpec(
            seed=7,
            cls_train_per_class=1,
            cls_val_per_class=1,
            det_trainval_images=2,
            det_test_images=2,
        ),
    )
    run_pipeline(cfg)
    assert read_manifest(cfg.DATA.ROOT)["spec"] == wanted
    assert capsys.readouterr().out.count("done earlier, reusing") >= 11

"""The main job end to end at CI scale: every stage's artefact, the three-row report with paired
comparisons, worker processes, reuse."""

import csv
import hashlib
import json
import os

import pytest
import torch
from conftest import REPO, load_tool

from detection.checkpoint import safe_load_pickle
from detection.convert import save_d2_weights
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
        table = f.read().split("## What was run")[0].splitlines()
    md_rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ")}
    assert "(" not in md_rows["supervised"]  # the baseline row has no delta
    for label in ("moco", "random"):  # the others: three cells "mean (+delta)"
        assert md_rows[label].count("(+") + md_rows[label].count("(-") == 3, md_rows[label]
    assert os.path.getsize(paths["png"]) > 1000
    assert paths["curves"].endswith("pretraining_curves.png")
    assert os.path.getsize(paths["curves"]) > 1000
    with open(paths["md"]) as f:
        text = f.read()
    assert "## What was run" in text
    what = {
        line.split(" | ")[0][2:]: line.split(" | ")
        for line in text.split("## What was run")[1].splitlines()
        if line.startswith("| ")
    }
    moco_pkl = os.path.join(run_dir, _stage_dirs(run_dir, "convert_moco")[0], "moco.pkl")
    with open(moco_pkl, "rb") as f:
        moco_sha = hashlib.sha256(f.read()).hexdigest()
    assert what["moco"][1:3] == [
        "2",
        "configs/detection/embedded_voc_R_18w16_FPN_bn_backbone_lr0.02.yaml",
    ]
    assert what["moco"][4:6] == ["6 x 8", "cpu x 1"] and what["moco"][7] == "0, 1"
    # what computed: torch and the CPU's kernel instruction set (APs differ across them)
    assert (
        what["moco"][6]
        == f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"
    )
    assert what["moco"][8] == f"{os.path.relpath(moco_pkl, run_dir)} ({moco_sha[:12]}) |"
    assert what["random"][8] == "none (random init) |"
    assert "SOLVER.MAX_ITER 6" in what["supervised"][3] and "differing" not in what["supervised"][3]
    run = os.path.join(run_dir, _stage_dirs(run_dir, "detect_moco_s0")[0])
    with open(os.path.join(run, "final_metrics.json")) as f:
        assert json.load(f)["weights_sha256"] == moco_sha
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


def test_another_data_seed_in_the_same_root_reruns_the_stages_and_the_report_differs(
    pipeline_run, capsys
):
    """Issue 27.1: DATA.SEED 1 regenerates the set in place under the same DATA.ROOT; keys that
    hashed the data's path reused every stage and published seed 0's numbers under seed 1."""
    from moco.data.synthetic.writers import read_manifest

    cfg, paths = pipeline_run
    with open(paths["md"]) as f:
        report_before = f.read()
    folders_before = set(os.listdir(cfg.RUN_DIR))
    opts = ["RUN_DIR", cfg.RUN_DIR, "DATA.ROOT", cfg.DATA.ROOT, *TINY, "DATA.SEED", "1"]
    again = run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts))
    assert "done earlier, reusing" not in capsys.readouterr().out
    assert read_manifest(cfg.DATA.ROOT)["spec"]["seed"] == 1
    new = set(os.listdir(cfg.RUN_DIR)) - folders_before
    assert sorted(d.rsplit("-", 1)[0] for d in new) == sorted(
        ["data", "pretrain_moco", "pretrain_supervised", "convert_moco", "convert_supervised"]
        + [f"detect_{i}_s{s}" for i in ("moco", "supervised", "random") for s in (0, 1)]
    )
    # at this size every AP is 0.0 (6 iterations): the rows differ in the runs they name
    with open(again["md"]) as f:
        assert again["md"] == paths["md"] and f.read() != report_before
    with open(os.path.join(os.path.dirname(again["md"]), "pipeline_summary.json")) as f:
        runs = json.load(f)["runs"]
    assert all(os.path.basename(r) in new for group in runs.values() for r in group)


def test_stage_key_follows_the_config():
    a = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml")
    b = load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml", ["DATA.SEED", "1"])
    assert stage_key(dict(a.DATA)) != stage_key(dict(b.DATA))
    assert stage_key(dict(a.DATA)) == stage_key(
        dict(load_pipeline_cfg("configs/pipeline/embedded_cpu.yaml").DATA)
    )
    assert synthetic_spec(b).seed == 1


def test_stage_keys_hold_what_the_data_and_weights_are(tmp_path):
    """Keys cover content, not paths: a checkpoint rewritten in place with the same size, an
    image folder edited in place, and the embedded set's seed under the same root."""
    from experiments.pipeline import _convert_stage, data_identity

    ckpt = tmp_path / "checkpoint.pth.tar"
    ckpt.write_bytes(b"a" * 64)
    before = stage_key(_convert_stage("moco", str(ckpt))[1])
    ckpt.write_bytes(b"b" * 64)
    assert stage_key(_convert_stage("moco", str(ckpt))[1]) != before

    a = load_pipeline_cfg(None, ["DATA.ROOT", str(tmp_path / "d")])
    b = load_pipeline_cfg(None, ["DATA.ROOT", str(tmp_path / "d"), "DATA.SEED", "1"])
    assert data_identity(a, "unused")["spec"]["seed"] == 0
    assert data_identity(b, "unused")["spec"]["seed"] == 1

    folder = tmp_path / "user" / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"x" * 10)
    user = load_pipeline_cfg(None, ["DATA.SYNTHETIC", "False"])
    first = data_identity(user, str(tmp_path / "user"))
    (tmp_path / "user" / ".moco_det_scan.json").write_text("{}")  # hidden: not data
    assert data_identity(user, str(tmp_path / "user")) == first
    (folder / "1.jpg").write_bytes(b"x" * 11)
    assert data_identity(user, str(tmp_path / "user")) != first


def test_a_preset_may_be_named_by_its_file_name():
    assert (
        load_pipeline_cfg("ci.yaml").dump() == load_pipeline_cfg("configs/pipeline/ci.yaml").dump()
    )


def test_bad_pipeline_settings_fail_clearly(capsys):
    with pytest.raises(FileNotFoundError, match="--preset nope.yaml"):
        load_pipeline_cfg("nope.yaml")
    assert load_pipeline_cfg("ci").dump() == load_pipeline_cfg("ci.yaml").dump()
    # a preset that does not exist: the line lists those that do
    assert load_tool("pipeline").main(["--preset", "paper_coco"]) == 2
    presets = sorted(os.listdir(os.path.join(REPO, "configs", "pipeline")))
    assert "paper_voc.yaml" in presets
    assert capsys.readouterr().err == (
        f"pipeline.py: error: --preset paper_coco does not exist; the presets are "
        f"{', '.join(presets)} (in configs/pipeline/), or give a YAML file's path\n"
    )
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
    # each method against the baselines and against every method after it (paired by seed)
    against_baselines = {
        f"{m}_vs_{o}" for m in ("moco", "cmc", "cpc") for o in ("random", "supervised")
    }
    between = {"moco_vs_cmc", "moco_vs_cpc", "cmc_vs_cpc"}
    assert against_baselines | between == set(summary["comparisons"])
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


def test_a_user_detection_set_is_keyed_by_its_annotation_files(tmp_path):
    from detectron2.data import MetadataCatalog
    from fvcore.common.config import CfgNode

    from experiments.pipeline import detection_data_identity

    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    xml = tmp_path / "Annotations" / "000001.xml"
    xml.write_text("<annotation><object><name>disk</name></object></annotation>\n")
    name = f"i27_user_voc_{os.getpid()}"
    MetadataCatalog.get(name).set(dirname=str(tmp_path), split="trainval")
    dcfg = CfgNode({"DATASETS": {"TRAIN": [name], "TEST": []}})
    first = detection_data_identity(dcfg)
    assert len(first[name]) == 64
    xml.write_text("<annotation><object><name>ring</name></object></annotation>\n")
    assert detection_data_identity(dcfg) != first
    # the embedded set's names are its spec when the pipeline generated it; other names not
    mixed = CfgNode({"DATASETS": {"TRAIN": ["synthetic_voc_trainval"], "TEST": [name]}})
    both = detection_data_identity(mixed, embedded={"spec": {"seed": 1}})
    assert both["synthetic_voc_trainval"] == {"spec": {"seed": 1}}
    assert both[name] == detection_data_identity(dcfg)[name]


@pytest.mark.parametrize("case", ["[]", "{}", '{"outputs": null}', "stage folder", "run dir"])
def test_a_bad_stage_record_or_a_file_for_a_folder_is_one_line_exit_2(tmp_path, capsys, case):
    """Issue 27: stage.json `[]` was a TypeError, `{}` and `{"outputs": null}` an exit 2 naming
    no file; a file in a stage folder's place a FileExistsError."""
    from conftest import load_tool

    run_dir = tmp_path / "run"
    argv = ["--preset", "ci.yaml", "RUN_DIR", str(run_dir), "DATA.ROOT", str(tmp_path / "d")]
    cfg = load_pipeline_cfg("ci.yaml", argv[2:])
    data = run_dir / f"data-{stage_key(dict(cfg.DATA))}"
    if case == "run dir":
        run_dir.write_text("not a folder")
        expected = f"RUN_DIR {run_dir} is a file"
    elif case == "stage folder":
        run_dir.mkdir()
        data.write_text("not a folder")
        expected = f"{data} is a file where the folder of stage data belongs"
    else:
        data.mkdir(parents=True)
        (data / "stage.json").write_text(case)
        expected = f"{data / 'stage.json'}: "
    assert load_tool("pipeline").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline.py: error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not (tmp_path / "d").exists()  # refused before any work


def test_a_record_or_result_copied_from_another_stage_is_refused(pipeline_run):
    """Issue 27.3: a MoCo fine-tune's stage.json copied into a random-init trial's folder gave
    the random row a MoCo trial. Its record, its run_dir, and its final_metrics.json are checked."""
    import shutil

    cfg, _ = pipeline_run
    paths = run_pipeline(cfg)  # all reused; RUN_DIR also holds other tests' stages (DATA.SEED 1)
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        runs = json.load(f)["runs"]
    moco, rand = runs["moco"][1], runs["random"][1]
    saved = {n: open(os.path.join(rand, n)).read() for n in ("stage.json", "final_metrics.json")}
    try:
        shutil.copy(os.path.join(moco, "stage.json"), os.path.join(rand, "stage.json"))
        with pytest.raises(ValueError, match="the record of stage 'detect_moco_s1'"):
            run_pipeline(cfg)
        record = json.loads(saved["stage.json"])
        record["outputs"]["run_dir"] = moco  # its own name and key, another stage's run
        with open(os.path.join(rand, "stage.json"), "w") as f:
            json.dump(record, f)
        with pytest.raises(ValueError, match="its run_dir .* is not its own folder"):
            run_pipeline(cfg)
        with open(os.path.join(rand, "stage.json"), "w") as f:
            f.write(saved["stage.json"])
        shutil.copy(os.path.join(moco, "final_metrics.json"), rand)
        with pytest.raises(ValueError, match="final_metrics.json: seed 1 and weights .*moco.pkl"):
            run_pipeline(cfg)
    finally:
        for name, text in saved.items():
            with open(os.path.join(rand, name), "w") as f:
                f.write(text)


ALL_TASKS = ["voc_det", "coco_kp", "lvis_mask", "cityscapes_mask", "voc_semseg"]
# the first column of each task's table (experiments.report.tables.TASKS) and its paired metric
TASK_TABLES = {
    "coco_kp": ("AP^kp", "AP^kp_50"),
    "lvis_mask": ("AP^mk", "AP^mk_50"),
    "cityscapes_mask": ("AP^mk", "AP^mk_50"),
    "voc_semseg": ("mIoU", "mIoU"),
}


def test_tasks_fine_tune_every_task_from_the_same_pretrainings(pipeline_run, capsys):
    """TASKS adds the paper's other tasks: the data stage, the pretrainings, the conversions and
    the VOC trials are reused (same keys), each task's paired trials run from the same weights
    and get their own table; a bad TASKS is one line."""
    cfg, first = pipeline_run
    opts = ["RUN_DIR", cfg.RUN_DIR, "DATA.ROOT", cfg.DATA.ROOT, *TINY, "TASKS", str(ALL_TASKS)]
    paths = run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts))
    out = capsys.readouterr().out
    assert out.count("done earlier, reusing") == 11  # every stage of the VOC-only run
    assert paths == first  # VOC detection's report where it was
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    assert set(summary["tasks"]) == set(ALL_TASKS)
    weights = {}
    for task, (column, paired_metric) in TASK_TABLES.items():
        report = summary["tasks"][task]["report"]
        assert os.path.dirname(report["md"]) == os.path.join(cfg.RUN_DIR, "report", task)
        with open(report["csv"]) as f:
            rows = list(csv.DictReader(f))
        assert [r["pretraining"] for r in rows] == ["moco", "supervised", "random"]
        assert f"{column}_mean" in rows[0]
        assert f"\n{task}:\n| pretraining | n | {column} |" in out
        assert summary["tasks"][task]["comparisons"]["moco_vs_random"]["metric"] == paired_metric
        assert summary["tasks"][task]["comparisons"]["moco_vs_random"]["n_pairs"] == 2
        for init in ("moco", "supervised", "random"):
            for seed, folder in zip((0, 1), summary["tasks"][task]["runs"][init], strict=True):
                assert os.path.basename(folder).startswith(f"detect_{task}_{init}_s{seed}-")
                with open(os.path.join(folder, "final_metrics.json")) as f:
                    metrics = json.load(f)
                assert metrics["seed"] == seed
                assert os.path.basename(metrics["config_file"]).startswith("embedded_")
                weights.setdefault(init, set()).add(metrics["weights_sha256"])
                if init != "random":
                    load = metrics["weights_load"]
                    assert load["matched"] == load["backbone_tensors"] > 0
    # one converted file per init, the VOC trials' own, for every task
    with open(os.path.join(summary["runs"]["moco"][0], "final_metrics.json")) as f:
        assert weights["moco"] == {json.load(f)["weights_sha256"]}
    assert weights["random"] == {None}
    for bad, message in (
        ("['voc_det', 'densepose']", "TASKS \\['voc_det', 'densepose'\\]: expected distinct"),
        ("[]", "TASKS \\[\\]: expected distinct names"),
    ):
        with pytest.raises(ValueError, match=message):
            load_pipeline_cfg("configs/pipeline/ci.yaml", ["TASKS", bad])
    with pytest.raises(ValueError, match="the other tasks' configs are the embedded set's"):
        load_pipeline_cfg(None, ["DATA.SYNTHETIC", "False", "TASKS", "['coco_kp']"])


def test_moco_opts_change_the_moco_run_only():
    """MOCO.OPTS (e.g. v1's settings on the demo's v2 config) reach MoCo's run and no other: the
    supervised baseline's and CMC's stages keep their keys, where PRETRAIN.OPTS would retrain
    them (how the data seed 1 check of 2026-12-07 compared two MoCo recipes)."""
    import yaml

    from experiments.pipeline import _pretrain_stage

    v1 = ["MODEL.MLP", "False", "MODEL.T", "0.07", "INPUT.AUG_PLUS", "False", "SOLVER.COS", "False"]
    demo = load_pipeline_cfg("embedded_cpu")
    mine = load_pipeline_cfg("embedded_cpu", ["MOCO.OPTS", str(v1 + ["SOLVER.STEPS", "(7, 10)"])])
    shared = load_pipeline_cfg("embedded_cpu", ["PRETRAIN.OPTS", str(v1)])

    def stage(cfg, method):
        _, material, _ = _pretrain_stage(cfg, "folder", method, {"spec": "x"})
        return stage_key(material), yaml.safe_load(material["config"])

    key, config = stage(mine, "moco")
    model, solver = config["MODEL"], config["SOLVER"]
    assert (model["MLP"], model["T"], config["INPUT"]["AUG_PLUS"]) == (False, 0.07, False)
    assert (solver["COS"], solver["STEPS"]) == (False, [7, 10])
    demo_key, demo_config = stage(demo, "moco")
    assert key != demo_key
    assert (demo_config["MODEL"]["MLP"], demo_config["SOLVER"]["COS"]) == (True, True)
    for method in ("supervised", "cmc"):
        assert stage(mine, method)[0] == stage(demo, method)[0] != stage(shared, method)[0]


def test_an_init_whose_fine_tunes_diverge_is_named_and_left_out(pipeline_run, tmp_path, capsys):
    """A fine-tune that diverges (Detectron2's NaN or inf loss or boxes; here from one's own
    checkpoint whose weights are 1e30 times the converted MoCo's) is an outcome, not the end of the
    run: its trials are recorded with the reason, its row and pairs are left out and named, the
    other rows are reported as before, and a rerun reuses the diverged stages."""
    cfg, first = pipeline_run
    convert = _stage_dirs(cfg.RUN_DIR, "convert_moco")[0]  # any MoCo weights, blown up
    model = safe_load_pickle(os.path.join(cfg.RUN_DIR, convert, "moco.pkl"))["model"]
    blown = str(tmp_path / "blown.pkl")
    save_d2_weights({k: v * 1e30 if v.dtype.kind == "f" else v for k, v in model.items()}, blown)
    opts = ["RUN_DIR", cfg.RUN_DIR, "DATA.ROOT", cfg.DATA.ROOT, *TINY]
    pcfg = load_pipeline_cfg("configs/pipeline/ci.yaml", opts + ["INITS", str([["blown", blown]])])
    paths = run_pipeline(pcfg)
    out = capsys.readouterr().out
    assert out.count("running in") == 2  # the blown row's two trials; every other stage reused
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    assert summary["diverged"] == {"blown": [0, 1]} and summary["runs"]["blown"] == []
    (note,) = [v for v in summary["verdicts"] if v.startswith("blown")]
    assert note.startswith("blown diverged in trial(s) s0, s1: ") and "left out" in note
    assert not any("vs blown" in c or "blown_vs" in c for c in summary["comparisons"])
    with open(paths["csv"]) as f:
        assert [r["pretraining"] for r in csv.DictReader(f)] == ["moco", "supervised", "random"]
    assert summary["comparisons"]["moco_vs_random"]["n_pairs"] == 2
    with open(paths["md"]) as f:
        assert note in f.read()  # the report names the diverged row
    run_pipeline(pcfg)
    assert "running in" not in capsys.readouterr().out  # the diverged stages are finished ones

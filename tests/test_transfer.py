"""Issue 24's variant sweeps (experiments/transfer.py, tools/transfer.py) at tiny size: every
variant fine-tunes MoCo, supervised and random in paired trials on the pipeline's stages, the
pretraining stages are the pipeline's (same keys), and the report has each variant's rows and
paired differences with CIs, and the plot against PLOT.X."""

import csv
import json
import os

import pytest
import torch
from conftest import REPO, load_tool
from test_pipeline import TINY as PIPELINE_TINY

from detection.config import load_cfg as load_detection_cfg
from experiments.pipeline import _detect_stage, load_pipeline_cfg, run_pipeline
from experiments.runs import stage_key
from experiments.transfer import load_transfer_cfg, run_transfer, variant_table

OTHER = "configs/detection/embedded_voc_R_18w16_FPN_4conv1fc.yaml"


def _preset(tmp_path, body):
    path = tmp_path / "preset.yaml"
    base = os.path.join(REPO, "configs", "pipeline", "ci.yaml")
    path.write_text(f'_BASE_: "{base}"\n' + body)
    return str(path)


VARIANTS = f"""VARIANTS:
  - ["short", ""]
  - ["long", "{OTHER}", "SOLVER.MAX_ITER", "9", "SOLVER.STEPS", "(6,)"]
PLOT:
  X: [1, 1.5]
  XLABEL: "length"
"""


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    opts = ["RUN_DIR", str(tmp / "run"), "DATA.ROOT", str(tmp / "moco_det_synthetic")]
    opts += [*PIPELINE_TINY, "JOBS", "1", "REPORT_DIR", "sweep"]
    cfg = load_transfer_cfg(_preset(tmp, VARIANTS), opts)
    return cfg, opts, run_transfer(cfg)


def test_every_variant_fine_tunes_every_init_in_paired_trials(transfer_run):
    cfg, _, summary = transfer_run
    report = os.path.join(cfg.RUN_DIR, "sweep")
    assert summary["dir"] == report
    folders = sorted(d.rsplit("-", 1)[0] for d in os.listdir(cfg.RUN_DIR) if "-" in d)
    inits = ("moco", "supervised", "random")
    detect = sorted(f"detect_{i}_s{s}" for i in inits for s in (0, 1) for _ in range(2))
    assert folders == sorted(
        ["data", "pretrain_moco", "pretrain_supervised", "convert_moco", "convert_supervised"]
        + detect
    )
    for record in summary["variants"]:
        name = record["variant"]
        with open(os.path.join(report, name, "transfer.md")) as f:
            md = f.read()
        for init in inits:
            assert f"| {init} | 2 |" in md
        for other in ("supervised", "random"):
            assert f"moco vs {other}: AP50 paired difference" in md
            result = record["comparisons"][f"moco_vs_{other}"]
            assert result["n_pairs"] == 2 and len(result["ci95"]) == 2
        assert set(record["ap50"]) == set(inits)
    # the long variant's trials: its config, its iterations, the same seeds as the short one's
    runs = {}
    for d in os.listdir(cfg.RUN_DIR):
        if d.startswith("detect_"):
            with open(os.path.join(cfg.RUN_DIR, d, "final_metrics.json")) as f:
                final = json.load(f)
            runs.setdefault(final["config_file"], []).append((final["iterations"], final["seed"]))
    assert sorted(runs[os.path.join(REPO, OTHER)]) == sorted((9, s) for s in (0, 1) for _ in inits)
    assert sorted(runs[os.path.join(REPO, cfg.DETECTION.CONFIG)]) == sorted(
        (6, s) for s in (0, 1) for _ in inits
    )


def test_the_summary_and_the_plot(transfer_run):
    cfg, _, summary = transfer_run
    report = os.path.join(cfg.RUN_DIR, "sweep")
    with open(os.path.join(report, "transfer_summary.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "variant",
        "config",
        "overrides",
        "moco AP50",
        "supervised AP50",
        "random AP50",
        "moco - supervised (95% CI)",
        "moco - random (95% CI)",
    ]
    assert [r[0] for r in rows[1:]] == ["short", "long"]
    assert rows[2][1] == OTHER and rows[2][2] == "SOLVER.MAX_ITER 9 SOLVER.STEPS (6,)"
    for row, record in zip(rows[1:], summary["variants"]):
        result = record["comparisons"]["moco_vs_supervised"]
        lo, hi = result["ci95"]
        assert row[6] == f"{result['mean_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    with open(os.path.join(report, "transfer_summary.json")) as f:
        assert json.load(f)["variants"] == summary["variants"]
    for ext in ("png", "pdf"):
        with open(os.path.join(report, f"transfer_plot.{ext}"), "rb") as f:
            assert f.read(4) == (b"\x89PNG" if ext == "png" else b"%PDF")


def test_the_pipeline_reuses_the_sweeps_stages(transfer_run, capsys):
    """The sweep's stages are the pipeline's: the demo-equal variant's trials, the pretrainings
    and conversions of a sweep are what the pipeline runs, folder for folder (and the other way
    round: a sweep on the demo's RUN_DIR reuses the demo's)."""
    cfg, opts, _ = transfer_run
    before = set(os.listdir(cfg.RUN_DIR))
    pipeline_opts = [o for o in opts if o not in ("REPORT_DIR", "sweep")]
    run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", pipeline_opts))
    assert capsys.readouterr().out.count("done earlier, reusing") == 11
    assert set(os.listdir(cfg.RUN_DIR)) - before == {"report"}


def _detect_key(cfg, init="random", seed=0):
    data = {"pretraining": {"spec": "x"}, "detection": {}}
    return stage_key(_detect_stage(cfg, init, "", seed, "root", data)[1])


def test_presets_scale_the_schedule_and_keep_the_demo_as_a_variant():
    from experiments.transfer import _variant_cfg

    demo = load_pipeline_cfg("embedded_cpu")
    base = load_detection_cfg(demo.DETECTION.CONFIG)
    vcfgs = {}
    for preset in ("transfer_schedule", "transfer_norm"):
        cfg = load_transfer_cfg(preset)
        assert cfg.RUN_DIR == demo.RUN_DIR and cfg.DATA == demo.DATA
        assert (cfg.PRETRAIN, cfg.SUPERVISED) == (demo.PRETRAIN, demo.SUPERVISED)
        table = variant_table(cfg)
        vcfgs[preset] = {name: _variant_cfg(cfg, *spec) for name, spec in table.items()}
        assert len({_detect_key(v) for v in vcfgs[preset].values()}) == len(table)
    # the demo's own fine-tune (since 2026-12-06) is transfer_norm's bn_backbone_lr0.02: the same
    # stage key, so the demo's trials are reused; transfer_schedule's 1x is transfer_norm's
    # bn_backbone_fpn (the demo's detector before), so each sweep reuses the other's
    assert _detect_key(vcfgs["transfer_norm"]["bn_backbone_lr0.02"]) == _detect_key(demo)
    one_x, old = vcfgs["transfer_schedule"]["1x"], vcfgs["transfer_norm"]["bn_backbone_fpn"]
    assert _detect_key(one_x) == _detect_key(old) != _detect_key(demo)
    cfg = load_transfer_cfg("transfer_schedule")
    for factor, (name, (config, opts)) in zip(cfg.PLOT.X, variant_table(cfg).items()):
        d = load_detection_cfg(config, opts)
        assert d.SOLVER.MAX_ITER == factor * base.SOLVER.MAX_ITER
        assert d.SOLVER.STEPS == tuple(factor * s for s in base.SOLVER.STEPS)
        assert d.SOLVER.WARMUP_ITERS == factor * base.SOLVER.WARMUP_ITERS
        assert name == f"{factor}x"
    for config, opts in variant_table(load_transfer_cfg("transfer_norm")).values():
        load_detection_cfg(config, opts)  # each loads


@pytest.mark.parametrize(
    "body, message",
    [
        ("VARIANTS: []\n", "VARIANTS is empty"),
        ('VARIANTS: [["a"]]\n', r"VARIANTS: each entry is \[name, CONFIG, KEY, VALUE, ...\]"),
        ('VARIANTS: [["a", "", "SOLVER.MAX_ITER"]]\n', "VARIANTS 'a': overrides must be KEY VALUE"),
        ('VARIANTS: [["a", ""], ["a", ""]]\n', "'a' is empty, holds a '/' or is named twice"),
        ('VARIANTS: [["a", "nope.yaml"]]\n', "VARIANTS 'a': detection config nope.yaml does not"),
        ('VARIANTS: [["a", ""]]\nPLOT:\n  X: [1, 2]\n', r"PLOT.X \[1, 2\]: expected one number"),
        ('VARIANTS: [["a", ""]]\nMETHODS: []\n', "METHODS must name a pretraining"),
    ],
)
def test_bad_variants_are_one_line_exit_2(tmp_path, capsys, body, message):
    import re

    assert load_tool("transfer").main(["--preset", _preset(tmp_path, body)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_two_variants_that_are_the_same_fine_tune_are_refused(tmp_path, capsys):
    same = "configs/detection/embedded_voc_R_18w16_FPN_bn_backbone_lr0.02.yaml"  # the demo's
    body = f'VARIANTS: [["a", ""], ["b", "{same}"]]\n'
    opts = ["RUN_DIR", str(tmp_path / "run"), "DATA.ROOT", str(tmp_path / "data"), *PIPELINE_TINY]
    tool = load_tool("transfer")
    assert tool.main(["--preset", _preset(tmp_path, body), *opts]) == 2
    err = capsys.readouterr().err
    assert "transfer.py: error: VARIANTS 'a' and 'b' are the same fine-tune" in err


def test_the_novel_label_preset_runs_at_tiny_size(tmp_path):
    """transfer_novel at tiny size: the pretrainings see (and the supervised run is labelled
    with) the 5 pretraining classes only, the detector finds the 5 others, and the report has
    the three rows with their paired differences."""
    from moco.data.synthetic.writers import read_manifest
    from moco.utils.run_files import PRETRAIN_SUMMARY, SUPERVISED_SUMMARY

    spec = PIPELINE_TINY[1].replace("]", ", 'novel_classes', 5]")
    opts = ["RUN_DIR", str(tmp_path / "run"), "DATA.ROOT", str(tmp_path / "novel")]
    opts += ["DATA.SPEC", spec, *PIPELINE_TINY[2:], "JOBS", "1", "DETECTION.TRIALS", "2"]
    opts += ["SUPERVISED.OPTS", "['SOLVER.EPOCHS', 1]"]
    ci = load_pipeline_cfg("ci")
    opts += ["DETECTION.OPTS", str([*ci.DETECTION.OPTS, "MODEL.ROI_HEADS.NUM_CLASSES", "5"])]
    cfg = load_transfer_cfg("transfer_novel", opts)
    summary = run_transfer(cfg)
    manifest = read_manifest(cfg.DATA.ROOT)
    assert manifest["detection_classes"] == ["cross", "hexagon", "crescent", "arrow", "heart"]
    run = cfg.RUN_DIR
    folders = {d.rsplit("-", 1)[0]: os.path.join(run, d) for d in os.listdir(run) if "-" in d}
    with open(os.path.join(folders["pretrain_supervised"], SUPERVISED_SUMMARY)) as f:
        assert json.load(f)["num_classes"] == 5
    with open(os.path.join(folders["pretrain_moco"], PRETRAIN_SUMMARY)) as f:
        assert json.load(f)["knn_chance"] == 20.0  # 5 classes in the image folder
    model = os.path.join(folders["detect_moco_s1"], "model_final.pth")
    state = torch.load(model, weights_only=True)["model"]
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5 + 1  # + background
    (record,) = summary["variants"]
    assert record["variant"] == "novel_5" and set(record["ap50"]) == {
        "moco",
        "supervised",
        "random",
    }
    assert record["comparisons"]["moco_vs_supervised"]["n_pairs"] == 2


def test_a_diverging_variant_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """A fine-tune whose loss turns NaN (here: lr 1e9) is an outcome of its variant, as an
    ablation's NaN run is labelled fail: the sweep finishes the other variant, the summary says
    which trials diverged and why, and a rerun reuses the diverged stages."""
    body = 'VARIANTS: [["ok", ""], ["nan", "", "SOLVER.BASE_LR", "1e9"]]\n'
    opts = ["RUN_DIR", str(tmp_path / "run"), "DATA.ROOT", str(tmp_path / "data")]
    opts += [*PIPELINE_TINY, "JOBS", "1"]
    cfg = load_transfer_cfg(_preset(tmp_path, body), opts)
    summary = run_transfer(cfg)
    ok, nan = summary["variants"]
    assert ok["diverged"] == {} and ok["comparisons"]["moco_vs_supervised"]["n_pairs"] == 2
    assert nan["diverged"] == {"moco": [0, 1], "supervised": [0, 1], "random": [0, 1]}
    assert nan["comparisons"] == {"moco_vs_supervised": None, "moco_vs_random": None}
    assert nan["report"] is None  # no row trained: no per-variant table
    with open(os.path.join(cfg.RUN_DIR, "transfer", "transfer_summary.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[2][3:] == [
        "- (2 diverged)",
        "- (2 diverged)",
        "- (2 diverged)",
        "- (a row diverged in every trial)",
        "- (a row diverged in every trial)",
    ]
    capsys.readouterr()
    run_transfer(cfg)
    assert "running" not in capsys.readouterr().out  # every stage reused, the diverged ones too


def test_the_novel_preset_has_its_own_set_and_a_detector_of_its_classes():
    """transfer_novel must not regenerate the demo's set in place (the demo's root would hold
    another set), and its detector has one output per detection class."""
    from experiments.pipeline import synthetic_spec
    from experiments.transfer import _variant_cfg

    demo, cfg = load_pipeline_cfg("embedded_cpu"), load_transfer_cfg("transfer_novel")
    assert cfg.DATA.ROOT and os.path.abspath(cfg.DATA.ROOT) != os.path.abspath(
        demo.DATA.ROOT or "datasets/moco_det_synthetic"
    )
    assert cfg.RUN_DIR != demo.RUN_DIR
    spec = synthetic_spec(cfg)
    assert spec.novel_classes == 5 and len(spec.pretraining_classes()) == 5
    assert spec.cls_train_per_class * 5 == synthetic_spec(demo).cls_train_per_class * 10
    for config, opts in variant_table(cfg).values():
        vcfg = _variant_cfg(cfg, config, opts)
        d = load_detection_cfg(vcfg.DETECTION.CONFIG, list(vcfg.DETECTION.OPTS))
        assert d.MODEL.ROI_HEADS.NUM_CLASSES == len(spec.detection_classes())

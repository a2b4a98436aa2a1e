"""train_net: a few iterations + evaluation on the embedded VOC and COCO sets write final_metrics.json.

Sizes are cut far below the embedded configs (64-px inputs, 2 images per batch, few proposals) so
each run takes seconds on 2 CPU cores; the metrics are those of a barely trained model, so the
tests check structure and consistency, not accuracy.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_tool
from detectron2.engine import default_argument_parser

from detection.trainer import main as train_main

ROOT = REPO
CONFIGS = os.path.join(ROOT, "configs", "detection")
VOC_CFG = os.path.join(CONFIGS, "embedded_voc_R_18_FPN.yaml")
COCO_CFG = os.path.join(CONFIGS, "embedded_coco_R_18_FPN_mask.yaml")
TINY = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "()",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.PRECISE_BN.NUM_ITER",
    "2",
]


def _args(argv):
    return default_argument_parser().parse_args(argv)


def _metrics(out):
    with open(os.path.join(out, "final_metrics.json")) as f:
        return json.load(f)


def _check_ap(section):
    for key in ("AP", "AP50", "AP75"):
        assert section[key] is None or (
            isinstance(section[key], float) and 0.0 <= section[key] <= 100.0
        ), key


def test_voc_cli_trains_evaluates_and_eval_only_reproduces(
    synthetic_datasets, synthetic_root, tmp_path
):
    out = str(tmp_path / "voc")
    env = dict(
        os.environ, DETECTRON2_DATASETS=os.path.dirname(synthetic_root)
    )  # train_net registers the set
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", VOC_CFG]
    cmd += TINY + ["SOLVER.MAX_ITER", "5", "OUTPUT_DIR", out, "SEED", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Running precise-BN for 2 iterations" in proc.stdout  # the paper's precise BN ran
    data = _metrics(out)
    assert data["task"] == "voc" and data["dataset"] == "synthetic_voc_test"
    assert set(data["metrics"]) == {"bbox"} and set(data["metrics"]["bbox"]) == {
        "AP",
        "AP50",
        "AP75",
    }
    _check_ap(data["metrics"]["bbox"])
    assert (data["iterations"], data["seed"], data["weights"], data["eval_only"]) == (
        5,
        3,
        "",
        False,
    )
    assert data["config_file"] == VOC_CFG and data["device"] == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    assert data["s_per_iter"] > 0 and data["train_seconds"] > 0
    assert os.path.isfile(os.path.join(out, "model_final.pth"))

    # eval-only reloads model_final.pth (a full trainer checkpoint) through the weights-only loader
    # and scores the same model: PreciseBN ran before the final checkpoint and the evaluation.
    out2 = str(tmp_path / "voc_eval")
    argv = ["--config-file", VOC_CFG, "--eval-only"] + TINY
    argv += ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out2]
    results = train_main(_args(argv))
    again = _metrics(out2)
    assert again["eval_only"] is True and again["iterations"] == 5
    assert (
        again["metrics"]
        == data["metrics"]
        == {"bbox": {k: results["bbox"][k] for k in ("AP", "AP50", "AP75")}}
    )
    assert again["test_images"] == 12 and again["s_per_test_image"] > 0


def test_coco_mask_run_reports_bbox_and_segm(synthetic_datasets, tmp_path):
    out = str(tmp_path / "coco")
    argv = ["--config-file", COCO_CFG] + TINY + ["SOLVER.MAX_ITER", "3", "OUTPUT_DIR", out]
    train_main(_args(argv))
    data = _metrics(out)
    assert data["task"] == "coco" and data["dataset"] == "synthetic_coco_test"
    assert {"bbox", "segm"} <= set(data["metrics"])
    for section in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(data["metrics"][section])
        _check_ap(data["metrics"][section])
    # JSON must be strict: COCOeval's NaNs are written as null
    with open(os.path.join(out, "final_metrics.json")) as f:
        json.loads(
            f.read(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")
        )
    assert os.path.isfile(
        os.path.join(out, "inference", "synthetic_coco_test", "coco_instances_results.json")
    )


def test_trainer_reads_weights_through_the_safe_checkpointer(synthetic_datasets, tmp_path):
    from detectron2.engine import hooks

    from detection.checkpoint import SafeDetectionCheckpointer
    from detection.config import load_cfg
    from detection.trainer import DetectionTrainer

    cfg = load_cfg(
        VOC_CFG, TINY + ["OUTPUT_DIR", str(tmp_path), "TEST.PRECISE_BN.ENABLED", "False"]
    )
    trainer = DetectionTrainer(cfg)
    assert isinstance(trainer.checkpointer, SafeDetectionCheckpointer)
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic and all(h.checkpointer is trainer.checkpointer for h in periodic)


def _cli():
    return load_tool("train_net").main


def test_cli_errors_are_one_line(synthetic_datasets, tmp_path, capsys):
    main = _cli()
    cases = [
        (["--config-file", str(tmp_path / "nope.yaml")], "nope.yaml: no such file"),
        (
            ["--config-file", VOC_CFG, "MODEL.ROI_HEADS.NUM_CLASSES", "3"],
            "set MODEL.ROI_HEADS.NUM_CLASSES 10",
        ),
        (
            ["--config-file", VOC_CFG, "MODEL.WEIGHTS", str(tmp_path / "w.pkl")],
            "w.pkl: no such file",
        ),
        (
            ["--config-file", VOC_CFG, "DATASETS.TEST", "('not_a_dataset',)"],
            "'not_a_dataset' is not a registered",
        ),
        (["--config-file", VOC_CFG, "DIST.TIMEOUT_MINUTES", "-1.0"], "MINUTES must be a positive"),
    ]
    if torch.cuda.device_count() < 2:
        cases.append((["--config-file", VOC_CFG, "--num-gpus", "2"], "needs one GPU per process"))
    for argv, message in cases:
        assert main(argv + ["OUTPUT_DIR", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("train_net.py: error:") and message in err, err
        assert len(err.splitlines()) == 1


def test_an_unconverted_moco_checkpoint_as_weights_names_the_converter(
    synthetic_datasets, tmp_path, capsys
):
    from moco import checkpoint as C
    from moco.modeling.moco import MoCo
    from moco.modeling.resnet import resnet_encoder

    model = MoCo(resnet_encoder("resnet18"), dim=16, K=8, mlp=False, shuffle_bn="off")
    path = C.save_checkpoint(C.build_checkpoint(model, None, 1, "resnet18"), str(tmp_path))
    argv = [
        "--config-file",
        VOC_CFG,
        *TINY,
        "MODEL.WEIGHTS",
        path,
        "OUTPUT_DIR",
        str(tmp_path / "o"),
    ]
    assert _cli()(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]  # torch may warn once on its first import of cpp_extension
    assert err.startswith(f"train_net.py: error: {path} is a pretraining checkpoint (MoCo format)")
    assert f"tools/convert_to_d2.py {path} OUT.pkl" in err


def test_the_fast_parser_is_detectron2s_default_argument_parser():
    """tools/train_net.py builds its parser without Detectron2 (a fast --help): same flags,
    defaults, types and actions as default_argument_parser."""

    def spec(parser):
        return sorted(
            (a.dest, tuple(a.option_strings), a.default, a.type, a.nargs, type(a).__name__)
            for a in parser._actions
        )

    assert spec(load_tool("train_net").build_parser()) == spec(default_argument_parser())
    argv = ["--config-file", "c.yaml", "--resume", "--num-gpus", "2", "SOLVER.MAX_ITER", "5"]
    assert vars(load_tool("train_net").build_parser().parse_args(argv)) == vars(_args(argv))

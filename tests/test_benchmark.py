"""tools/benchmark.py and experiments.benchmark: the official re-implementation, interleaved rows, the
report (table + JSON), CLI errors and the Detectron2 iteration timer; all at tiny sizes."""

import json
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import REPO, load_tool

from experiments.benchmark.config import BenchConfig
from experiments.benchmark.official import OfficialMoCo, official_train_step
from experiments.benchmark.runner import (
    format_table,
    loader_schedule,
    run_benchmark,
    time_detectron2_iteration,
)
from moco.modeling.moco import MoCo

ROOT = REPO
cli = load_tool("benchmark")

C4_CONFIG = os.path.join(ROOT, "configs", "detection", "pascal_voc_R_50_C4_24k_moco.yaml")
# the paper's C4 config shrunk to seconds on a CPU: R18 trunk, 64 px, few proposals and ROIs
TINY_DET_OPTS = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_official_reimplementation_has_official_keys_and_step_semantics():
    torch.manual_seed(0)
    ref = OfficialMoCo(
        torchvision.models.resnet18, dim=16, K=32, m=0.99, T=0.2, mlp=True, split_bn_groups=2
    )
    ours = MoCo(
        torchvision.models.resnet18,
        dim=16,
        K=32,
        m=0.99,
        T=0.2,
        mlp=True,
        shuffle_bn="split",
        split_bn_groups=2,
    )
    assert list(ref.state_dict()) == list(ours.state_dict())
    torch.testing.assert_close(ref.queue.norm(dim=0), torch.ones(32))
    q_params = [p.detach().clone() for p in ref.encoder_q.parameters()]
    k_params = [p.detach().clone() for p in ref.encoder_k.parameters()]
    queue = ref.queue.clone()
    opt = torch.optim.SGD(ref.parameters(), 0.1, momentum=0.9)
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    loss = official_train_step(ref, opt, torch.nn.CrossEntropyLoss(), im_q, im_k)
    assert torch.isfinite(loss)
    # momentum update before the keys: k = 0.99 k + 0.01 q (q before this step's SGD update)
    for new, pk, pq in zip(ref.encoder_k.parameters(), k_params, q_params):
        torch.testing.assert_close(new, pk * 0.99 + pq * 0.01)
    # slice enqueue at the pointer, the rest untouched, pointer advanced
    assert ref.queue_ptr.item() == 8
    assert not torch.equal(ref.queue[:, :8], queue[:, :8])
    assert torch.equal(ref.queue[:, 8:], queue[:, 8:])
    torch.testing.assert_close(ref.queue[:, :8].norm(dim=0), torch.ones(8))
    assert all(p.grad is None for p in ref.encoder_k.parameters())


def test_official_logits_match_moco_det_on_a_fixed_batch():
    torch.manual_seed(0)
    ref = OfficialMoCo(torchvision.models.resnet18, dim=16, K=32, T=0.2, split_bn_groups=1)
    ours = MoCo(torchvision.models.resnet18, dim=16, K=32, T=0.2, shuffle_bn="off")
    ours.load_state_dict(ref.state_dict())
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    (la, ya), (lb, yb) = ref(im_q, im_k), ours(im_q, im_k)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(F.cross_entropy(lb, yb), F.cross_entropy(la, ya))


def test_cli_measures_every_group_interleaved_and_writes_table_and_json(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "lightly", None)  # "import lightly" fails: row says so
    out = tmp_path / "bench" / "report.json"
    rc = cli.main(
        [
            "--arch",
            "resnet18",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--K",
            "64",
            "--split-bn-groups",
            "2",
            "--reps",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--data",
            synthetic_root,
            "--data-batches",
            "1",
            "--rows",
            "model,momentum,data,e2e",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--channels-last",
            "true",  # "auto" leaves it off for 32 px crops on CPU
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    rows = {(r["group"], r["name"]): r for r in report["rows"]}
    assert set(rows) == {
        ("model", "official"),
        ("model", "moco-det"),
        ("model", "moco-det undo-log"),
        ("model", "lightly"),
        ("momentum", "official"),
        ("momentum", "moco-det"),
        ("data", "official"),
        ("data", "moco-det"),
        ("data", "moco-det batch"),
        ("e2e", "official"),
        ("e2e", "moco-det"),
        ("e2e", "moco-det batch"),
    }
    assert rows[("model", "lightly")]["status"].startswith("not installed")
    for key, r in rows.items():
        if key[1] == "lightly":
            continue
        assert r["status"] == "ok" and len(r["seconds_per_unit"]) == 2, key
        assert all(s > 0 for s in r["seconds_per_unit"])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert len(r["cpu_seconds_per_unit"]) == 2 and r["median_cpu_ms"] >= 0
        base = rows[(key[0], "official")]
        assert r["ratio_vs_baseline"] == pytest.approx(base["median_ms"] / r["median_ms"])
        if key[0] in ("model", "momentum"):  # the main process does the work: its CPU time
            # is counted (no ratio to wall time: another job on the cores lowers that ratio)
            assert r["median_cpu_ms"] > 0
            assert r["cpu_ratio_vs_baseline"] == pytest.approx(
                base["median_cpu_ms"] / r["median_cpu_ms"]
            )
        if r["unit"] != "update":
            assert r["images_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3))
    assert rows[("model", "official")]["ratio_vs_baseline"] == 1.0
    assert "channels_last" in rows[("model", "moco-det")]["detail"]
    assert report["fast_path"]["channels_last"] is True
    assert report["config"]["batch_size"] == 8 and report["environment"]["device"] == "cpu"
    # interleaved: official, moco-det, official, moco-det within each group
    log = [re.match(r"(\S+)\s+(.+?)\s+rep (\d+/\d+):", line) for line in captured.err.splitlines()]
    model_log = [m.groups() for m in log if m and m.group(1) == "model"]
    assert model_log == [
        ("model", "official", "1/2"),
        ("model", "moco-det", "1/2"),
        ("model", "moco-det undo-log", "1/2"),
        ("model", "official", "2/2"),
        ("model", "moco-det", "2/2"),
        ("model", "moco-det undo-log", "2/2"),
    ]
    # the table: one line per row, the lightly row with its status
    table = captured.out
    assert "median ms" in table and "cpu ms" in table and "x baseline" in table
    groups = ("model", "momentum", "data", "e2e")
    assert sum(line.startswith(groups) for line in table.splitlines()) == 12
    assert "BATCH_AUGMENT" in rows[("e2e", "moco-det batch")]["detail"]
    assert "not installed" in table and f"wrote {out}" in table


def test_startup_rows_time_fresh_processes_against_imagefolder(synthetic_root, tmp_path, capsys):
    import shutil

    from moco.data.checks import SCAN_CACHE_NAME

    data = tmp_path / "data"
    shutil.copytree(os.path.join(synthetic_root, "imagefolder"), data)
    out = tmp_path / "startup.json"
    rc = cli.main(
        [
            "--rows",
            "startup",
            "--data",
            str(data),
            "--reps",
            "1",
            "--warmup",
            "0",
            "--workers",
            "0",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        "imagefolder",
        "scan always cold",
        "scan always warm",
        "scan never",
        "scan auto",
    ]
    base = rows["imagefolder"]
    for r in rows.values():
        assert r["group"] == "startup" and r["unit"] == "start" and r["status"] == "ok"
        assert len(r["seconds_per_unit"]) == 1 and r["seconds_per_unit"][0] > 0
        assert r["median_cpu_ms"] > 0  # the child process's
        assert r["ratio_vs_baseline"] == pytest.approx(base["median_ms"] / r["median_ms"])
    assert base["ratio_vs_baseline"] == 1.0 and "ImageFolder, 30 files" in base["detail"]
    assert "auto: full scan (30 files, threshold 50000)" in rows["scan auto"]["detail"]
    assert (data / "train" / SCAN_CACHE_NAME).is_file()  # the scan rows wrote the folder's cache
    assert sum(line.startswith("startup") for line in captured.out.splitlines()) == 5


def test_detstartup_rows_time_plain_detectron2_against_the_toolkit(
    synthetic_root, tmp_path, capsys
):
    import shutil

    from moco.data.checks import SCAN_CACHE_NAME

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    out = tmp_path / "detstartup.json"
    argv = ["--rows", "detstartup", "--data", str(data), "--reps", "1", "--warmup", "0"]
    argv += ["--workers", "0", "--device", "cpu", "--output", str(out)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("detstartup scan ") for line in table) == 4  # a column apart
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        "detectron2",
        "scan always cold",
        "scan always warm",
        "scan never",
        "scan auto",
    ]
    base = rows["detectron2"]
    for r in rows.values():
        assert r["group"] == "detstartup" and r["status"] == "ok" and r["median_cpu_ms"] > 0
        assert r["ratio_vs_baseline"] == pytest.approx(base["median_ms"] / r["median_ms"])
    assert "plain Detectron2 on coco_2017_train, 12 images" in base["detail"]
    assert "auto): full scan (12 files, threshold 50000)" in rows["scan auto"]["detail"]
    # Detectron2's builtin COCO layout over the set: its 80 categories, the images linked
    layout = data / "detectron2" / "coco"
    coco = json.loads((layout / "annotations" / "instances_train2017.json").read_text())
    assert len(coco["categories"]) == 80 and len(coco["images"]) == 12
    assert {a["category_id"] for a in coco["annotations"]} <= set(range(1, 11))
    assert (layout / "train2017" / coco["images"][0]["file_name"]).is_file()
    assert (data / "VOC2007" / "JPEGImages" / SCAN_CACHE_NAME).is_file()  # the warm row's


def test_loader_schedule_skips_the_start_up_burst_and_times_whole_worker_rounds():
    assert loader_schedule(2, 3) == (4, 4)
    assert loader_schedule(0, 3) == (2, 3)  # in-process loading: one "worker"
    assert loader_schedule(12, 3) == (24, 12)
    assert loader_schedule(4, 8) == (8, 8)


def test_format_table_shows_failed_rows_and_numbers():
    report = {
        "rows": [
            {
                "group": "model",
                "name": "official",
                "status": "ok",
                "median_ms": 100.0,
                "min_ms": 90.0,
                "max_ms": 120.0,
                "images_per_s": 320.0,
                "ratio_vs_baseline": 1.0,
                "detail": "fp32",
            },
            {"group": "model", "name": "lightly", "status": "not installed (x)", "median_ms": None},
        ]
    }
    lines = format_table(report).splitlines()
    assert "100.0" in lines[2] and "90.0-120.0" in lines[2] and "320.0" in lines[2]
    assert lines[3].startswith("model    lightly") and lines[3].endswith("not installed (x)")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rows", "model,bogus"], "unknown group(s) ['bogus']"),
        (["--K", "100"], "--K 100 is not a multiple of --batch-size 32"),
        (["--batch-size", "12"], "--batch-size 12 is not divisible by --split-bn-groups 8"),
        (["--arch", "vgg16"], "unknown ResNet arch 'vgg16'"),
        (["--amp", "maybe"], "SOLVER.AMP (bf16 autocast) must be true, false or auto, got 'maybe'"),
        (["--rows", "data", "--data", "/nonexistent/moco"], "--data /nonexistent/moco: neither"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--det-opts", "MODEL.X"], "--det-opts must be KEY VALUE pairs"),
        (["--rows", "none"], "--rows none and no --detection-config: nothing to measure"),
        (["--rows", "startup", "--data-per-class", "10"], "--data-per-class needs --data"),
        (["--rows", "detstartup", "--det-images", "10"], "--det-images needs --data"),
        (["--rows", "detstartup", "--det-ims-per-batch", "0"], "--det-ims-per-batch must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))  # where the default set would go
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmark.py: error: ") and message in err[0]
    assert not os.listdir(tmp_path)  # nothing generated before the error


def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["--device", "cuda", "--rows", "momentum"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_run_benchmark_validates_before_building():
    with pytest.raises(ValueError, match="--moco must be v1 or v2"):
        run_benchmark(BenchConfig(moco="v3"))
    with pytest.raises(ValueError, match="--shuffle-bn must be split or off"):
        run_benchmark(BenchConfig(shuffle_bn="ddp"))


def test_detectron2_iteration_timer_on_the_paper_c4_config_tiny():
    result = time_detectron2_iteration(
        C4_CONFIG, ims_per_batch=2, iters=2, warmup=1, device="cpu", opts=TINY_DET_OPTS
    )
    assert result["status"] == "ok", result
    assert result["ims_per_batch"] == 2 and result["min_size_train"] == [64]
    assert len(result["seconds_per_iter"]) == 2 and result["median_s"] > 0
    assert result["images_per_s"] == pytest.approx(2 / result["median_s"])


def test_detectron2_timer_reports_missing_detectron2(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2.modeling", None)
    assert time_detectron2_iteration(C4_CONFIG)["status"].startswith("not installed")

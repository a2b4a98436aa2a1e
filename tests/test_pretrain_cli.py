"""tools/pretrain.py: official main_moco.py flags, config precedence, CPU multi-process runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_tool

from moco.config import apply_official_args, load_cfg
from moco.utils.launch import resolve_launch

TOOL = os.path.join(REPO, "tools", "pretrain.py")
CPU_CFG = os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml")


def _tool_module():
    return load_tool("pretrain")


def _run(args, timeout=300, env=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, TOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_the_knn_monitor_follows_the_data_folder(synthetic_root, tmp_path):
    """The CPU config on one's own folder: kNN on its val/ when it has one, else off, as the log
    says (it used to fail: "KNN.DATA ... has no train/ folder", the demo data's path)."""
    src = os.path.join(synthetic_root, "imagefolder")
    train = os.path.join(src, "train")  # class folders only: the scan cache may sit beside them
    classes = sorted(c for c in os.listdir(train) if os.path.isdir(os.path.join(train, c)))[:4]
    tiny = ["SOLVER.IMS_PER_BATCH", "8", "MODEL.K", "8", "MODEL.SPLIT_BN_GROUPS", "2"]
    tiny += ["MODEL.DIM", "16", "INPUT.CROP_SIZE"]
    tiny += ["32", "KNN.BATCH_SIZE", "8", "DATALOADER.NUM_WORKERS", "0", "--epochs", "1"]
    for splits in (("train",), ("train", "val")):
        mine = tmp_path / "_".join(splits)
        for split in splits:
            for c in classes:
                shutil.copytree(os.path.join(src, split, c), mine / split / c)
        out = tmp_path / f"out_{len(splits)}"
        config = os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml")
        r = _run(["--config-file", config, *tiny, "--output-dir", str(out), str(mine)])
        assert r.returncode == 0, r.stderr[-3000:]
        log = (out / "log.txt").read_text()
        with open(out / "pretrain_summary.json") as f:
            knn = json.load(f)["knn"]
        if splits == ("train",):
            assert knn == [] and (
                f"kNN monitor off: KNN.DATA is auto and DATA.ROOT {mine} has no val/ folder" in log
            )
        else:
            assert [h["epoch"] for h in knn] == [0, 1]  # KNN.AT_START, then the epoch
            assert f"kNN monitor on {mine}'s train/ and val/ (KNN.DATA auto = DATA.ROOT)" in log
            assert "chance 25.00%; 12 train / 12 val" in log  # the folder's 4 classes


def test_official_flags_map_to_config_with_official_semantics():
    tool = _tool_module()
    args = tool.parse_args(
        [
            "-a",
            "resnet101",
            "--lr",
            "0.015",
            "--batch-size",
            "128",
            "--mlp",
            "--moco-t",
            "0.2",
            "--aug-plus",
            "--cos",
            "--dist-url",
            "tcp://10.0.0.1:10001",
            "--multiprocessing-distributed",
            "--world-size",
            "2",
            "--rank",
            "1",
            "-j",
            "16",
            "--epochs",
            "800",
            "--moco-k",
            "4096",
            "--schedule",
            "30",
            "40",
            "--wd",
            "5e-4",
            "/data/imagenet",
            "MODEL.M",
            "0.99",
        ]
    )
    assert args.data == "/data/imagenet" and args.opts == ["MODEL.M", "0.99"]
    spec = resolve_launch(
        dist_url=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        multiprocessing_distributed=True,
        num_gpus=4,
        environ={},
    )
    assert (spec.num_machines, spec.machine_rank, spec.procs_per_machine) == (2, 1, 4)
    assert spec.world_size == 8 and spec.dist_url == "tcp://10.0.0.1:10001"
    cfg = apply_official_args(load_cfg(), args, spec.procs_per_machine, spec.num_machines)
    assert cfg.MODEL.ARCH == "resnet101" and cfg.MODEL.MLP and cfg.MODEL.T == 0.2
    assert cfg.INPUT.AUG_PLUS and cfg.SOLVER.COS and cfg.SOLVER.BASE_LR == 0.015
    assert cfg.SOLVER.IMS_PER_BATCH == 256  # -b is per node: 128 x 2 nodes
    assert cfg.DATALOADER.NUM_WORKERS == 4  # -j is per node: 16 / 4 processes
    assert cfg.SOLVER.EPOCHS == 800 and cfg.MODEL.K == 4096 and cfg.SOLVER.STEPS == (30, 40)
    assert cfg.SOLVER.WEIGHT_DECAY == 5e-4 and cfg.DATA.ROOT == "/data/imagenet"
    # flags not given keep the config's values (here: v1 defaults)
    assert cfg.MODEL.M == 0.999 and cfg.MODEL.DIM == 128 and cfg.SOLVER.MOMENTUM == 0.9

    # one process per node without --multiprocessing-distributed
    spec = resolve_launch(world_size=3, rank=2, dist_url="tcp://h:1", environ={})
    assert (spec.num_machines, spec.machine_rank, spec.procs_per_machine) == (3, 2, 1)
    # Detectron2 names; config file < flags; only KEY VALUE pairs after DATA
    args = tool.parse_args(["--config-file", CPU_CFG, "--num-gpus", "2", "MODEL.K", "1024"])
    assert args.data is None and args.opts == ["MODEL.K", "1024"]
    spec = resolve_launch(num_gpus=2, environ={})
    assert spec.world_size == 2 and spec.dist_url == "auto"
    # torchrun's environment decides the processes
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
    }
    spec = resolve_launch(environ=env)
    assert spec.from_env and (spec.num_machines, spec.machine_rank, spec.world_size) == (2, 1, 4)
    with pytest.raises(ValueError, match="--dist-url"):
        resolve_launch(num_machines=2, environ={})
    with pytest.raises(ValueError, match="contradicts --world-size"):
        resolve_launch(world_size=2, num_machines=3, dist_url="tcp://h:1", environ={})


def test_paper_v2_flags_scaled_down_run(synthetic_root, tmp_path):
    data = os.path.join(synthetic_root, "imagefolder")
    out = tmp_path / "v2"
    r = _run(
        [
            "-a",
            "resnet18",
            "--lr",
            "0.06",
            "-b",
            "16",
            "--mlp",
            "--moco-t",
            "0.2",
            "--aug-plus",
            "--cos",
            "--epochs",
            "1",
            "--moco-k",
            "256",
            "--moco-dim",
            "32",
            "-j",
            "0",
            "--seed",
            "0",
            "--dist-url",
            "tcp://localhost:10001",
            "--dist-backend",
            "nccl",
            "--world-size",
            "1",
            "--rank",
            "0",
            "--output-dir",
            str(out),
            data,
            "INPUT.CROP_SIZE",
            "32",
            "MODEL.SPLIT_BN_GROUPS",
            "4",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "resnet18"
    assert ckpt["state_dict"]["module.queue"].shape == (32, 256)
    assert "module.encoder_q.fc.0.weight" in ckpt["state_dict"]  # --mlp
    cfg = load_cfg(str(out / "config.yaml"))
    assert cfg.MODEL.T == 0.2 and cfg.INPUT.AUG_PLUS and cfg.SOLVER.COS
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.INPUT.CROP_SIZE == 32
    assert os.path.exists(out / "metrics.json")


def test_two_cpu_processes_via_num_gpus(synthetic_root, tmp_path):
    data = os.path.join(synthetic_root, "imagefolder")
    out = tmp_path / "ddp"
    r = _run(
        [
            "--config-file",
            CPU_CFG,
            "--num-gpus",
            "2",
            "-b",
            "8",
            "--moco-k",
            "16",
            "--epochs",
            "2",
            "-j",
            "0",
            "--output-dir",
            str(out),
            "--knn-data",
            data,
            data,
            "INPUT.CROP_SIZE",
            "32",
            "MODEL.DIM",
            "32",
            "KNN.BATCH_SIZE",
            "16",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "pretrain_summary.json") as f:
        s = json.load(f)
    assert s["world_size"] == 2 and s["shuffle_bn"] == "ddp" and s["device"] == "cpu"
    assert (
        s["kernels"] == f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"
    )
    assert s["max_iter"] == 2 * (30 // 8)
    digests = s["queue_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [h["epoch"] for h in s["knn"]] == [0, 1, 2]  # KNN.AT_START in the CPU config
    ckpt = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True)
    assert len(ckpt["rng_states"]) == 2  # one per rank
    assert ckpt["state_dict"]["module.queue_ptr"].item() == (2 * 3 * 8) % 16
    assert os.path.exists(out / "log.txt") and os.path.exists(out / "log.txt.rank1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--moco-k", "100", "-b", "8"], "MODEL.K (--moco-k) = 100 is not a multiple"),
        (["-b", "8", "--moco-k", "16", "NOT.A_KEY", "1"], "Non-existent key: NOT.A_KEY"),
        (
            ["SOLVER.BASE_LRR", "0.1"],
            "Non-existent key: SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?",
        ),
        # a short name of a longer key (Detectron2 users type SOLVER.LR)
        (["SOLVER.LR", "0.1"], "Non-existent key: SOLVER.LR; did you mean SOLVER.BASE_LR?"),
        (["-a", "vgg16"], "unknown ResNet arch 'vgg16'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(synthetic_root, tmp_path, args, message):
    r = _run([*args, "--output-dir", str(tmp_path), os.path.join(synthetic_root, "imagefolder")])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain.py: error: ") and message in lines[0]

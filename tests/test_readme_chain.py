"""The README's quick list ("Small CPU runs of each on the embedded data"), copy-pasted from the
README text, runs in order in a copy of the repository: every command succeeds, says where its
output went, writes nothing outside output/ (and the data under datasets/), and no command writes
into another's run folder.

Sizes are cut through what the commands themselves accept: each tool's own flags or trailing
KEY VALUE overrides, appended to the README's line (the last value wins), so the README's flags
and paths are the ones exercised.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO

# appended to each README command: the embedded data at the tests' size and runs of a few steps
TINY = {
    "make_data.py": [
        "--cls-size",
        "64",
        "--cls-train-per-class",
        "3",
        "--cls-val-per-class",
        "3",
        "--det-size",
        "128",
        "--det-trainval",
        "12",
        "--det-test",
        "12",
    ],
    "pretrain.py": [
        "SOLVER.IMS_PER_BATCH",
        "8",
        "MODEL.K",
        "16",
        "MODEL.DIM",
        "16",
        "MODEL.SPLIT_BN_GROUPS",
        "2",
        "INPUT.CROP_SIZE",
        "32",
        "KNN.BATCH_SIZE",
        "16",
        "DATALOADER.NUM_WORKERS",
        "0",
    ],
    "lincls.py": ["-b", "10", "--crop-size", "32", "-j", "0"],
    "convert_to_d2.py": [],
    "train_net.py": [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "1",
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
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "32",
        "TEST.PRECISE_BN.NUM_ITER",
        "2",
    ],
    "report.py": [],
    "benchmark.py": [
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--K",
        "64",
        "--split-bn-groups",
        "2",
        "--reps",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--workers",
        "0",
    ],
}


def readme_quick_list(text):
    """The commands of the bash block after "Small CPU runs", continuations joined, comments cut."""
    block = re.search(
        r"Small CPU runs of each on the embedded data:\s*```bash\n(.*?)```", text, re.DOTALL
    )
    assert block, "the README's quick list is gone"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _files(root):
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return found


def test_the_readme_quick_list_runs_as_written(tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        commands = readme_quick_list(f.read())
    repo = tmp_path / "clone"
    for part in ("tools", "configs"):  # what the commands read; the packages come from REPO
        shutil.copytree(os.path.join(REPO, part), repo / part)
    before = _files(repo)
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env.update(PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    folders = []
    for argv in commands:
        while "=" in argv[0]:  # VAR=value before the command
            name, value = argv.pop(0).split("=", 1)
            env[name] = value
        assert argv[0] == ".venv/bin/python" and argv[1].startswith("tools/"), argv
        tool = os.path.basename(argv[1])
        r = subprocess.run(
            [sys.executable, *argv[1:], *TINY[tool]],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        said = re.findall(
            r"output folder (\S+)|wrote (\S+?),? |report to (\S+)|^(\S+): \d+ classes",
            r.stdout,
            re.MULTILINE,
        )
        assert said, f"{tool} does not say where its output went:\n{r.stdout[-2000:]}"
        folders.append([p for group in said for p in group if p][0])
    # one folder per run: none writes into another's
    runs = [f for f in folders if f.startswith("output/") and not f.endswith((".pkl", ".json"))]
    assert len(runs) == len(set(runs)), folders
    # nothing outside output/ and the data folder; nothing that was there rewritten
    after = _files(repo)
    new = [p for p in after if p not in before]
    assert new and all(p.split(os.sep)[0] in ("output", "datasets") for p in new), [
        p for p in new if p.split(os.sep)[0] not in ("output", "datasets")
    ]
    assert all(after[p] == before[p] for p in before)
    # the artefacts the README promises
    out = repo / "output"
    for path in (
        "pretrain/moco_v2_R18_cpu/checkpoint_0001.pth.tar",
        "pretrain/moco_v2_R18_cpu_2proc/checkpoint_0001.pth.tar",
        "lincls/moco_v2_R18_cpu/lincls_results.json",
        "moco_r18.pkl",
        "voc_moco_r18/final_metrics.json",
        "report/transfer.md",
        "report/transfer.png",
        "benchmark/benchmark.json",
    ):
        assert (out / path).is_file(), path
    # the 2-process run did not append to the first run's metrics: iterations only go up there
    rows = (out / "pretrain" / "moco_v2_R18_cpu" / "metrics.json").read_text().splitlines()
    iterations = [json.loads(row)["iteration"] for row in rows]
    assert iterations and iterations == sorted(set(iterations)), iterations


def readme_section_commands(text, heading):
    """The commands of every bash block in the README section under ``heading`` (to the next
    ``## ``), continuations joined, comments cut."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, f"the README's {heading!r} section has no commands"
    joined = "".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_the_readme_own_data_section_runs_as_written(synthetic_root, tmp_path):
    """The "Your own data, your own method" section, in order, in a copy of the repository that
    holds what a user brings: an image folder (mydata/), a 3-class COCO set (mydet/, ids 1, 2, 5)
    and a checkpoint (my_method.pth, torchvision layout). `bash scripts/demo.sh` is the pipeline
    after the install step (scripts/demo.sh execs tools/pipeline.py with its arguments)."""
    import torch
    from test_own_data import write_coco_set
    from test_pipeline import TINY as PIPELINE_TINY

    from moco.modeling.resnet import resnet_encoder

    with open(os.path.join(REPO, "README.md")) as f:
        commands = readme_section_commands(f.read(), "Your own data, your own method")
    repo = tmp_path / "clone"
    for part in ("tools", "configs"):
        shutil.copytree(os.path.join(REPO, part), repo / part)
    shutil.copytree(os.path.join(synthetic_root, "imagefolder"), repo / "mydata")
    sets = write_coco_set(synthetic_root, str(repo / "mydet"))
    os.rename(sets["trainval"][0], repo / "mydet" / "train.json")
    torch.save(resnet_encoder("resnet18_w16")(num_classes=10).state_dict(), repo / "my_method.pth")
    detection = [str(v) for v in TINY["train_net.py"]]
    tiny = {
        "pretrain.py": TINY["pretrain.py"] + ["SOLVER.EPOCHS", "1"],
        "convert_to_d2.py": [],
        "train_net.py": detection,
        "report.py": [],
        "pipeline.py": PIPELINE_TINY
        + ["DETECTION.OPTS", repr(detection), "DETECTION.TRIALS", "2", "JOBS", "1"],
    }
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env.update(PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    printed = {}
    for argv in commands:
        if argv[:2] == ["bash", "scripts/demo.sh"]:
            argv = [".venv/bin/python", "tools/pipeline.py", *argv[2:]]
        assert argv[0] == ".venv/bin/python" and argv[1].startswith("tools/"), argv
        tool = os.path.basename(argv[1])
        r = subprocess.run(
            [sys.executable, *argv[1:], *tiny[tool]],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        printed[tool] = r.stdout
    out = repo / "output"
    assert (out / "pretrain" / "moco_v2_R18_cpu" / "checkpoint_0000.pth.tar").is_file()
    for run in ("mine_s0", "mine_s1", "random_s0", "random_s1"):
        with open(out / f"mydet_{run}" / "final_metrics.json") as f:
            assert json.load(f)["dataset"] == "mydet_test"
    assert "mine vs random: AP^bb_50 paired difference" in printed["report.py"]
    assert "(n = 2 pairs)" in printed["report.py"]
    assert (out / "mydet_report" / "transfer_trials.csv").is_file()
    with open(out / "pipeline_mine" / "report" / "pipeline_summary.json") as f:
        summary = json.load(f)
    assert set(summary["comparisons"]) >= {"moco_vs_mine", "mine_vs_random", "mine_vs_supervised"}

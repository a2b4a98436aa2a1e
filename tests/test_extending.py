"""docs/EXTENDING.md runs as written: its method file and launcher, copied out of the text into a
copy of the repository, pretrain with MODEL.MECHANISM mine; the checkpoint converts and
fine-tunes a Detectron2 detector with every backbone tensor loaded (issue 28)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import torch
from conftest import REPO
from test_readme_chain import TINY


def _blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_the_documented_method_and_backbone_pretrain_convert_and_fine_tune(
    synthetic_root, tmp_path
):
    with open(os.path.join(REPO, "docs", "EXTENDING.md")) as f:
        text = f.read()
    repo = tmp_path / "clone"
    for part in ("tools", "configs"):  # what the commands read; the packages come from REPO
        shutil.copytree(os.path.join(REPO, part), repo / part)
    files = {}
    for block in _blocks(text, "python"):  # each starts "# <file name>: ..."
        name = block.split(":", 1)[0].lstrip("# ").strip()
        (repo / name).write_text(block)
        files[name] = block
    assert sorted(files) == ["my_method.py", "pretrain_mine.py"]
    (commands,) = _blocks(text, "bash")
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        DETECTRON2_DATASETS=os.path.dirname(synthetic_root),
    )
    for line in commands.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/python", argv
        tiny = TINY["pretrain.py" if argv[1] == "pretrain_mine.py" else os.path.basename(argv[1])]
        r = subprocess.run(
            [sys.executable, *argv[1:], *tiny],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    out = repo / "output"
    ckpt = torch.load(
        out / "pretrain" / "mine" / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True
    )
    with open(out / "pretrain" / "mine" / "pretrain_summary.json") as f:
        assert json.load(f)["mechanism"] == "mine"
    assert ckpt["state_dict"]["module.encoder_q.layer4.1.bn2.weight"].shape == (512,)
    with open(out / "voc_mine" / "final_metrics.json") as f:
        load = json.load(f)["weights_load"]
    assert load["matched"] == load["backbone_tensors"] > 0 and load["file"].endswith("mine.pkl")

"""Configs are untrusted input (issue 17, finding 1 and the config items of 8): every loader parses
safe YAML only, a tagged value is one line naming the file and the tag and runs nothing, a
``_BASE_`` cycle is one line, and values that cannot train are one line with exit 2."""

import os

import pytest
from conftest import REPO, load_tool

from experiments.ablate import load_ablation_cfg
from experiments.pipeline import load_pipeline_cfg
from moco.config import load_cfg

PRETRAIN_CFG = os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml")
DETECTION_CFG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18_FPN.yaml")
TAG = "python/object/apply:os.system"


def _payload(tmp_path, key="SEED"):
    """A config line that, unsafely loaded, writes a marker file (and yields 0, a valid SEED)."""
    marker = tmp_path / "PWNED.txt"
    return marker, f'{key}: !!{TAG} ["touch {marker}; echo 0"]\n'


def _one_line_error(err, prog):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("in_base", [False, True], ids=["in_the_file", "in_its_base"])
def test_tagged_detection_config_is_one_line_and_runs_nothing(tmp_path, capsys, in_base):
    """The tag is refused in the file given and in a ``_BASE_`` file (named in the error)."""
    marker, line = _payload(tmp_path)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"_BASE_: {DETECTION_CFG}\n{line}")
    cfg = tmp_path / "child.yaml"
    cfg.write_text("_BASE_: tagged.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    main = load_tool("train_net").main
    assert (
        main(["--config-file", str(cfg if in_base else tagged), "OUTPUT_DIR", str(tmp_path / "o")])
        == 2
    )
    msg = _one_line_error(capsys.readouterr().err, "train_net.py")
    assert str(tagged) in msg and TAG in msg
    assert not marker.exists()


def test_tagged_pretraining_config_is_one_line_not_a_traceback(tmp_path, capsys):
    marker, line = _payload(tmp_path)
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"_BASE_: {PRETRAIN_CFG}\n{line}")
    main = load_tool("pretrain").main
    assert main(["--config-file", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    msg = _one_line_error(capsys.readouterr().err, "pretrain.py")
    assert str(cfg) in msg and TAG in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "loader, key", [(load_pipeline_cfg, "RUN_DIR"), (load_ablation_cfg, "OUTPUT_DIR")]
)
def test_tagged_pipeline_and_ablation_presets_are_refused(tmp_path, loader, key):
    marker, line = _payload(tmp_path, key)
    preset = tmp_path / "preset.yaml"
    preset.write_text(line)
    with pytest.raises(ValueError, match=TAG) as e:
        loader(str(preset))
    assert str(preset) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_base_cycle_is_one_line(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: [a.yaml]\n")
    with pytest.raises(ValueError, match=r"_BASE_ cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_cfg(str(tmp_path / "a.yaml"))
    main = load_tool("train_net").main
    assert main(["--config-file", str(tmp_path / "a.yaml")]) == 2
    assert "_BASE_ cycle" in _one_line_error(capsys.readouterr().err, "train_net.py")


def test_mistyped_key_and_broken_yaml_stay_one_line(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"_BASE_: {DETECTION_CFG}\nSOLVER:\n  MAX_ITERS: 3\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("SOLVER: [\n")
    main = load_tool("train_net").main
    for path, message in (
        (cfg, "MAX_ITERS'); did you mean SOLVER.MAX_ITER or "),
        (broken, "not valid YAML"),
    ):
        assert main(["--config-file", str(path)]) == 2
        msg = _one_line_error(capsys.readouterr().err, "train_net.py")
        assert str(path) in msg and message in msg


@pytest.mark.parametrize(
    "args, message",
    [
        (["--moco-k", "0"], "MODEL.K"),
        (["--moco-k", "-8"], "MODEL.K"),
        (["--lr", "nan"], "SOLVER.BASE_LR"),
        (["--lr", "inf"], "SOLVER.BASE_LR"),
        (["--moco-t", "inf"], "MODEL.T"),
        (
            ["DIST.TIMEOUT_MINUTES", "0.0"],
            "DIST.TIMEOUT_MINUTES must be a positive number of minutes",
        ),
    ],
)
def test_values_that_cannot_train_are_one_line_exit_2(
    synthetic_root, tmp_path, capsys, args, message
):
    main = load_tool("pretrain").main
    argv = [
        "--config-file",
        PRETRAIN_CFG,
        *args,
        "--output-dir",
        str(tmp_path / "o"),
        os.path.join(synthetic_root, "imagefolder"),
        "MODEL.DEVICE",
        "cpu",
    ]
    assert main(argv) == 2
    assert message in _one_line_error(capsys.readouterr().err, "pretrain.py")
    assert not (tmp_path / "o" / "metrics.json").exists()  # nothing ran: no bare NaN written


@pytest.mark.parametrize("tool", ["pretrain", "train_net", "lincls"])
@pytest.mark.parametrize(
    "case, message",
    [
        ("timeout", "is more than a year (525600 minutes)"),
        ("processes", "--num-gpus 100000"),
    ],
)
def test_huge_timeout_and_process_count_are_one_line_in_every_tool(
    synthetic_root, tmp_path, capsys, tool, case, message
):
    """DIST.TIMEOUT_MINUTES 1e300 overflowed timedelta (a traceback in all three tools), and
    --num-gpus 100000 passed every check of a CPU machine (it would start 100,000 processes)."""
    out = str(tmp_path / "o")
    data = os.path.join(synthetic_root, "imagefolder")
    timeout = "--dist-timeout-minutes" if tool == "lincls" else "DIST.TIMEOUT_MINUTES"
    extra = [timeout, "1e300"] if case == "timeout" else ["--num-gpus", "100000"]
    argv = {
        "pretrain": [
            "--config-file",
            PRETRAIN_CFG,
            "--output-dir",
            out,
            data,
            "MODEL.DEVICE",
            "cpu",
        ],
        "train_net": ["--config-file", DETECTION_CFG, "OUTPUT_DIR", out],
        "lincls": [data, "--output-dir", out],
    }[tool]
    # flags before the positional DATA (pretraining reads KEY VALUE pairs after it)
    argv = extra + argv if extra[0].startswith("--") else argv + extra
    assert load_tool(tool).main(argv) == 2
    msg = _one_line_error(capsys.readouterr().err, f"{tool}.py")
    assert message in msg
    if case == "timeout":
        assert timeout in msg
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_processes_per_machine_are_bounded_at_launch_not_when_resolved(monkeypatch):
    """A layout for other machines resolves here (tests/test_pretrain_cli.py maps --num-gpus 4 on a
    2-core machine); launching it is what is bounded, by the cores this process may use."""
    import torch

    from moco.utils.launch import (
        LaunchSpec,
        available_cores,
        check_local_processes,
        launch_processes,
        resolve_launch,
    )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cores = available_cores()
    assert resolve_launch(num_gpus=cores + 1, environ={}).procs_per_machine == cores + 1
    check_local_processes(LaunchSpec(cores))  # as many as there are cores: allowed
    called = []
    with pytest.raises(ValueError, match=rf"--num-gpus {cores + 1}: .* {cores} cores") as e:
        launch_processes(called.append, LaunchSpec(cores + 1), (1,))
    assert not called and "\n" not in str(e.value)
    check_local_processes(LaunchSpec(cores + 1, from_env=True))  # torchrun started them

"""Issue 27: a report never counts one run twice, never takes an impossible AP or a run whose
weights cannot be shown to have loaded, and is written as one set (a full disk names the file and
keeps the previous report whole). Each refusal is one line naming the file, exit 2."""

import json
import math
import os
import shutil

import pytest
from conftest import FullDisk, load_tool

main = load_tool("report").main


def _run(folder, ap50=50.0, seed=0, **extra):
    os.makedirs(folder, exist_ok=True)
    data = {
        "task": "voc",
        "metrics": {"bbox": {"AP50": ap50, "AP": 30.0, "AP75": 20.0}},
        "seed": seed,
        "weights": "",
        "weights_load": None,
        **extra,
    }
    with open(os.path.join(folder, "final_metrics.json"), "w") as f:
        json.dump(data, f)  # NaN and inf as JSON's NaN / Infinity, which json.load accepts
    return str(folder)


def _one_line_exit_2(argv, capsys, *names):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report.py: error: ") and len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


def test_the_same_run_twice_is_one_line_naming_it(tmp_path, capsys):
    one = _run(tmp_path / "ok1", train_seconds=12.5)  # a real run's record times it
    two = _run(tmp_path / "ok2", seed=1, train_seconds=12.5)
    os.symlink(one, tmp_path / "link")
    shutil.copytree(one, tmp_path / "copy")
    cases = [
        ([f"a={one}", one, one], "twice in group 'a'"),
        ([f"a={tmp_path}/ok*", one], "twice in group 'a'"),  # overlapping patterns
        ([f"a={one}", f"b={one}"], "in groups 'a' and 'b'"),
        ([f"a={one}", f"b={tmp_path}/link"], "in groups 'a' and 'b'"),  # a link to it
        ([f"a={one}", str(tmp_path / "copy")], "hold the same final_metrics.json"),
    ]
    for argv, why in cases:
        err = _one_line_exit_2(argv, capsys, one, why)
        assert "one run is one trial" in err
    assert main([f"a={one}", two]) == 0  # two runs are two trials
    assert "| a | 2 | 50.0±0.0 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, why",
    [
        (5000, "outside [0, 100]"),
        (-500, "outside [0, 100]"),
        (1e308, "outside [0, 100]"),
        (math.inf, "outside [0, 100]"),
        (math.nan, "outside [0, 100]"),
        ("55.5", "not a number"),
        (True, "not a number"),
        ([1], "not a number"),
        ({"AP": 1}, "not a number"),
    ],
)
def test_an_impossible_ap_is_one_line_naming_the_file(tmp_path, capsys, value, why):
    good = _run(tmp_path / "good", seed=1)
    bad = _run(tmp_path / "bad", ap50=value)
    also = _run(tmp_path / "also", ap50=value, seed=2)  # two such runs (NaN: AttributeError)
    path = os.path.join(bad, "final_metrics.json")
    _one_line_exit_2([f"a={good}", f"b={bad}", also], capsys, path, "metrics.bbox.AP50", why)


def test_deep_or_foreign_json_is_one_line_naming_the_file(tmp_path, capsys):
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "final_metrics.json").write_text('{"task": "voc", "metrics": ' + "[" * 100000)
    _one_line_exit_2([f"a={deep}"], capsys, str(deep / "final_metrics.json"))
    (deep / "final_metrics.json").write_text(
        '{"task": "voc", "metrics": ' + "[" * 100000 + "]" * 100000 + "}"
    )
    _one_line_exit_2([f"a={deep}"], capsys, str(deep / "final_metrics.json"), "nested too deeply")
    seed = _run(tmp_path / "seed", seed=[0])
    _one_line_exit_2([f"a={seed}"], capsys, "seed/final_metrics.json", "'seed' is [0]")


@pytest.mark.parametrize(
    "load, why",
    [
        (None, "'weights_load' is missing"),
        ("ok", "'weights_load' is 'ok'"),
        ({"matched": 0, "backbone_tensors": 0}, "matched 0 of backbone_tensors 0"),
        ({"matched": True, "backbone_tensors": True}, "matched True of backbone_tensors True"),
        ({"matched": 61, "backbone_tensors": 60}, "matched 61 of backbone_tensors 60"),
        ({"matched": "60", "backbone_tensors": 60}, "matched '60' of backbone_tensors 60"),
        ({"matched": 59, "backbone_tensors": 60, "allow_partial": "yes"}, "59 of 60"),
    ],
)
def test_a_missing_or_malformed_weights_load_is_one_line_naming_the_file(
    tmp_path, capsys, load, why
):
    run = _run(tmp_path / "r", weights="moco.pkl", weights_load=load)
    _one_line_exit_2([f"a={run}"], capsys, os.path.join(run, "final_metrics.json"), why)


def test_weights_that_loaded_and_random_init_pass(tmp_path, capsys):
    loaded = {"file": "moco.pkl", "matched": 60, "backbone_tensors": 60, "allow_partial": False}
    a = _run(tmp_path / "a", weights="moco.pkl", weights_load=loaded)
    b = _run(tmp_path / "b")  # random init: no weights, nothing loaded
    partial = {"matched": 59, "backbone_tensors": 60, "allow_partial": True}  # the expert override
    c = _run(tmp_path / "c", weights="w.pkl", weights_load=partial)
    assert main([f"a={a}", f"b={b}", f"c={c}"]) == 0, capsys.readouterr().err


def _report_files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def test_a_full_disk_names_the_file_and_keeps_the_previous_report_whole(
    tmp_path, capsys, monkeypatch
):
    import moco.utils.file_io as file_io

    one, two = _run(tmp_path / "r1", ap50=40.0), _run(tmp_path / "r2", ap50=60.0, seed=1)
    (tmp_path / "r1" / "metrics.json").write_text(
        json.dumps({"iteration": 0, "total_loss": 2.0}) + "\n"
    )
    out = tmp_path / "report"
    assert main([f"a={one}", f"b={two}", "--output-dir", str(out)]) == 0
    before = _report_files(out)
    assert sorted(before) == [
        "curves.pdf",
        "curves.png",
        "transfer.csv",
        "transfer.md",
        "transfer.pdf",
        "transfer.png",
        "transfer_trials.csv",
    ]

    room, real_fdopen = {"bytes": 4096}, os.fdopen  # the report may write 4,096 bytes in all
    monkeypatch.setattr(
        file_io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room)
    )
    # another report into the same folder: the Markdown fits, the figure does not
    err = _one_line_exit_2(
        [f"b={two}", f"a={one}", "--output-dir", str(out)],
        capsys,
        "No space left on device",
        "the previous file there (if any) is unchanged",
    )
    assert str(out / "transfer.png") in err
    assert _report_files(out) == before  # every file the previous report's, no temporary left


def test_a_metrics_json_row_of_any_shape_does_not_stop_the_report(tmp_path, capsys):
    run = _run(tmp_path / "r")
    rows = [
        {"iteration": 0, "total_loss": {"nested": 1}},
        {"iteration": 1, "total_loss": "2.0", "lr": [1]},
        {"iteration": 2, "total_loss": 1.5, "lr": 0.1},
        {"iteration": 3, "total_loss": math.nan, "lr": True},
    ]
    (tmp_path / "r" / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main([f"a={run}", "--output-dir", str(out)]) == 0, capsys.readouterr().err
    assert (out / "curves.png").stat().st_size > 1000


def test_an_output_dir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path, capsys):
    run = _run(tmp_path / "r")
    out = tmp_path / "report"
    out.write_text("notes")
    _one_line_exit_2([f"a={run}", "--output-dir", str(out)], capsys, f"{out} is a file")
    assert out.read_text() == "notes"

"""Report: mean ± sample std over trials and deltas to the baseline, checked against hand computation."""

import csv
import json
import os

import pytest
from conftest import REPO, load_tool

from experiments.report import (
    Row,
    Stat,
    Table,
    compare,
    format_cell,
    parse_groups,
    summarize,
    to_markdown,
    what_was_run,
    write_report,
)
from moco.utils.file_io import file_sha256

ROOT = REPO

# VOC runs (AP50, AP, AP75) per pretraining
VOC_RUNS = {
    "supervised": [(81.0, 53.3, 58.6), (81.6, 53.7, 59.0)],
    "moco_v2": [(82.2, 56.8, 63.2), (82.4, 57.0, 63.6), (82.6, 57.2, 64.0)],
    "random": [(60.2, 33.8, 33.1)],
}
# by hand: supervised means 81.3 / 53.5 / 58.8, sample stds sqrt(2*0.3^2)=0.424, sqrt(2*0.2^2)=0.283 (x2)
# moco_v2 means 82.4 / 57.0 / 63.6, stds 0.2 / 0.2 / 0.4; deltas +1.1 / +3.5 / +4.8
# random (n=1): no std; deltas -21.1 / -19.7 / -25.7
EXPECTED_VOC_ROWS = [
    "| supervised | 2 | 81.3±0.4 | 53.5±0.3 | 58.8±0.3 |",
    "| moco_v2 | 3 | 82.4±0.2 (+1.1) | 57.0±0.2 (+3.5) | 63.6±0.4 (+4.8) |",
    "| random | 1 | 60.2 (-21.1) | 33.8 (-19.7) | 33.1 (-25.7) |",
]


def _write_run(folder, task, metrics):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "final_metrics.json"), "w") as f:
        json.dump({"task": task, "metrics": metrics, "seed": 0, "iterations": 10}, f)


@pytest.fixture
def voc_runs(tmp_path):
    for label, runs in VOC_RUNS.items():
        for i, (ap50, ap, ap75) in enumerate(runs):
            _write_run(
                tmp_path / f"{label}_{i}", "voc", {"bbox": {"AP": ap, "AP50": ap50, "AP75": ap75}}
            )
    return tmp_path


def _groups(root):
    return [f"{label}={root}/{label}_*" for label in VOC_RUNS]


def test_voc_table_matches_hand_computation(voc_runs):
    table = summarize(parse_groups(_groups(voc_runs)), baseline="supervised")
    assert table.task == "voc" and table.columns == ["AP50", "AP", "AP75"]
    sup, moco, rand = table.rows
    assert [s.mean for s in sup.stats] == pytest.approx([81.3, 53.5, 58.8])
    assert [s.std for s in sup.stats] == pytest.approx([0.4242641, 0.2828427, 0.2828427])
    assert [s.std for s in moco.stats] == pytest.approx([0.2, 0.2, 0.4])
    assert moco.deltas == pytest.approx([1.1, 3.5, 4.8])
    assert rand.stats[0].std is None and rand.stats[0].n == 1
    assert sup.deltas is None
    lines = to_markdown(table).splitlines()
    assert lines[0] == "| pretraining | n | AP50 | AP | AP75 |"
    assert lines[2:5] == EXPECTED_VOC_ROWS


def test_report_files(voc_runs, tmp_path):
    table = summarize(parse_groups(_groups(voc_runs)), baseline="supervised")
    paths = write_report(table, str(tmp_path / "report"))
    with open(paths["md"]) as f:
        assert f.read().splitlines()[2:5] == EXPECTED_VOC_ROWS
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["pretraining"] for r in rows] == ["supervised", "moco_v2", "random"]
    assert [r["n"] for r in rows] == ["2", "3", "1"]
    assert float(rows[1]["AP_mean"]) == pytest.approx(57.0) and float(
        rows[1]["AP75_std"]
    ) == pytest.approx(0.4)
    assert float(rows[1]["AP_delta"]) == pytest.approx(3.5) and rows[0]["AP_delta"] == ""
    assert rows[2]["AP50_std"] == "" and float(rows[2]["AP75_delta"]) == pytest.approx(-25.7)
    import matplotlib.image

    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something was drawn


def test_coco_columns_and_cells(tmp_path):
    def m(bb, mk):
        return {
            "bbox": {"AP": bb, "AP50": bb + 20, "AP75": bb + 4},
            "segm": {"AP": mk, "AP50": mk + 21, "AP75": mk + 2},
        }

    _write_run(tmp_path / "sup_0", "coco", m(40.0, 34.6))
    _write_run(tmp_path / "sup_1", "coco", m(40.0, 34.8))
    _write_run(tmp_path / "moco_0", "coco", m(40.7, 35.4))
    table = summarize(
        parse_groups([f"supervised={tmp_path}/sup_*", f"moco={tmp_path}/moco_*"]),
        baseline="supervised",
    )
    assert table.columns == ["AP^bb", "AP^bb_50", "AP^bb_75", "AP^mk", "AP^mk_50", "AP^mk_75"]
    sup, moco = table.rows
    assert format_cell(sup.stats[0]) == "40.0±0.0" and format_cell(sup.stats[3]) == "34.7±0.1"
    assert format_cell(moco.stats[0], moco.deltas[0]) == "40.7 (+0.7)"
    assert format_cell(moco.stats[3], moco.deltas[3]) == "35.4 (+0.7)"
    # box-only COCO runs get box columns only
    _write_run(tmp_path / "box_0", "coco", {"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}})
    assert summarize({"b": [str(tmp_path / "box_0")]}).columns == ["AP^bb", "AP^bb_50", "AP^bb_75"]
    with pytest.raises(ValueError, match="no mask results.*box_0"):
        summarize({"a": [str(tmp_path / "sup_0")], "b": [str(tmp_path / "box_0")]})


def test_format_cell_rules():
    assert format_cell(Stat(55.94, 0.21, 5), 2.43) == "55.9±0.2 (+2.4)"
    assert format_cell(Stat(55.94, None, 1), -0.04) == "55.9 (-0.0)"
    assert format_cell(Stat(55.94, None, 1)) == "55.9"


def test_errors_are_named(voc_runs, tmp_path):
    with pytest.raises(ValueError, match="'supervised': pattern .*nothing_\\*.* matched nothing"):
        parse_groups([f"supervised={tmp_path}/nothing_*"])
    with pytest.raises(ValueError, match="group 'moco' is empty"):
        parse_groups([f"supervised={voc_runs}/supervised_*", "moco="])
    os.makedirs(tmp_path / "unfinished")
    with pytest.raises(FileNotFoundError, match="unfinished/final_metrics.json"):
        summarize(parse_groups([f"a={tmp_path}/unfinished"]))
    _write_run(tmp_path / "coco_0", "coco", {"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}})
    with pytest.raises(ValueError, match="mix VOC and COCO"):
        summarize(parse_groups([f"voc={voc_runs}/supervised_*", f"coco={tmp_path}/coco_0"]))
    with pytest.raises(ValueError, match="--baseline 'imagenet' is not one of the groups"):
        summarize(parse_groups(_groups(voc_runs)), baseline="imagenet")


def _report_cli():
    return load_tool("report").main


def test_cli(voc_runs, tmp_path, capsys):
    main = _report_cli()
    out = tmp_path / "out"
    assert main(_groups(voc_runs) + ["--baseline", "supervised", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"report.py: output folder {out}\n")
    assert all(row in printed for row in EXPECTED_VOC_ROWS)
    assert sorted(os.listdir(out)) == [  # no curves:
        "transfer.csv",
        "transfer.md",
        "transfer.pdf",
        "transfer.png",
        "transfer_trials.csv",
    ]
    # these runs recorded no metrics.json
    assert main([f"a={tmp_path}/none_*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report.py: error:") and len(err.strip().splitlines()) == 1


def test_compare_uses_two_standard_errors_and_names_single_trials(voc_runs):
    table = summarize(parse_groups(_groups(voc_runs)), baseline="supervised")
    # AP 57.0 vs 53.5; 2 * sqrt(0.2^2/3 + 0.2828^2/2) = 0.46 by hand
    assert compare(table, "moco_v2", "supervised") == (
        "moco_v2 vs supervised: AP 57.0 vs 53.5 (+3.5): moco_v2 beats supervised "
        "(2 standard errors = 0.5)"
    )
    assert compare(table, "random", "moco_v2", "AP50").startswith(
        "random vs moco_v2: AP50 60.2 vs 82.4 (-22.2): random is behind moco_v2 in a single trial "
        "each, no spread estimate"
    )
    close = Table(
        "voc",
        ["AP"],
        [
            Row("a", [], [Stat.of([10.0, 10.4])], None),
            Row("b", [], [Stat.of([10.1, 10.1, 10.2])], None),
        ],
        None,
    )
    assert "within noise" in compare(close, "a", "b") and "a does not beat b" in compare(
        close, "a", "b"
    )
    assert compare(table, "supervised", "moco_v2") == (
        "supervised vs moco_v2: AP 53.5 vs 57.0 (-3.5): supervised is behind moco_v2 "
        "(2 standard errors = 0.5)"
    )
    with pytest.raises(ValueError, match="compare: no row 'moco'"):
        compare(table, "moco", "random")


def _captured_figures(monkeypatch):
    """The figures the report saves, kept open for inspection (files are still written)."""
    import experiments.report.figures as R

    figures, save = [], R.save_figure

    def keep(fig, path):
        figures.append(fig)  # its axes stay readable after save_figure closes it
        save(fig, path)

    monkeypatch.setattr(R, "save_figure", keep)
    return figures


def test_ap_chart_labels_every_bar_and_draws_std_error_bars(voc_runs, tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    table = summarize(parse_groups(_groups(voc_runs)), baseline="supervised")
    write_report(table, str(tmp_path / "report"))
    (ax,) = figures[0].axes
    labels = {t.get_text() for t in ax.texts}
    assert {"81.3", "53.5", "58.8", "82.4", "57.0", "63.6", "60.2", "33.8", "33.1"} <= labels
    bars = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert len(bars) == 3 and all(c.errorbar is not None for c in bars)


def test_report_records_what_was_run(voc_runs, tmp_path):
    table = summarize(parse_groups(_groups(voc_runs)), baseline="supervised")
    with open(write_report(table, str(tmp_path / "report"))["md"]) as f:
        text = f.read()
    assert "## What was run" in text
    section = text.split("## What was run")[1]
    assert "| init | trials | config | shared overrides | iterations x batch |" in section
    # these hand-written records hold no config, batch or weights: shown as such
    assert (
        "| moco_v2 | 3 | ? | none | 10 x None | None x None | not recorded | 0, 0, 0 | "
        "none (random init) |" in (section)
    )
    assert "Code: commit " in section and f"{os.cpu_count()} CPUs" in section


def test_what_was_run_is_one_row_per_init_and_shows_a_mixed_up_row(tmp_path):
    """Issue 27.6: one row per init (config, shared overrides, iterations x batch, seeds, weights
    and their content hash, paths relative to the run folder); a trial that differs shows."""
    config = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN.yaml")
    weights = {name: tmp_path / f"convert_{name}" / f"{name}.pkl" for name in ("moco", "sup")}
    for name, path in weights.items():
        path.parent.mkdir()
        path.write_bytes(name.encode() * 10)

    def run(folder, seed, init, lr="0.05", kernels="torch 2.14.1, cpu AVX512"):
        folder = tmp_path / folder
        os.makedirs(folder)
        record = {
            "task": "voc",
            "metrics": {"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}},
            "config_file": config,
            "seed": seed,
            "iterations": 300,
            "ims_per_batch": 8,
            "device": "cpu",
            "world_size": 1,
            "weights": str(weights[init]) if init else "",
            "weights_sha256": file_sha256(weights[init]) if init else None,
            "weights_load": {"matched": 5, "backbone_tensors": 5} if init else None,
            "kernels": kernels,
            "opts": ["SOLVER.BASE_LR", lr, "OUTPUT_DIR", str(folder), "SEED", str(seed)]
            + (["MODEL.WEIGHTS", str(weights[init])] if init else []),
        }
        (folder / "final_metrics.json").write_text(json.dumps(record))
        return str(folder)

    groups = {
        "moco": [run("m0", 0, "moco"), run("m1", 1, "moco")],
        # a supervised trial by mistake in the random row, with another learning rate
        # ... and run on another machine's kernels
        "random": [
            run("r0", 0, None),
            run("r1", 1, "sup", lr="0.1", kernels="torch 2.14.1, cpu AVX2"),
        ],
    }
    text = what_was_run(summarize(groups), base=str(tmp_path))
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    sha = file_sha256(weights["moco"])[:12]
    assert rows["moco"] == (
        "| moco | 2 | configs/detection/embedded_voc_R_18w16_FPN.yaml | SOLVER.BASE_LR 0.05 | "
        f"300 x 8 | cpu x 1 | torch 2.14.1, cpu AVX512 | 0, 1 | convert_moco/moco.pkl ({sha}) |"
    )
    cells = rows["random"].split(" | ")
    assert cells[3] == "none; differing: SOLVER.BASE_LR"
    assert cells[6] == "torch 2.14.1, cpu AVX2; torch 2.14.1, cpu AVX512"
    assert cells[8].startswith("convert_sup/sup.pkl (") and cells[8].endswith(
        "), none (random init) |"
    )
    assert str(tmp_path) not in "".join(rows.values())  # paths relative to the run folder
    assert f"Paths relative to {tmp_path}." in text


def test_training_curves_from_metrics_json(tmp_path, monkeypatch):
    from experiments.report import plot_curves

    figures = _captured_figures(monkeypatch)
    pre, det = tmp_path / "pre", tmp_path / "det"
    pre.mkdir(), det.mkdir()
    (pre / "metrics.json").write_text(
        "".join(
            json.dumps(
                {
                    "iteration": i,
                    "total_loss": 5.0 - i,
                    "lr": 0.03,
                    **({"knn_top1": 20.0 + i} if i % 2 else {}),
                }
            )
            + "\n"
            for i in range(4)
        )
        + '{"iteration": 4, "total_lo'
    )  # a torn last line is skipped
    (det / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 2.0, "lr": 0.02}))
    path = str(tmp_path / "curves.png")
    assert plot_curves({"pre": str(pre), "det": str(det)}, path) == path and os.path.isfile(path)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "kNN top-1 (%)", "learning rate"]
    knn = axes[1].lines
    assert len(knn) == 1 and list(knn[0].get_xdata()) == [1, 3]
    assert list(knn[0].get_ydata()) == [21.0, 23.0]
    assert [len(line.get_xdata()) for line in axes[0].lines] == [4, 1]
    assert plot_curves({"none": str(tmp_path / "missing")}, str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()

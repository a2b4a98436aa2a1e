"""The report's figures as a paper needs them (issue 28, item 6): a PDF beside every PNG at print
resolution, each trial's dot over its bar, a caption, a title naming dataset / config / schedule,
no y-axis below 0, one loss panel per objective, the kNN of every evaluation, and
``tools/report.py --curves`` overlaying several runs."""

import json
import os

import pytest
import yaml
from conftest import load_tool
from matplotlib.collections import PathCollection
from PIL import Image

from experiments.report import parse_groups, plot_curves, summarize, write_report
from experiments.report.figures import CAPTION, DPI

RUNS = {"moco": [(60.0, 30.0, 28.0), (62.0, 31.0, 29.0)], "random": [(40.0, 20.0, 18.0)] * 2}


def _runs(root, runs=RUNS):
    for label, trials in runs.items():
        for i, (ap50, ap, ap75) in enumerate(trials):
            folder = root / f"{label}_{i}"
            folder.mkdir()
            metrics = {"bbox": {"AP": ap, "AP50": ap50, "AP75": ap75}}
            (folder / "final_metrics.json").write_text(
                json.dumps(
                    {
                        "task": "voc",
                        "metrics": metrics,
                        "seed": i,
                        "dataset": "synthetic_voc_test",
                        "config_file": "/x/configs/detection/embedded_voc_R_18w16_FPN.yaml",
                        "iterations": 300,
                        "ims_per_batch": 8,
                    }
                )
            )
    return [f"{label}={root}/{label}_*" for label in runs]


@pytest.fixture
def figures(monkeypatch):
    """The figures saved, kept open for inspection (the files are still written)."""
    import experiments.report.figures as F

    kept, save = [], F.save_figure

    def keep(fig, path):
        kept.append(fig)  # its axes stay readable after save_figure closes it
        save(fig, path)

    monkeypatch.setattr(F, "save_figure", keep)
    return kept


def _print_resolution(path):
    with Image.open(path) as im:
        assert round(im.info["dpi"][0]) == DPI
        return im.size


def test_the_ap_chart_is_for_a_paper(tmp_path, figures):
    table = summarize(parse_groups(_runs(tmp_path)))
    png = write_report(table, str(tmp_path / "report"))["png"]
    assert png.endswith("transfer.png") and os.path.isfile(png[:-4] + ".pdf")
    assert open(png[:-4] + ".pdf", "rb").read(5) == b"%PDF-"
    width, height = _print_resolution(png)
    assert width >= 1400 and height >= 1100  # was 786 x 432 at 120 dpi
    (ax,) = figures[0].axes
    # every trial's value as a dot over its bar: 3 metrics x 2 rows, 2 trials each
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    dots = [list(map(tuple, c.get_offsets())) for c in scatters]
    assert len(dots) == 6 and all(len(d) == 2 for d in dots)
    assert sorted(y for d in dots for _, y in d)[-1] == 62.0
    assert ax.get_xlabel() == CAPTION and "sample std" in CAPTION
    title = ax.get_title()
    assert "synthetic_voc_test" in title and "embedded_voc_R_18w16_FPN" in title
    assert "300 iterations x 8 images" in title
    assert ax.get_ylim()[0] == 0


def test_an_all_zero_table_keeps_its_axis_at_0(tmp_path, figures):
    table = summarize(parse_groups(_runs(tmp_path, {"random": [(0.0, 0.0, 0.0)] * 3})))
    write_report(table, str(tmp_path / "report"))
    bottom, top = figures[0].axes[0].get_ylim()
    assert bottom == 0 and top > 0


def _pretraining(folder, mechanism, losses, knn=None, supervised=False):
    folder.mkdir()
    rows = [{"iteration": i, "loss": v, "lr": 0.03} for i, v in enumerate(losses)]
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"MODEL": {"MECHANISM": mechanism, "LOSS": "info_nce"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if knn is not None:
        history = [{"epoch": e, "iteration": i, "top1": t} for e, (i, t) in enumerate(knn)]
        (folder / "pretrain_summary.json").write_text(json.dumps({"knn": history}))
    if supervised:
        (folder / "supervised_summary.json").write_text("{}")
    return str(folder)


def test_curves_have_a_loss_panel_per_objective_and_every_knn(tmp_path, figures):
    runs = {
        # kNN at start (iteration 0) and after each epoch: the summary has all three
        "moco": _pretraining(
            tmp_path / "m", "moco", [6.0, 5.9, 5.7], [(0, 20.0), (1, 30), (2, 40)]
        ),
        "supervised": _pretraining(tmp_path / "s", "moco", [0.4, 0.3, 0.2], supervised=True),
    }
    path = str(tmp_path / "curves.png")
    assert plot_curves(runs, path) == path
    _print_resolution(path)
    assert os.path.isfile(str(tmp_path / "curves.pdf"))
    axes = figures[0].axes
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "loss: moco info_nce",
        "loss: supervised cross-entropy",
        "kNN top-1 (%)",
        "learning rate",
    ]
    assert [line.get_label() for line in axes[0].lines] == ["moco"]  # InfoNCE alone on its axis
    assert [line.get_label() for line in axes[1].lines] == ["supervised"]
    (knn,) = axes[2].lines
    assert list(knn.get_xdata()) == [0, 1, 2] and list(knn.get_ydata()) == [20.0, 30, 40]
    assert all(ax.get_legend() is not None for ax in axes)  # a legend in every panel


def test_report_cli_curves_overlays_several_runs(tmp_path, capsys):
    a = _pretraining(tmp_path / "a", "moco", [6.0, 5.0], [(0, 10.0), (1, 20.0)])
    b = _pretraining(tmp_path / "b", "moco", [6.1, 5.5], [(0, 11.0), (1, 15.0)])
    out = tmp_path / "report"
    main = load_tool("report").main
    assert main(["--curves", a, b, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.splitlines()[-1] == f"report.py: wrote {out / 'curves.png'}, {out / 'curves.pdf'}"
    )
    assert (out / "curves.png").is_file() and (out / "curves.pdf").is_file()
    assert main(["--curves", a]) == 2
    assert (
        capsys.readouterr().err
        == "report.py: error: --curves draws curves.png: give --output-dir\n"
    )
    assert main(["--curves", str(tmp_path / "nope"), "--output-dir", str(out)]) == 2
    assert "--curves" in capsys.readouterr().err
    assert main([]) == 2
    assert "give LABEL=RUNS groups, or --curves" in capsys.readouterr().err

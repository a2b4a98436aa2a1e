"""The report's figures (matplotlib, Agg backend), for a paper as much as a slide: every PNG at
print resolution with a vector PDF beside it.

- :func:`plot_table`: AP bars (mean over trials) with sample-std whiskers, each trial's value as
  a dot over its bar, a caption line saying so, a title naming the dataset, the detection config
  (backbone) and the schedule where the runs record them; the y-axis starts at 0.
- :func:`plot_curves`: training curves from the runs' metrics.json, one loss panel per objective
  (InfoNCE and a classifier's cross-entropy differ in scale), the kNN top-1 of every evaluation a
  run made (its pretrain_summary.json, else metrics.json) and the learning rate.

Files are written atomically; :func:`figure_bytes` renders a figure for a report written as one
set of files (moco.utils.file_io.atomic_write_files).
"""

import io
import math
import os

from experiments.report.tables import TASKS
from moco.utils.file_io import atomic_write
from moco.utils.run_files import (
    CONFIG_FILE,
    FINAL_METRICS,
    PRETRAIN_SUMMARY,
    SUPERVISED_SUMMARY,
    read_metrics,
)

DPI = 300  # print resolution for the PNG; the PDF is vector
# a table's default title, where the task's name alone does not say what was scored
_TITLES = {"voc": "VOC detection", "coco": "COCO detection / segmentation"}
CAPTION = "bars: mean over n trials; whiskers: sample std (ddof 1); dots: each trial"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pdf_path(path):
    """The PDF written beside a figure's PNG."""
    return os.path.splitext(path)[0] + ".pdf"


class FigureFiles:
    """Where :func:`save_figure` renders a figure that is written later with other files: its PNG
    and its PDF, in memory."""

    def __init__(self):
        self.png, self.pdf = io.BytesIO(), io.BytesIO()


def save_figure(fig, path):
    """``fig`` as a PNG at :data:`DPI` and a PDF: ``path`` a file name (both written atomically,
    the PDF beside it), a :class:`FigureFiles` (both), or a binary file object (the PNG)."""
    fig.tight_layout()
    try:
        if isinstance(path, (str, os.PathLike)):
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
            atomic_write(pdf_path(path), lambda f: fig.savefig(f, format="pdf"))
        elif isinstance(path, FigureFiles):
            fig.savefig(path.png, format="png", dpi=DPI)
            fig.savefig(path.pdf, format="pdf")
        else:
            fig.savefig(path, format="png", dpi=DPI)
    finally:
        pyplot().close(fig)


def figure_bytes(draw, *args, **kwargs):
    """``{"png": bytes, "pdf": bytes}`` of what ``draw(*args, path, **kwargs)`` (e.g.
    :func:`plot_table`) saves, so that they can be written with the files they belong to
    (moco.utils.file_io.atomic_write_files)."""
    files = FigureFiles()
    draw(*args, files, **kwargs)
    return {"png": files.png.getvalue(), "pdf": files.pdf.getvalue()}


def _read_json(path):
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def runs_details(runs):
    """ "dataset · config · schedule" of detection runs, from their final_metrics.json: what the
    figure's title names (values that differ between runs are joined with "/"); "" if unknown."""
    found = {"dataset": [], "config": [], "schedule": []}
    for run in runs:
        data = _read_json(os.path.join(run, FINAL_METRICS)) or {}
        values = {
            "dataset": data.get("dataset"),
            "config": os.path.splitext(os.path.basename(data.get("config_file") or ""))[0],
            "schedule": (
                f"{data['iterations']} iterations x {data['ims_per_batch']} images"
                if data.get("iterations") and data.get("ims_per_batch")
                else None
            ),
        }
        for key, value in values.items():
            if value and value not in found[key]:
                found[key].append(value)
    return " · ".join("/".join(v) for v in found.values() if v)


def plot_table(table, path, title=None):
    """Grouped bars (one group per metric, one bar per pretraining): the mean, whiskers of the
    sample std, each trial's value as a dot; the caption says so. Writes ``path`` and its PDF."""
    plt = pyplot()
    k = len(table.rows)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(table.columns) * max(1, k / 2), 4.0))
    top = 0.0
    for i, row in enumerate(table.rows):
        xs = [j + (i - (k - 1) / 2) * width for j in range(len(table.columns))]
        means = [s.mean for s in row.stats]
        errs = [math.nan if s.std is None else s.std for s in row.stats]  # NaN: no bar for n == 1
        bars = ax.bar(
            xs, means, width, yerr=errs, capsize=3, label=f"{row.label} (n={row.stats[0].n})"
        )
        # values on the bars: a near-zero bar is otherwise invisible
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=7)
        for x, values in zip(xs, row.values or []):
            ax.scatter(
                [x] * len(values), values, s=8, color="black", alpha=0.6, zorder=3, linewidths=0
            )
            top = max(top, *values)
        top = max(top, *(m + (0 if math.isnan(e) else e) for m, e in zip(means, errs)))
    # AP is never negative: a whisker below 0 is cut, and an all-zero table still has an axis
    ax.set_ylim(0, max(1.0, top * 1.12))
    ax.set_xticks(range(len(table.columns)))
    ax.set_xticklabels(table.columns)
    ax.set_ylabel(TASKS[table.task].unit)
    head = title or _TITLES.get(table.task, TASKS[table.task].name)
    details = runs_details([run for row in table.rows for run in row.runs])
    ax.set_title(f"{head}\n{details}" if details else head, fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    # the caption, under the metric names: what a reader of the figure alone must know
    ax.set_xlabel(CAPTION, fontsize=7)
    save_figure(fig, path)


def objective(folder):
    """What a run's loss is, so runs of different objectives get different panels: the
    supervised baseline's cross-entropy, a pretraining mechanism's contrastive loss, detection's
    total loss."""
    if os.path.isfile(os.path.join(folder, SUPERVISED_SUMMARY)):
        return "supervised cross-entropy"
    if os.path.isfile(os.path.join(folder, FINAL_METRICS)):
        return "detection total_loss"
    config = _read_yaml(os.path.join(folder, CONFIG_FILE))
    model = config.get("MODEL") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("MECHANISM") and model.get("LOSS"):
        return f"{model['MECHANISM']} {model['LOSS']}"
    return "loss"


def _read_yaml(path):
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)  # a run's config.yaml: plain values only
    except (OSError, yaml.YAMLError):
        return None


def knn_points(folder, rows):
    """(iterations, kNN top-1) of every evaluation the run made: its pretrain_summary.json's
    ``knn`` history when written (metrics.json keeps only the evaluations its writer saw),
    else metrics.json's ``knn_top1``."""
    summary = _read_json(os.path.join(folder, PRETRAIN_SUMMARY)) or {}
    history = [
        (h["iteration"], h["top1"])
        for h in summary.get("knn") or []
        if isinstance(h, dict) and "iteration" in h and "top1" in h
    ]
    return history or [(r["iteration"], r["knn_top1"]) for r in rows if "knn_top1" in r]


def _plottable(value):
    """A finite real number (a hand-edited or foreign metrics.json row may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_series(runs):
    """{panel: [(label, iterations, values)]} of run folders ({label: folder}): a loss panel per
    objective, kNN top-1 and learning rate, finite numeric values only."""
    series = {}
    for label, folder in runs.items():
        rows = read_metrics(folder)
        key = next(
            (k for k in ("total_loss", "loss") if any(_plottable(r.get(k)) for r in rows)), None
        )
        if key is not None:
            points = [(r["iteration"], r[key]) for r in rows if _plottable(r.get(key))]
            goal = objective(folder)
            panel = "loss" if goal == "loss" else f"loss: {goal}"
            series.setdefault(panel, []).append((label, *zip(*points)))
        knn = [(i, v) for i, v in knn_points(folder, rows) if _plottable(i) and _plottable(v)]
        if knn:
            series.setdefault("kNN top-1 (%)", []).append((label, *zip(*sorted(knn))))
        lr = [(r["iteration"], r["lr"]) for r in rows if _plottable(r.get("lr"))]
        if lr:
            series.setdefault("learning rate", []).append((label, *zip(*lr)))
    return series


def plot_curves(runs, path, title=None):
    """Training curves of run folders ({label: folder}): a loss panel per objective, kNN top-1
    and learning rate over iterations, each panel with its legend. Returns ``path`` (a file name:
    its PDF beside it; or what :func:`save_figure` takes), or None when no run has recorded
    metrics (nothing is written)."""
    series = curve_series(runs)
    if not series:
        return None
    plt = pyplot()
    panels = sorted(series, key=lambda p: (not p.startswith("loss"), p == "learning rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys in series[panel]:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(fig, path)
    return path

"""The report's figures (matplotlib, Agg backend): AP bars with error bars and value labels, and
training curves from the runs' metrics.json.
"""

import io
import math
import os

from moco.utils.file_io import atomic_write
from moco.utils.run_files import read_metrics


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """``fig`` as PNG to ``path``: a file name (written atomically) or a binary file object."""
    fig.tight_layout()
    try:
        if isinstance(path, (str, os.PathLike)):
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        else:
            fig.savefig(path, format="png", dpi=120)
    finally:
        pyplot().close(fig)


def figure_bytes(draw, *args, **kwargs):
    """The PNG bytes that ``draw(*args, path, **kwargs)`` (e.g. :func:`plot_table`) saves, so
    that they can be written with the files they belong to (moco.utils.file_io.atomic_write_files)."""
    buf = io.BytesIO()
    draw(*args, buf, **kwargs)
    return buf.getvalue()


def plot_table(table, path, title=None):
    """Grouped bars (one group per metric, one bar per pretraining) with std error bars."""
    plt = pyplot()
    k = len(table.rows)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(table.columns) * max(1, k / 2), 3.6))
    for i, row in enumerate(table.rows):
        xs = [j + (i - (k - 1) / 2) * width for j in range(len(table.columns))]
        means = [s.mean for s in row.stats]
        errs = [math.nan if s.std is None else s.std for s in row.stats]  # NaN: no bar for n == 1
        bars = ax.bar(
            xs, means, width, yerr=errs, capsize=3, label=f"{row.label} (n={row.stats[0].n})"
        )
        # values on the bars: a near-zero bar is otherwise invisible
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=7)
    ax.set_xticks(range(len(table.columns)))
    ax.set_xticklabels(table.columns)
    ax.set_ylabel("AP (%)")
    ax.set_title(
        title or ("VOC detection" if table.task == "voc" else "COCO detection / segmentation")
    )
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# panels of the training curves: (title, metrics.json keys tried in order)
CURVE_PANELS = (
    ("loss", ("total_loss", "loss")),
    ("kNN top-1 (%)", ("knn_top1",)),
    ("learning rate", ("lr",)),
)


def _plottable(value):
    """A finite real number (a hand-edited or foreign metrics.json row may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_series(runs):
    """{panel: [(label, iterations, values)]} of run folders ({label: folder}): each panel's
    first recorded key, its finite numeric values only."""
    series = {}
    for label, folder in runs.items():
        rows = read_metrics(folder)
        for panel, keys in CURVE_PANELS:
            key = next((k for k in keys if any(_plottable(r.get(k)) for r in rows)), None)
            if key is not None:
                points = [(r["iteration"], r[key]) for r in rows if _plottable(r.get(key))]
                series.setdefault(panel, []).append((label, *zip(*points)))
    return series


def plot_curves(runs, path, title=None):
    """Training curves of run folders ({label: folder}) from their metrics.json, one panel per
    :data:`CURVE_PANELS` entry that any run recorded (loss, kNN top-1, lr over iterations).
    Returns ``path`` (a file name, or a binary file object), or None when no run has recorded
    metrics (nothing is written)."""
    series = curve_series(runs)
    if not series:
        return None
    plt = pyplot()
    panels = [p for p, _ in CURVE_PANELS if p in series]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys in series[panel]:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return path

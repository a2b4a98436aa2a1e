"""Paper-style transfer tables from detection runs: mean ± std over trials, delta to a baseline.

Input: labeled groups of run folders, each holding the ``final_metrics.json`` that
``detection.trainer`` writes. Per group (one pretraining) and metric: the mean over trials, the
sample standard deviation (ddof=1, shown only when n > 1) and the difference of the mean to the
baseline group's mean, e.g. ``55.9±0.2 (+2.4)`` as in the MoCo paper's tables.

Columns: VOC: AP50, AP, AP75 (Detectron2's VOC evaluator, "bbox"); COCO: AP^bb, AP^bb_50,
AP^bb_75, AP^mk, AP^mk_50, AP^mk_75 (mask columns only when the runs have masks).
Outputs: Markdown, CSV and a PNG bar chart (matplotlib, Agg backend). The table helpers
(:class:`Stat`, :func:`markdown_table`, :func:`csv_text`, :func:`save_figure`) also make the
ablation tables (experiments.ablate).
"""

import csv
import glob
import io
import json
import math
import os
import statistics
from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "COCO_BOX_COLUMNS",
    "COCO_MASK_COLUMNS",
    "VOC_COLUMNS",
    "Paired",
    "Row",
    "Stat",
    "Table",
    "csv_text",
    "format_cell",
    "load_metrics",
    "markdown_table",
    "paired",
    "parse_groups",
    "plot_table",
    "published_markdown",
    "pyplot",
    "save_figure",
    "summarize",
    "to_markdown",
    "write_csv",
    "write_report",
]

METRICS_FILE = "final_metrics.json"
# (column name, result section, key in Detectron2's results)
VOC_COLUMNS = (("AP50", "bbox", "AP50"), ("AP", "bbox", "AP"), ("AP75", "bbox", "AP75"))
COCO_BOX_COLUMNS = (
    ("AP^bb", "bbox", "AP"),
    ("AP^bb_50", "bbox", "AP50"),
    ("AP^bb_75", "bbox", "AP75"),
)
COCO_MASK_COLUMNS = (
    ("AP^mk", "segm", "AP"),
    ("AP^mk_50", "segm", "AP50"),
    ("AP^mk_75", "segm", "AP75"),
)


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (ddof=1); None when n == 1
    n: int

    @classmethod
    def of(cls, values):
        n = len(values)
        return cls(statistics.fmean(values), statistics.stdev(values) if n > 1 else None, n)


@dataclass
class Row:
    label: str
    runs: list  # run folders
    stats: list  # Stat per column
    deltas: list | None  # mean - baseline mean per column; None for the baseline / no baseline
    values: list = None  # per column, the runs' values (in ``runs`` order)
    seeds: list = None  # each run's detection SEED (final_metrics.json), pairs trials across rows


@dataclass
class Table:
    task: str  # "voc" or "coco"
    columns: list  # column names
    rows: list
    baseline: str | None


def _has_glob(pattern):
    return any(c in pattern for c in "*?[")


def parse_groups(specs):
    """``["supervised=out/sup_*", "moco=out/m_1", "out/m_2"]`` -> {label: [run folders]}.

    A token ``LABEL=PATTERN`` starts a group; a token without ``=`` adds to the previous group
    (what a shell leaves after expanding ``LABEL=a b*``). Patterns are expanded here (sorted), so
    quoting them is fine.
    """
    groups = OrderedDict()
    label = None
    for spec in specs:
        if "=" in spec and not os.path.exists(spec):
            label, pattern = spec.split("=", 1)
            label = label.strip()
            if not label:
                raise ValueError(f"group {spec!r}: empty label; write LABEL=RUN_DIR_PATTERN")
            if label in groups:
                raise ValueError(
                    f"group {label!r} given twice; put all its runs in one LABEL=... group"
                )
            groups[label] = []
        else:
            pattern = spec
            if label is None:
                raise ValueError(f"{spec!r}: runs must follow a label, e.g. supervised={spec}")
        if not pattern:
            continue
        matches = sorted(glob.glob(pattern)) if _has_glob(pattern) else [pattern]
        if not matches:
            raise ValueError(f"group {label!r}: pattern {pattern!r} matched nothing")
        groups[label].extend(matches)
    if not groups:
        raise ValueError("no groups given; write e.g. supervised='out/sup_*' moco_v2='out/moco_*'")
    for name, runs in groups.items():
        if not runs:
            raise ValueError(f"group {name!r} is empty; give it run folders, e.g. {name}=out/run_*")
    return groups


def load_metrics(run_dir):
    """Read ``run_dir/final_metrics.json`` (a run folder, or the file itself)."""
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (did the run in {run_dir} finish its evaluation?)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if (
        not isinstance(data, dict)
        or data.get("task") not in ("voc", "coco")
        or "metrics" not in data
    ):
        raise ValueError(f"{path}: not a final_metrics.json (needs 'task' voc/coco and 'metrics')")
    load = data.get("weights_load")
    if (
        isinstance(load, dict)
        and load.get("matched") != load.get("backbone_tensors")
        and not load.get("allow_partial")
    ):
        # such a run trained a partly random backbone: its row would be mislabelled
        raise ValueError(
            f"{path}: its weights did not load ({load.get('matched')} of "
            f"{load.get('backbone_tensors')} backbone tensors from {load.get('file')})"
        )
    return data


def _value(data, section, key, path):
    try:
        value = data["metrics"][section][key]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no metrics.{section}.{key}") from None
    if value is None:
        raise ValueError(f"{path}: metrics.{section}.{key} is null (no score)")
    return float(value)


def summarize(groups, baseline=None):
    """Build a :class:`Table` from {label: [run folders]}; deltas against ``baseline``'s row."""
    loaded = OrderedDict(
        (label, [(run, load_metrics(run)) for run in runs]) for label, runs in groups.items()
    )
    tasks = {data["task"]: run for runs in loaded.values() for run, data in runs}
    if len(tasks) > 1:
        raise ValueError(
            "runs mix VOC and COCO results (e.g. "
            + ", ".join(f"{run}: {t}" for t, run in tasks.items())
            + "); report them in separate tables"
        )
    task = next(iter(tasks))
    if task == "voc":
        columns = VOC_COLUMNS
    else:
        with_masks = {
            run: "segm" in data["metrics"] for runs in loaded.values() for run, data in runs
        }
        if len(set(with_masks.values())) > 1:
            box_only = [run for run, has in with_masks.items() if not has]
            raise ValueError(
                f"some COCO runs have no mask results ({', '.join(box_only)}); mix not allowed"
            )
        columns = COCO_BOX_COLUMNS + (COCO_MASK_COLUMNS if all(with_masks.values()) else ())
    if baseline is not None and baseline not in loaded:
        raise ValueError(f"--baseline {baseline!r} is not one of the groups ({', '.join(loaded)})")

    rows = []
    for label, runs in loaded.items():
        values = [
            [_value(data, section, key, run) for run, data in runs] for _, section, key in columns
        ]
        seeds = [data.get("seed") for _, data in runs]
        rows.append(
            Row(label, [run for run, _ in runs], [Stat.of(v) for v in values], None, values, seeds)
        )
    if baseline is not None:
        base = next(r for r in rows if r.label == baseline)
        for row in rows:
            if row is not base:
                row.deltas = [s.mean - b.mean for s, b in zip(row.stats, base.stats)]
    return Table(task, [name for name, _, _ in columns], rows, baseline)


def format_cell(stat, delta=None, digits=1):
    """``55.9±0.2 (+2.4)``; no ``±`` part when n == 1, no delta part when ``delta`` is None."""
    text = f"{stat.mean:.{digits}f}"
    if stat.std is not None:
        text += f"±{stat.std:.{digits}f}"
    if delta is not None:
        text += f" ({delta:+.{digits}f})"
    return text


def markdown_table(header, rows):
    """A Markdown table (no final newline) of ``header`` and ``rows`` (lists of cell strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def csv_text(header, rows, lineterminator="\r\n"):
    """CSV text of ``header`` and ``rows`` (csv module quoting)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def to_markdown(table, digits=1):
    header = ["pretraining", "n"] + table.columns
    rows = []
    for row in table.rows:
        n = row.stats[0].n
        deltas = row.deltas or [None] * len(row.stats)
        cells = [format_cell(s, d, digits) for s, d in zip(row.stats, deltas)]
        rows.append([row.label, str(n)] + cells)
    note = f"{'VOC' if table.task == 'voc' else 'COCO'}: mean±std (sample std, n runs)"
    if table.baseline:
        note += f"; (+x) = mean minus the {table.baseline} mean"
    return markdown_table(header, rows) + "\n\n" + note + "\n"


@dataclass
class Paired:
    """Row ``a`` minus row ``b`` over trials paired by detection seed (same seed, same data order)."""

    a: str
    b: str
    metric: str
    n_pairs: int
    mean_diff: float
    ci95: tuple | None  # two-sided 95% confidence interval of the mean difference (t distribution)
    p_value: float | None  # one-sided paired t-test, H1: a > b

    def to_dict(self):
        return {
            "metric": self.metric,
            "n_pairs": self.n_pairs,
            "mean_diff": self.mean_diff,
            "ci95": list(self.ci95) if self.ci95 else None,
            "p_value": self.p_value,
        }

    def line(self):
        head = f"{self.a} vs {self.b}: {self.metric} paired difference {self.mean_diff:+.2f}"
        if self.ci95 is None:
            return f"{head} over {self.n_pairs} pair(s): too few pairs for an interval (need >= 2)"
        lo, hi = self.ci95
        verdict = (
            f"{self.a} is ahead of {self.b}"
            if lo > 0
            else f"{self.a} is behind {self.b}"
            if hi < 0
            else "the interval contains 0: no difference shown"
        )
        return (
            f"{head}, 95% CI [{lo:+.2f}, {hi:+.2f}], one-sided p = {self.p_value:.3g} "
            f"(n = {self.n_pairs} pairs): {verdict}"
        )


def _two_rows(table, a, b, what):
    rows = {r.label: r for r in table.rows}
    for label in (a, b):
        if label not in rows:
            raise ValueError(f"{what}: no row {label!r} (rows: {', '.join(rows)})")
    return rows[a], rows[b]


def paired(table, a, b, column=None):
    """:class:`Paired` difference of rows ``a`` and ``b`` on ``column`` (default AP50 / AP^bb_50),
    over the trials whose seeds both rows have. Statistics from scipy (t distribution)."""
    from scipy import stats as st

    column = column or ("AP50" if table.task == "voc" else "AP^bb_50")
    i = table.columns.index(column)
    by_seed = [dict(zip(row.seeds, row.values[i])) for row in _two_rows(table, a, b, "paired")]
    common = [s for s in by_seed[0] if s is not None and s in by_seed[1]]
    if not common:
        raise ValueError(
            f"paired: rows {a!r} and {b!r} share no detection seed; run the same trials"
        )
    xa = [by_seed[0][s] for s in common]
    xb = [by_seed[1][s] for s in common]
    diffs = [x - y for x, y in zip(xa, xb)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(a, b, column, len(diffs), mean, None, None)
    sem = st.sem(diffs)
    if sem == 0:  # identical differences: the interval is the point
        ci, p = (mean, mean), (0.0 if mean > 0 else 1.0)
    else:
        ci = tuple(float(x) for x in st.t.interval(0.95, len(diffs) - 1, loc=mean, scale=sem))
        p = float(st.ttest_rel(xa, xb, alternative="greater").pvalue)
    return Paired(a, b, column, len(diffs), mean, ci, p)


def compare(table, a, b, column=None):
    """One line: does row ``a`` beat row ``b`` on ``column`` (default AP / AP^bb)?

    With at least 2 runs in both rows, a difference counts only beyond twice its standard error;
    with one run per row there is no spread estimate and the line says so.
    """
    column = column or ("AP" if table.task == "voc" else "AP^bb")
    row_a, row_b = _two_rows(table, a, b, "compare")
    i = table.columns.index(column)
    sa, sb = row_a.stats[i], row_b.stats[i]
    diff = sa.mean - sb.mean
    head = f"{a} vs {b}: {column} {sa.mean:.1f} vs {sb.mean:.1f} ({diff:+.1f})"
    if sa.std is None or sb.std is None:
        word = "ahead of" if diff > 0 else "behind" if diff < 0 else "level with"
        return (
            f"{head}: {a} is {word} {b} in a single trial each, no spread estimate "
            "(DETECTION.TRIALS >= 2 gives one)"
        )
    noise = 2.0 * math.sqrt(sa.std**2 / sa.n + sb.std**2 / sb.n)
    if abs(diff) <= noise:
        return f"{head}: within noise (2 standard errors = {noise:.1f}); {a} does not beat {b}"
    return (
        f"{head}: {a} {'beats' if diff > 0 else 'is behind'} {b} (2 standard errors = {noise:.1f})"
    )


# Published figures (ImageNet scale, ResNet-50), shown beside measured rows and never mixed into
# their statistics. He et al. 2019 (MoCo), Table 5: VOC07+12 trainval -> VOC07 test, R50-C4,
# 24k iterations; (AP50, AP, AP75).
PUBLISHED_VOC = (
    ("random init", (60.2, 33.8, 33.1)),
    ("super. IN-1M", (81.3, 53.5, 58.8)),
    ("MoCo IN-1M", (81.5, 55.9, 62.6)),
    ("MoCo v2 IN-1M, 800 ep (Chen et al. 2020)", (82.5, 57.4, 64.0)),
)
# The seed's pretext-task comparators (MoCo paper Table 4: VOC07 trainval fine-tuning; each method
# against the supervised baseline of its own paper): (method, metric, super. IN-1M, unsup. IN-1M).
PUBLISHED_PRETEXT = (
    ("RelPos (Doersch et al.)", "AP50", 74.2, 66.8),
    ("Multi-task (Doersch & Zisserman)", "AP50", 74.2, 70.5),
    ("Jigsaw (Goyal et al.)", "AP50", 70.5, 61.4),
    ("LocalAgg (Zhuang et al.)", "AP50", 74.6, 69.1),
    ("MoCo", "AP50", 74.4, 74.9),
    ("Multi-task (Doersch & Zisserman)", "AP75", 44.3, 43.9),
    ("MoCo", "AP75", 42.7, 50.1),
)


def published_markdown():
    """The published reference tables (ImageNet-scale figures, not measured here), as Markdown."""
    voc = markdown_table(
        ["published (R50-C4, VOC07+12, 24k)", "AP50", "AP", "AP75"],
        [[name] + [f"{v:.1f}" for v in vals] for name, vals in PUBLISHED_VOC],
    )
    pretext = markdown_table(
        ["published pretext task (VOC07 trainval)", "metric", "super. IN-1M", "unsup. IN-1M"],
        [[m, k, f"{s:.1f}", f"{u:.1f} ({u - s:+.1f})"] for m, k, s, u in PUBLISHED_PRETEXT],
    )
    return (
        f"Published figures for orientation (ImageNet pretraining, ResNet-50; not measured here "
        f"and not part of the statistics above):\n\n{voc}\n\n{pretext}\n"
    )


def write_csv(table, path):
    header = ["pretraining", "n"]
    for name in table.columns:
        header += [f"{name}_mean", f"{name}_std", f"{name}_delta"]
    rows = []
    for row in table.rows:
        deltas = row.deltas or [None] * len(row.stats)
        values = [row.label, row.stats[0].n]
        for stat, delta in zip(row.stats, deltas):
            values += [
                f"{stat.mean:.4f}",
                "" if stat.std is None else f"{stat.std:.4f}",
                "" if delta is None else f"{delta:.4f}",
            ]
        rows.append(values)
    with open(path, "w", newline="") as f:
        f.write(csv_text(header, rows))


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


def read_metrics_json(run_dir):
    """The rows of ``run_dir/metrics.json`` (Detectron2's JSONWriter: one JSON object a line);
    [] when there is none. A torn or foreign line is skipped."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "iteration" in row:
                rows.append(row)
    return rows


def plot_curves(runs, path, title=None):
    """Training curves of run folders ({label: folder}) from their metrics.json, one panel per
    :data:`CURVE_PANELS` entry that any run recorded (loss, kNN top-1, lr over iterations).
    Returns ``path``, or None when no run has recorded metrics (nothing is written)."""
    series = {}  # panel -> [(label, iterations, values)]
    for label, folder in runs.items():
        rows = read_metrics_json(folder)
        for panel, keys in CURVE_PANELS:
            key = next((k for k in keys if any(k in r for r in rows)), None)
            if key is not None:
                points = [(r["iteration"], r[key]) for r in rows if key in r]
                series.setdefault(panel, []).append((label, *zip(*points)))
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


def git_commit(folder=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
    """This code's git commit (short), "+ local changes" when the tree differs; None outside git."""
    import subprocess

    def git(*args):
        return subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit and commit + (" + local changes" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def what_was_run(table):
    """Markdown lines saying what each row ran (config, iterations, batch, seeds, weights) and
    where (code commit, machine), read from the runs' final_metrics.json."""
    import platform

    lines = ["## What was run", ""]
    for row in table.rows:
        runs = [load_metrics(run) for run in row.runs]

        def values(key, runs=runs):
            return ", ".join(sorted({str(d.get(key)) for d in runs}))

        configs = ", ".join(
            sorted(
                {os.path.relpath(d["config_file"]) if d.get("config_file") else "?" for d in runs}
            )
        )
        seeds = ", ".join(map(str, row.seeds))
        lines.append(
            f"- {row.label}: {len(runs)} trial(s), seeds {seeds}; config {configs} "
            f"(overrides: {values('opts')}); {values('iterations')} iterations of "
            f"{values('ims_per_batch')} images on {values('device')} x "
            f"{values('world_size')}; weights {values('weights') or 'none'}"
        )
    lines.append(f"- code: commit {git_commit() or 'unknown (not a git checkout)'}")
    lines.append(
        f"- machine: {platform.node()}, {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    return "\n".join(lines) + "\n"


def write_report(table, output_dir, name="transfer", title=None, notes=(), published=False):
    """Write ``name.md`` (the table, then ``notes`` lines, what was run, then with ``published``
    the published reference tables), ``name.csv`` and ``name.png`` into ``output_dir``; return
    their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("md", "csv", "png")}
    with open(paths["md"], "w") as f:
        f.write(to_markdown(table))
        f.write("".join(f"\n- {line}" for line in notes) + ("\n" if notes else ""))
        f.write("\n" + what_was_run(table))
        if published:
            f.write("\n" + published_markdown())
    write_csv(table, paths["csv"])
    plot_table(table, paths["png"], title)
    return paths

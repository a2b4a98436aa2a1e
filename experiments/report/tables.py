"""Paper-style transfer tables from detection runs: mean ± std over trials, delta to a baseline.

Input: labeled groups of run folders, each holding the ``final_metrics.json`` that
``detection.trainer`` writes. Per group (one pretraining) and metric: the mean over trials, the
sample standard deviation (ddof=1, shown only when n > 1) and the difference of the mean to the
baseline group's mean, e.g. ``55.9±0.2 (+2.4)`` as in the MoCo paper's tables.

Columns per task (final_metrics.json "task", :data:`TASKS`): VOC: AP50, AP, AP75 (Detectron2's
VOC evaluator, "bbox"); COCO: AP^bb, AP^bb_50, AP^bb_75, AP^mk, AP^mk_50, AP^mk_75 (mask columns
only when the runs have masks); the MoCo paper's other tasks (issue 26): COCO keypoints AP^kp,
AP^kp_50, AP^kp_75; LVIS AP^mk, AP^mk_50, AP^mk_75 and APr / APc / APf (a frequency group without
ground truth in the test set is null in every run: its column is left out, and the note says so);
Cityscapes AP^mk, AP^mk_50 (cityscapesscripts gives no AP75); semantic segmentation mIoU. One
table holds one task.
Outputs: Markdown, CSV and a PNG bar chart (matplotlib, Agg backend). The table helpers
(:class:`Stat`, :func:`markdown_table`, :func:`csv_text`, :func:`save_figure`) also make the
ablation tables (experiments.ablate).
"""

import csv
import glob
import hashlib
import io
import json
import math
import os
import statistics
from collections import OrderedDict
from dataclasses import dataclass

from moco.utils.file_io import atomic_write_text
from moco.utils.run_files import FINAL_METRICS

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


KEYPOINT_COLUMNS = (
    ("AP^kp", "keypoints", "AP"),
    ("AP^kp_50", "keypoints", "AP50"),
    ("AP^kp_75", "keypoints", "AP75"),
)


LVIS_FREQUENCY_COLUMNS = (("APr", "segm", "APr"), ("APc", "segm", "APc"), ("APf", "segm", "APf"))


CITYSCAPES_COLUMNS = COCO_MASK_COLUMNS[:2]


SEM_SEG_COLUMNS = (("mIoU", "sem_seg", "mIoU"),)


@dataclass(frozen=True)
class TaskColumns:
    """How a task's runs are tabled: its name in notes and titles, its columns (name, result
    section, key), those left out when null in every run, the columns :func:`paired` and
    :func:`compare` take by default (the 50%-IoU AP as VOC's AP50, and the primary score), and
    the unit on the figure's axis."""

    name: str
    columns: tuple
    paired: str
    compare: str
    optional: tuple = ()
    unit: str = "AP (%)"


# final_metrics.json "task" (detection.trainer) -> its columns; "coco" adds the mask columns when
# the runs have masks (summarize)
TASKS = {
    "voc": TaskColumns("VOC", VOC_COLUMNS, "AP50", "AP"),
    "coco": TaskColumns("COCO", COCO_BOX_COLUMNS, "AP^bb_50", "AP^bb"),
    "coco_kp": TaskColumns("COCO keypoints", KEYPOINT_COLUMNS, "AP^kp_50", "AP^kp"),
    "lvis": TaskColumns(
        "LVIS",
        COCO_MASK_COLUMNS + LVIS_FREQUENCY_COLUMNS,
        "AP^mk_50",
        "AP^mk",
        optional=tuple(name for name, _, _ in LVIS_FREQUENCY_COLUMNS),
    ),
    "cityscapes": TaskColumns("Cityscapes", CITYSCAPES_COLUMNS, "AP^mk_50", "AP^mk"),
    "sem_seg": TaskColumns(
        "semantic segmentation", SEM_SEG_COLUMNS, "mIoU", "mIoU", unit="mIoU (%)"
    ),
}


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
    task: str  # a key of TASKS: "voc", "coco", "coco_kp", "lvis", "cityscapes", "sem_seg"
    columns: list  # column names
    rows: list
    baseline: str | None
    omitted: list = None  # optional columns null in every run (LVIS's APr without rare classes)


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


def metrics_path(run_dir):
    """The ``final_metrics.json`` of a run folder (or the file itself)."""
    return run_dir if run_dir.endswith(".json") else os.path.join(run_dir, FINAL_METRICS)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value, n=40):
    """A recorded value as it reads in one error line (a hostile file may hold anything)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_weights_load(data, path):
    """A run that names weights must record that they filled the whole backbone: otherwise it
    trained a partly random backbone and its row would be mislabelled (issue 17, issue 27.4)."""
    weights, load = data.get("weights"), data.get("weights_load")
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"{path}: 'weights' is {_short(weights)}, not a file name or ''")
    if load is None and not weights:
        return  # random init (and nothing was loaded)
    if not isinstance(load, dict):
        raise ValueError(
            f"{path}: 'weights_load' is {'missing' if load is None else _short(load)}, not "
            "the record of how the weights loaded; the run cannot show that its backbone loaded"
        )
    matched, total = load.get("matched"), load.get("backbone_tensors")
    if not (_is_int(matched) and _is_int(total) and 0 <= matched <= total and total > 0):
        raise ValueError(
            f"{path}: 'weights_load' has matched {_short(matched)} of backbone_tensors "
            f"{_short(total)}; "
            "expected whole numbers with 0 <= matched <= backbone_tensors > 0"
        )
    if matched != total and load.get("allow_partial") is not True:
        raise ValueError(
            f"{path}: its weights did not load ({matched} of {total} backbone tensors from "
            f"{_short(load.get('file'), 80)})"
        )


def load_metrics(run_dir):
    """Read ``run_dir/final_metrics.json`` (a run folder, or the file itself); a file that is
    not a finished run's record, or whose weights did not load, is one ValueError naming it."""
    path = metrics_path(run_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (did the run in {run_dir} finish its evaluation?)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a final_metrics.json (nested too deeply)") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("task"), str)
        or data["task"] not in TASKS
        or not isinstance(data.get("metrics"), dict)
    ):
        raise ValueError(
            f"{path}: not a final_metrics.json (needs 'task' {'/'.join(TASKS)} and 'metrics')"
        )
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise ValueError(
            f"{path}: 'seed' is {_short(seed)}, not a whole number (trials pair by seed)"
        )
    _check_weights_load(data, path)
    return data


def _value(data, section, key, path):
    """An AP: a real number in [0, 100]. Anything else is no score: 5000, -500, "55.5", true,
    inf and NaN would each move a mean without a word."""
    try:
        value = data["metrics"][section][key]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no metrics.{section}.{key}") from None
    if value is None:
        raise ValueError(f"{path}: metrics.{section}.{key} is null (no score)")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(
            f"{path}: metrics.{section}.{key} is {json.dumps(value)[:40]}, not a number"
        )
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(
            f"{path}: metrics.{section}.{key} is {value!r}, outside [0, 100] (AP and mIoU are "
            "percentages)"
        )
    return float(value)


def _recorded(data, section, key):
    """The raw value at metrics.section.key, None when absent or null (checked by _value)."""
    scores = data["metrics"].get(section)
    return scores.get(key) if isinstance(scores, dict) else None


def _timed_content(path):
    """sha256 of a final_metrics.json that records its run's timing (train_seconds or
    eval_seconds, as detection.trainer writes): two such files are equal only as copies. None for
    a file without timing (a hand-written record may equal another by chance) or none at all."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # missing: load_metrics names it
    if b'"train_seconds"' not in data and b'"eval_seconds"' not in data:
        return None
    return hashlib.sha256(data).hexdigest()


def check_distinct_runs(groups):
    """Each run once: the same run given twice (a repeated folder, overlapping globs, a folder in
    two groups, a symlink to one, a copied folder: its final_metrics.json byte for byte, with the
    run's own timings) would count as several trials. One ValueError naming it."""
    seen, contents = {}, {}
    for label, runs in groups.items():
        for run in runs:
            real = os.path.realpath(metrics_path(run))
            content = _timed_content(real)
            if content is not None and content in contents and real not in seen:
                raise ValueError(
                    f"runs {contents[content]} and {run} hold the same {FINAL_METRICS} (one run "
                    "copied): one run is one trial; give each run folder once"
                )
            if content is not None:
                contents.setdefault(content, run)
            if real in seen:
                first_label, first = seen[real]
                where = (
                    f"twice in group {label!r}"
                    if first_label == label
                    else f"in groups {first_label!r} and {label!r}"
                )
                same = "" if first == run else f" (as {first} and {run})"
                raise ValueError(
                    f"run {run} is given {where}{same}: one run is one trial; give each run "
                    "folder once"
                )
            seen[real] = (label, run)


def summarize(groups, baseline=None):
    """Build a :class:`Table` from {label: [run folders]}; deltas against ``baseline``'s row."""
    check_distinct_runs(groups)
    loaded = OrderedDict(
        (label, [(run, load_metrics(run)) for run in runs]) for label, runs in groups.items()
    )
    tasks = {data["task"]: run for runs in loaded.values() for run, data in runs}
    if len(tasks) > 1:
        raise ValueError(
            f"runs mix {' and '.join(TASKS[t].name for t in tasks)} results (e.g. "
            + ", ".join(f"{run}: {t}" for t, run in tasks.items())
            + "); report them in separate tables"
        )
    task = next(iter(tasks))
    spec = TASKS[task]
    columns, omitted = spec.columns, []
    if task != "coco":
        everything = [data for runs in loaded.values() for _, data in runs]
        omitted = [
            name
            for name, section, key in columns
            if name in spec.optional
            and all(_recorded(data, section, key) is None for data in everything)
        ]
        columns = tuple(c for c in columns if c[0] not in omitted)
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
            [_value(data, section, key, metrics_path(run)) for run, data in runs]
            for _, section, key in columns
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
    return Table(task, [name for name, _, _ in columns], rows, baseline, omitted)


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


def to_markdown(table, digits=1):
    header = ["pretraining", "n"] + table.columns
    rows = []
    for row in table.rows:
        n = row.stats[0].n
        deltas = row.deltas or [None] * len(row.stats)
        cells = [format_cell(s, d, digits) for s, d in zip(row.stats, deltas)]
        rows.append([row.label, str(n)] + cells)
    note = f"{TASKS[table.task].name}: mean±std (sample std, n runs)"
    if table.baseline:
        note += f"; (+x) = mean minus the {table.baseline} mean"
    if table.omitted:
        note += (
            f"; {', '.join(table.omitted)} left out: null in every run (no ground truth in that "
            "group of the test set)"
        )
    return markdown_table(header, rows) + "\n\n" + note + "\n"


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
    """The table as CSV (:func:`csv_rows`) to ``path``, written atomically."""
    atomic_write_text(path, csv_text(*csv_rows(table)))


def csv_rows(table):
    """(header, rows) of the table's CSV: per column mean, std and delta."""
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
    return header, rows


def trial_rows(table):
    """(header, rows) of the per-trial CSV: one row per run (label, detection seed, each column's
    AP, iterations, the initial weights' sha256 as the run recorded it, the run folder), for
    pandas and one's own statistics."""
    header = ["label", "seed", *table.columns, "iterations", "weights_sha256", "run"]
    rows = []
    for row in table.rows:
        for j, run in enumerate(row.runs):
            data = load_metrics(run)
            seed = row.seeds[j] if row.seeds else data.get("seed")
            rows.append(
                [row.label, "" if seed is None else seed]
                + [f"{values[j]:.4f}" for values in row.values]
                + [data.get("iterations", ""), data.get("weights_sha256") or "", run]
            )
    return header, rows

"""Writing a report: ``transfer.{md,csv,png,pdf}`` and the "What was run" section (configs, overrides,
iterations, seeds, weights, code commit, machine).
"""

import os

from experiments.report.figures import (
    curve_series,
    figure_bytes,
    pdf_path,
    plot_curves,
    plot_table,
)
from experiments.report.tables import (
    csv_rows,
    csv_text,
    load_metrics,
    markdown_table,
    published_markdown,
    to_markdown,
    trial_rows,
)
from moco.utils.file_io import atomic_write_files, check_output_dir, file_sha256

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit(folder=_REPO):
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


# overrides each trial sets for itself, shown in their own columns (seeds, weights) or not at all
_PER_TRIAL = {"OUTPUT_DIR", "SEED", "MODEL.WEIGHTS"}


def _pairs(opts):
    """A run's ``opts`` (KEY VALUE ...) as {KEY: VALUE}, in order (a later one wins, as in
    Detectron2's merge)."""
    opts = list(opts) if isinstance(opts, list) else []
    return {str(k): str(v) for k, v in zip(opts[::2], opts[1::2])}


def _shown(path, base):
    """``path`` relative to ``base`` when inside it, else relative to this repository when inside
    it, else as recorded: the table shows what differs, not where the machine keeps it."""
    if not isinstance(path, str) or not path:
        return "?"
    for root in (base, _REPO):
        if root and os.path.isabs(path):
            rel = os.path.relpath(path, root)
            if not rel.startswith(os.pardir):
                return rel
    return path


def _weights(data, base):
    """``file (sha256 prefix)``: the hash recorded by the run, else the file's now (marked)."""
    weights = data.get("weights")
    if not weights:
        return "none (random init)"
    digest = data.get("weights_sha256")
    if isinstance(digest, str) and digest:
        return f"{_shown(weights, base)} ({digest[:12]})"
    if os.path.isfile(weights):  # a run from before weights_sha256 was recorded
        return f"{_shown(weights, base)} ({file_sha256(weights)[:12]} now)"
    return f"{_shown(weights, base)} (no hash: not recorded, file gone)"


def _cell(text):
    """A Markdown table cell: a recorded value may hold ``|`` or a line break."""
    return " ".join(str(text).split()).replace("|", "\\|")


def what_was_run(table, base=None):
    """The "What was run" section: a table, one row per init (config, the overrides its trials
    share, iterations x batch, device, the kernels (torch, CPU instruction set or GPU), seeds, the
    weights file and its content hash; paths relative
    to ``base``, the run folder), read from the runs' final_metrics.json, then where it ran (code
    commit, machine). A cell that differs across a row's trials lists each value, so a row that
    mixes runs is visible at a glance."""
    import platform

    header = [
        "init",
        "trials",
        "config",
        "shared overrides",
        "iterations x batch",
        "device x processes",
        "kernels",
        "seeds",
        "weights (sha256)",
    ]
    rows = []
    for row in table.rows:
        runs = [load_metrics(run) for run in row.runs]

        def each(fn, runs=runs, sep=", "):
            return sep.join(sorted({fn(d) for d in runs}))

        opts = [_pairs(d.get("opts")) for d in runs]
        keys = [k for k in opts[0] if k not in _PER_TRIAL]
        shared = [k for k in keys if all(o.get(k) == opts[0][k] for o in opts)]
        differ = sorted({k for o in opts for k in o if k not in _PER_TRIAL} - set(shared))
        overrides = ", ".join(f"{k} {opts[0][k]}" for k in shared) or "none"
        if differ:
            overrides += "; differing: " + ", ".join(differ)
        cells = [
            row.label,
            str(len(runs)),
            each(lambda d: _shown(d.get("config_file"), base)),
            overrides,
            each(lambda d: f"{d.get('iterations')} x {d.get('ims_per_batch')}"),
            each(lambda d: f"{d.get('device')} x {d.get('world_size')}"),
            each(lambda d: d.get("kernels") or "not recorded", sep="; "),
            ", ".join(map(str, row.seeds)),
            each(lambda d: _weights(d, base)),
        ]
        rows.append([_cell(c) for c in cells])
    lines = ["## What was run", "", markdown_table(header, rows), ""]
    if base:
        lines.append(f"Paths relative to {base}.")
    lines.append(f"Code: commit {git_commit() or 'unknown (not a git checkout)'}.")
    lines.append(
        f"Machine: {platform.node()}, {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}."
    )
    return "\n".join(lines) + "\n"


def write_report(
    table,
    output_dir,
    name="transfer",
    title=None,
    notes=(),
    published=False,
    base=None,
    curves=None,
    curves_name="curves.png",
    curves_title=None,
):
    """Write ``name.md`` (the table, then ``notes`` lines, what was run, then with ``published``
    the published reference tables; ``base``: what its paths are shown relative to), ``name.csv``
    (per row), ``name_trials.csv`` (per run) and ``name.png`` into ``output_dir``, and with
    ``curves`` ({label: run folder}) the training curves as ``curves_name`` when any run recorded
    them, each figure with its PDF; return their paths ({"md", "csv", "trials_csv", "png", "png_pdf"[, "curves",
    "curves_pdf"]}).

    Everything is rendered first and the files are written as one set
    (:func:`moco.utils.file_io.atomic_write_files`): bad input or a full disk leaves the previous
    report whole, never a new Markdown beside an old figure."""
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("md", "csv", "png")}
    paths["trials_csv"] = os.path.join(output_dir, f"{name}_trials.csv")  # one row per run
    text = to_markdown(table)
    text += "".join(f"\n- {line}" for line in notes) + ("\n" if notes else "")
    text += "\n" + what_was_run(table, base)
    if published:
        text += "\n" + published_markdown()
    contents = {
        paths["md"]: text.encode("utf-8"),
        paths["csv"]: csv_text(*csv_rows(table)).encode("utf-8"),
        paths["trials_csv"]: csv_text(*trial_rows(table)).encode("utf-8"),
    }
    # each figure as a print-resolution PNG and a PDF beside it
    figures = {"png": figure_bytes(plot_table, table, title=title)}
    if curves and curve_series(curves):
        paths["curves"] = os.path.join(output_dir, curves_name)
        figures["curves"] = figure_bytes(plot_curves, curves, title=curves_title)
    for key, rendered in figures.items():
        paths[f"{key}_pdf"] = pdf_path(paths[key])
        contents[paths[key]], contents[paths[f"{key}_pdf"]] = rendered["png"], rendered["pdf"]
    check_output_dir(output_dir, "the report folder")
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_files(contents)
    return paths

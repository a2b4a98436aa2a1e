"""Writing a report: ``transfer.{md,csv,png}`` and the "What was run" section (configs, overrides,
iterations, seeds, weights, code commit, machine).
"""

import os

from experiments.report.figures import curve_series, figure_bytes, plot_curves, plot_table
from experiments.report.tables import (
    csv_rows,
    csv_text,
    load_metrics,
    published_markdown,
    to_markdown,
)
from moco.utils.file_io import atomic_write_files, check_output_dir

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


def write_report(
    table,
    output_dir,
    name="transfer",
    title=None,
    notes=(),
    published=False,
    curves=None,
    curves_name="curves.png",
    curves_title=None,
):
    """Write ``name.md`` (the table, then ``notes`` lines, what was run, then with ``published``
    the published reference tables), ``name.csv`` and ``name.png`` into ``output_dir``, and with
    ``curves`` ({label: run folder}) the training curves as ``curves_name`` when any run recorded
    them; return their paths ({"md", "csv", "png"[, "curves"]}).

    Everything is rendered first and the files are written as one set
    (:func:`moco.utils.file_io.atomic_write_files`): bad input or a full disk leaves the previous
    report whole, never a new Markdown beside an old figure."""
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("md", "csv", "png")}
    text = to_markdown(table)
    text += "".join(f"\n- {line}" for line in notes) + ("\n" if notes else "")
    text += "\n" + what_was_run(table)
    if published:
        text += "\n" + published_markdown()
    contents = {
        paths["md"]: text.encode("utf-8"),
        paths["csv"]: csv_text(*csv_rows(table)).encode("utf-8"),
        paths["png"]: figure_bytes(plot_table, table, title=title),
    }
    if curves and curve_series(curves):
        paths["curves"] = os.path.join(output_dir, curves_name)
        contents[paths["curves"]] = figure_bytes(plot_curves, curves, title=curves_title)
    check_output_dir(output_dir, "the report folder")
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_files(contents)
    return paths

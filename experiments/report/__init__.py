"""Paper-style transfer reports from detection runs (tools/report.py, the pipeline, the ablations):
mean ± std over trials, deltas to a baseline, paired comparisons with confidence intervals,
Markdown / CSV / PNG.
"""

from experiments.report.figures import plot_curves, plot_table, pyplot, save_figure
from experiments.report.paired import Paired, compare, comparisons, paired, paired_difference
from experiments.report.tables import (
    COCO_BOX_COLUMNS,
    COCO_MASK_COLUMNS,
    PUBLISHED_PRETEXT,
    PUBLISHED_VOC,
    TASKS,
    VOC_COLUMNS,
    Row,
    Stat,
    Table,
    csv_text,
    format_cell,
    load_metrics,
    markdown_table,
    parse_groups,
    published_markdown,
    summarize,
    to_markdown,
    trial_rows,
    write_csv,
)
from experiments.report.write import git_commit, what_was_run, write_report

__all__ = [
    "COCO_BOX_COLUMNS",
    "COCO_MASK_COLUMNS",
    "PUBLISHED_PRETEXT",
    "PUBLISHED_VOC",
    "Paired",
    "Row",
    "Stat",
    "TASKS",
    "Table",
    "VOC_COLUMNS",
    "compare",
    "comparisons",
    "csv_text",
    "format_cell",
    "git_commit",
    "load_metrics",
    "markdown_table",
    "paired",
    "paired_difference",
    "parse_groups",
    "plot_curves",
    "plot_table",
    "published_markdown",
    "pyplot",
    "save_figure",
    "summarize",
    "to_markdown",
    "trial_rows",
    "what_was_run",
    "write_csv",
    "write_report",
]

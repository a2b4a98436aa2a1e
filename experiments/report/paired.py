"""Paired comparisons of two report rows: trials matched by detection seed, the mean difference
with its 95% t interval and a one-sided p (scipy), and the sentence that says which way it fell.
"""

import math
import statistics
from dataclasses import dataclass, field

from experiments.report.tables import TASKS


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
    # {row label: [seeds]} of trials left out: a seed the other row lacks, or one a row holds twice
    unpaired: dict = field(default_factory=dict)

    def to_dict(self):
        return {
            "metric": self.metric,
            "n_pairs": self.n_pairs,
            "mean_diff": self.mean_diff,
            "ci95": list(self.ci95) if self.ci95 else None,
            "p_value": self.p_value,
            "unpaired": {k: list(v) for k, v in self.unpaired.items()},
        }

    def _left_out(self):
        if not self.unpaired:
            return ""
        return "; unpaired, left out: " + "; ".join(
            f"{label} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            for label, seeds in self.unpaired.items()
        )

    def line(self):
        head = f"{self.a} vs {self.b}: {self.metric} paired difference {self.mean_diff:+.2f}"
        if self.ci95 is None:
            return (
                f"{head} over {self.n_pairs} pair(s): too few pairs for an interval (need >= 2)"
                + self._left_out()
            )
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
            f"(n = {self.n_pairs} pairs): {verdict}{self._left_out()}"
        )


def _two_rows(table, a, b, what):
    rows = {r.label: r for r in table.rows}
    for label in (a, b):
        if label not in rows:
            raise ValueError(f"{what}: no row {label!r} (rows: {', '.join(rows)})")
    return rows[a], rows[b]


def paired_difference(xa, xb, alternative="greater"):
    """``(n, mean, ci95, p)`` of ``xa[i] - xb[i]`` (trials already matched, e.g. by seed): the
    mean difference, its two-sided 95% t interval and the paired t-test's p (scipy; ``alternative``
    as ``scipy.stats.ttest_rel``'s: "greater" is H1 a > b). ``ci95`` and ``p`` are None for fewer
    than 2 pairs."""
    from scipy import stats as st

    diffs = [x - y for x, y in zip(xa, xb, strict=True)]
    if not diffs:
        return 0, None, None, None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return 1, mean, None, None
    sem = st.sem(diffs)
    if sem == 0:  # identical differences: the interval is the point
        favoured = mean > 0 if alternative == "greater" else mean < 0
        p = 0.0 if mean != 0 and (alternative == "two-sided" or favoured) else 1.0
        return len(diffs), mean, (mean, mean), p
    ci = tuple(float(x) for x in st.t.interval(0.95, len(diffs) - 1, loc=mean, scale=sem))
    p = float(st.ttest_rel(xa, xb, alternative=alternative).pvalue)
    return len(diffs), mean, ci, p


def _by_seed(row, i):
    """{seed: value} of ``row``'s column ``i`` and the seeds it cannot pair: no seed recorded
    (None) or one seed held by several trials (which of them pairs would be arbitrary)."""
    counts = {}
    for seed in row.seeds:
        counts[seed] = counts.get(seed, 0) + 1
    values = {s: v for s, v in zip(row.seeds, row.values[i]) if s is not None and counts[s] == 1}
    bad = [s for s in counts if s is None or counts[s] > 1]
    return values, bad


def paired(table, a, b, column=None):
    """:class:`Paired` difference of rows ``a`` and ``b`` on ``column`` (default: the task's,
    ``TASKS[task].paired``: AP50, AP^bb_50, AP^kp_50, AP^mk_50, mIoU), over the trials whose seeds
    both rows have; the others are named in ``unpaired``. Statistics from scipy (t distribution)."""
    column = column or TASKS[table.task].paired
    i = table.columns.index(column)
    rows = _two_rows(table, a, b, "paired")
    (va, bad_a), (vb, bad_b) = (_by_seed(row, i) for row in rows)
    common = [s for s in va if s in vb]
    if not common:
        seeds = "; ".join(f"{r.label}: {', '.join(map(str, r.seeds))}" for r in rows)
        raise ValueError(
            f"paired: rows {a!r} and {b!r} share no detection seed ({seeds}); run the same trials"
        )
    unpaired = {
        label: [s for s in seeds if s not in common]
        for label, seeds in ((a, list(va) + bad_a), (b, list(vb) + bad_b))
    }
    n, mean, ci, p = paired_difference([va[s] for s in common], [vb[s] for s in common])
    return Paired(a, b, column, n, mean, ci, p, {k: v for k, v in unpaired.items() if v})


def comparisons(table, pairs, column=None):
    """Row ``a`` against row ``b`` for each of ``pairs``: ({"a_vs_b": :meth:`Paired.to_dict`},
    one line each). With 2 or more pairs of trials the paired difference (:func:`paired`), else
    :func:`compare`'s line; rows that share no seed get a line that says so. The pipeline's
    report and ``tools/report.py`` both print these lines."""
    results, lines = {}, []
    for a, b in pairs:
        try:
            result = paired(table, a, b, column)
        except ValueError as e:
            lines.append(f"{a} vs {b}: not paired, {str(e).removeprefix('paired: ')}")
            continue
        if result.n_pairs >= 2:
            results[f"{a}_vs_{b}"] = result.to_dict()
            lines.append(result.line())
        else:
            lines.append(compare(table, a, b))
    return results, lines


def compare(table, a, b, column=None):
    """One line: does row ``a`` beat row ``b`` on ``column`` (default: the task's primary score,
    ``TASKS[task].compare``: AP, AP^bb, AP^kp, AP^mk, mIoU)?

    With at least 2 runs in both rows, a difference counts only beyond twice its standard error;
    with one run per row there is no spread estimate and the line says so.
    """
    column = column or TASKS[table.task].compare
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

"""Variants of the detection fine-tune over shared pretraining (issue 24: does normalization, a
longer schedule or other labels change MoCo - supervised?).

A transfer preset (``configs/pipeline/transfer_*.yaml``) is a pipeline preset (every key of
:func:`experiments.pipeline.get_pipeline_cfg`; ``_BASE_: embedded_cpu.yaml`` makes its data and
pretraining the demo's) plus ``VARIANTS``: each a named detection fine-tune, ``[name, CONFIG,
KEY, VALUE, ...]`` with CONFIG a detection config file (``""``: ``DETECTION.CONFIG``) and the
overrides applied after ``DETECTION.OPTS``. Every variant fine-tunes every init (the methods,
supervised, random) in ``DETECTION.TRIALS`` paired trials: trial i has detection seed
``DETECTION.SEED + i`` in every init and every variant.

The stages are the pipeline's own (data, pretraining, conversion, detection; same names, same
keys), in the same ``RUN_DIR``: a preset on the demo's ``RUN_DIR`` reuses the demo's finished
pretrainings, and a variant that is the demo's fine-tune (no config, no overrides) reuses its
trials. Each finished pretraining's fine-tunes join the lanes' queue at once
(:meth:`experiments.runs.Stages.run_many` with ``then``).

The report, in ``RUN_DIR/REPORT_DIR``: per variant ``<variant>/transfer.{md,csv,png,pdf}`` (the
pipeline's report: the rows, each method minus supervised and minus random as AP50 differences
paired by detection seed with a 95% CI and a one-sided p); across variants
``transfer_summary.{md,csv,json}``, one line per variant, and with ``PLOT.X`` (a number per
variant, e.g. the schedule length) ``transfer_plot.{png,pdf}``: each method minus supervised
against it, with the 95% CI as error bars.
"""

import json
import os
import time

from fvcore.common.config import CfgNode as CN

from experiments.pipeline import (
    BASELINES,
    _convert_stage,
    _data_stage,
    _detect_stage,
    _pretrain_stage,
    _trial_run,
    data_identity,
    diverged_lines,
    ensure_data,
    get_pipeline_cfg,
    resolve_preset,
)
from experiments.runs import REPO_ROOT, Stages, resolve_jobs, stage_key
from moco.utils.config_loading import load_config
from moco.utils.file_io import atomic_write_files, check_output_dir

SUMMARY = "transfer_summary"
PLOT = "transfer_plot"


def get_transfer_cfg():
    """The pipeline's defaults plus the variant sweep's keys."""
    c = get_pipeline_cfg()
    c.VARIANTS = []  # [[name, CONFIG ("" = DETECTION.CONFIG), KEY, VALUE, ...], ...]
    c.REPORT_DIR = "transfer"  # under RUN_DIR
    c.PLOT = CN()
    c.PLOT.X = []  # a number per variant, in VARIANTS' order (empty: no plot)
    c.PLOT.XLABEL = ""
    return c


def load_transfer_cfg(preset, opts=()):
    """The config of ``preset`` (a path, or a file name under configs/pipeline/) and ``opts``."""
    preset = resolve_preset(preset, listed="transfer")
    cfg = load_config(
        get_transfer_cfg, preset, list(opts), what="--preset", keys="experiments/transfer.py"
    )
    if cfg.DETECTION.TRIALS < 1:
        raise ValueError(f"DETECTION.TRIALS must be >= 1, got {cfg.DETECTION.TRIALS}")
    resolve_jobs(cfg.JOBS)
    if "cmc" in cfg.METHODS:  # its detector is another config (the Lab backbone)
        raise ValueError("METHODS: cmc fine-tunes CMC.DETECTION_CONFIG, not the variants'")
    if not cfg.METHODS or cfg.INITS:  # the sweep compares pretrained methods with the baselines
        raise ValueError(
            "METHODS must name a pretraining (moco, cpc) and INITS stay empty; "
            "one's own checkpoints go through tools/pipeline.py's INITS"
        )
    variants = variant_table(cfg)
    if cfg.PLOT.X and len(cfg.PLOT.X) != len(variants):
        raise ValueError(
            f"PLOT.X {list(cfg.PLOT.X)}: expected one number per variant ({', '.join(variants)})"
        )
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cfg.PLOT.X):
        raise ValueError(f"PLOT.X {list(cfg.PLOT.X)}: expected numbers")
    cfg.freeze()
    return cfg


def variant_table(cfg):
    """{name: (config file, [KEY, VALUE, ...])} of VARIANTS, in order; one line for a bad entry."""
    table = {}
    for v in cfg.VARIANTS:
        if not isinstance(v, (list, tuple)) or len(v) < 2 or not all(isinstance(x, str) for x in v):
            raise ValueError(
                f'VARIANTS: each entry is [name, CONFIG, KEY, VALUE, ...] (strings; CONFIG "" '
                f"= DETECTION.CONFIG), got {v!r}"
            )
        name, config, opts = v[0], v[1] or cfg.DETECTION.CONFIG, list(v[2:])
        if not name or os.sep in name or name in table:
            raise ValueError(f"VARIANTS: {name!r} is empty, holds a '/' or is named twice")
        if len(opts) % 2:
            raise ValueError(f"VARIANTS {name!r}: overrides must be KEY VALUE pairs, got {opts}")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"VARIANTS {name!r}: detection config {config} does not exist")
        table[name] = (config, opts)
    if not table:
        raise ValueError("VARIANTS is empty: name at least one detection fine-tune")
    return table


def _variant_cfg(cfg, config, opts):
    """``cfg`` with the variant's detection config and overrides (the pipeline's stages read them
    there)."""
    vcfg = cfg.clone()
    vcfg.defrost()
    vcfg.DETECTION.CONFIG = config
    vcfg.DETECTION.OPTS = list(cfg.DETECTION.OPTS) + list(opts)
    vcfg.freeze()
    return vcfg


def run_transfer(cfg):
    """Run every stage of the transfer preset ``cfg`` and write its reports; returns the
    summary (also ``transfer_summary.json``)."""
    run_dir = os.path.abspath(cfg.RUN_DIR)
    check_output_dir(run_dir, "RUN_DIR")
    os.makedirs(run_dir, exist_ok=True)
    variants = variant_table(cfg)
    vcfgs = {name: _variant_cfg(cfg, *spec) for name, spec in variants.items()}
    methods = list(cfg.METHODS)
    trials = list(range(cfg.DETECTION.SEED, cfg.DETECTION.SEED + cfg.DETECTION.TRIALS))
    train_supervised = not cfg.SUPERVISED.WEIGHTS
    pretrainings = methods + ["supervised"] * int(train_supervised)
    inits = methods + list(BASELINES)
    converts = len(methods) + 1
    total = 1 + len(pretrainings) + converts + len(variants) * len(inits) * len(trials) + 1
    stages = Stages(run_dir, total)
    start = time.perf_counter()

    data = stages.run("data", dict(cfg.DATA), lambda out, resume: _data_stage(cfg))
    folder, synthetic_root = data["image_folder"], data["synthetic_root"]
    if synthetic_root:  # a reused data stage: the set may have been regenerated in place
        ensure_data(cfg, synthetic_root)
    sup_ckpt = None if train_supervised else os.path.abspath(cfg.SUPERVISED.WEIGHTS)
    if sup_ckpt and not os.path.isfile(sup_ckpt):
        raise FileNotFoundError(f"SUPERVISED.WEIGHTS {sup_ckpt}: no such file")
    data = {"pretraining": data_identity(cfg, folder), "detection": {}}

    trial_of = {}  # stage key -> (variant, init, seed)
    weights = {"random": ""}

    def detect(init, seed):
        """The init's trial ``seed`` in every variant; two variants that are the same
        fine-tune would share (and race for) one folder: refused."""
        out = []
        for name, vcfg in vcfgs.items():
            stage = _detect_stage(vcfg, init, weights[init], seed, synthetic_root, data)
            key = stage_key(stage[1], stages.root)
            if key in trial_of:
                raise ValueError(
                    f"VARIANTS {trial_of[key][0]!r} and {name!r} are the same fine-tune "
                    "(the same config file and overrides); remove one"
                )
            trial_of[key] = (name, init, seed)
            out.append(stage)  # a diverged fine-tune is recorded as such (_detect_work)
        return out

    def trials_of(init, checkpoint):
        weights[init] = stages.run(*_convert_stage(init, checkpoint))["weights"]
        return [s for seed in trials for s in detect(init, seed)]

    first = [_pretrain_stage(cfg, folder, m, data["pretraining"]) for m in pretrainings]
    first += [s for seed in trials for s in detect("random", seed)]
    later = [] if train_supervised else trials_of("supervised", sup_ckpt)

    def then(i, outputs):
        return trials_of(pretrainings[i], outputs["checkpoint"]) if i < len(pretrainings) else []

    stages.run_many(first + later, resolve_jobs(cfg.JOBS), then=then)

    runs = {name: {init: [None] * len(trials) for init in inits} for name in variants}
    for record in stages.records:
        if record["key"] in trial_of and record["name"].startswith("detect_"):
            name, init, seed = trial_of[record["key"]]
            outputs = record["outputs"]
            runs[name][init][trials.index(seed)] = (
                {"seed": seed, "diverged": outputs["diverged"]}
                if "diverged" in outputs
                else _trial_run(record["folder"], outputs, seed, weights[init])
            )
    stages.done += 1
    summary = write_transfer_report(cfg, runs, run_dir)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    path = os.path.join(run_dir, cfg.REPORT_DIR, SUMMARY + ".json")
    atomic_write_files({path: (json.dumps(summary, indent=2) + "\n").encode()})
    print(f"[{stages.done}/{total}] report")
    print(summary["markdown"], end="")
    print(f"transfer sweep finished in {summary['seconds']:.0f} s; reports in {summary['dir']}")
    return summary


def _ap(mean, diverged):
    """A row's AP50 cell: the mean over its trained trials, and how many diverged."""
    cell = "-" if mean is None else f"{mean:.1f}"
    return cell + (f" ({len(diverged)} diverged)" if diverged else "")


def _ci(result):
    """``+d [lo, hi]`` of a paired result (``to_dict``), or its mean alone without an interval."""
    if result is None:
        return "- (a row diverged in every trial)"
    if result["ci95"] is None:
        return f"{result['mean_diff']:+.2f} (n = {result['n_pairs']}, no interval)"
    lo, hi = result["ci95"]
    return f"{result['mean_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def write_transfer_report(cfg, runs, run_dir):
    """Each variant's report (``REPORT_DIR/<variant>/transfer.*``), then the summary across
    variants (``transfer_summary.{md,csv}``, ``transfer_plot.{png,pdf}`` with PLOT.X) written as
    one set; returns the summary's content (the caller writes its JSON)."""
    from experiments.report import csv_text, markdown_table, paired, summarize, write_report
    from experiments.report.figures import figure_bytes, pdf_path

    report_dir = os.path.join(run_dir, cfg.REPORT_DIR)
    methods = list(cfg.METHODS)
    variants = variant_table(cfg)
    rows, records, points = [], [], {m: [] for m in methods}
    for k, (name, by_init) in enumerate(runs.items()):
        # diverged trials: named in the notes, left out of the rows (and so of the pairs)
        diverged = {i: [t for t in ts if isinstance(t, dict)] for i, ts in by_init.items()}
        notes = diverged_lines(
            {i: {t["seed"]: t["diverged"] for t in ts} for i, ts in diverged.items()}
        )
        groups = {i: [t for t in ts if isinstance(t, str)] for i, ts in by_init.items()}
        groups = {i: ts for i, ts in groups.items() if ts}
        means, comparisons, paths = {i: None for i in by_init}, {}, {"md": None}
        if groups:
            table = summarize(groups, baseline="supervised" if "supervised" in groups else None)
            column = table.columns.index("AP50")
            means.update({r.label: r.stats[column].mean for r in table.rows})
            for m in methods:
                for o in BASELINES:
                    result = paired(table, m, o) if {m, o} <= set(groups) else None
                    comparisons[f"{m}_vs_{o}"] = result.to_dict() if result else None
                    notes += [result.line()] if result else []
            paths = write_report(
                table,
                os.path.join(report_dir, name),
                title=f"Detection transfer, variant {name}",
                notes=notes,
                base=run_dir,
            )
        comparisons = {
            f"{m}_vs_{o}": comparisons.get(f"{m}_vs_{o}") for m in methods for o in BASELINES
        }
        config, opts = variants[name]
        shown = os.path.relpath(os.path.abspath(config), REPO_ROOT)
        rows.append(
            [
                name,
                shown,
                " ".join(opts) or "none",
                *(_ap(means[i], diverged[i]) for i in (*methods, *BASELINES)),
                *(_ci(comparisons[f"{m}_vs_{o}"]) for m in methods for o in BASELINES),
            ]
        )
        records.append(
            {
                "variant": name,
                "config": shown,
                "opts": opts,
                "ap50": means,
                "comparisons": comparisons,
                "diverged": {i: [t["seed"] for t in ts] for i, ts in diverged.items() if ts},
                "report": paths["md"],
            }
        )
        for m in methods:
            if cfg.PLOT.X and comparisons[f"{m}_vs_supervised"]:
                points[m].append((cfg.PLOT.X[k], comparisons[f"{m}_vs_supervised"]))
    header = [
        "variant",
        "config",
        "overrides",
        *(f"{i} AP50" for i in (*methods, *BASELINES)),
        *(f"{m} - {o} (95% CI)" for m in methods for o in BASELINES),
    ]
    trials = cfg.DETECTION.TRIALS
    text = (
        f"# Detection transfer over fine-tune variants ({cfg.REPORT_DIR})\n\n"
        + markdown_table(header, rows)
        + f"\nAP50 means over {trials} trials (a diverged trial is left out, and so is its "
        "pair); differences paired by detection seed, 95% t intervals (scipy). Each variant's "
        "full report: <variant>/transfer.md.\n"
    )
    contents = {
        os.path.join(report_dir, SUMMARY + ".md"): text.encode(),
        os.path.join(report_dir, SUMMARY + ".csv"): csv_text(header, rows).encode(),
    }
    if cfg.PLOT.X:
        png = os.path.join(report_dir, PLOT + ".png")
        figure = figure_bytes(plot_differences, points, xlabel=cfg.PLOT.XLABEL)
        contents[png], contents[pdf_path(png)] = figure["png"], figure["pdf"]
    atomic_write_files(contents)
    return {"dir": report_dir, "variants": records, "markdown": text, "files": sorted(contents)}


def plot_differences(points, path, xlabel=""):
    """Each method's paired AP50 difference to supervised ({method: [(x, paired dict)]}) against
    x, the 95% CI as error bars, a line at 0."""
    from experiments.report.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for method, series in points.items():
        xs = [x for x, _ in series]
        ys = [r["mean_diff"] for _, r in series]
        err = [
            [r["mean_diff"] - r["ci95"][0] if r["ci95"] else 0 for _, r in series],
            [r["ci95"][1] - r["mean_diff"] if r["ci95"] else 0 for _, r in series],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=f"{method} - supervised")
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(sorted({x for s in points.values() for x, _ in s}))
    ax.set_xlabel(xlabel or "variant")
    ax.set_ylabel("AP50 difference (points)")
    ax.set_title("paired by detection seed; error bars: 95% CI", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)

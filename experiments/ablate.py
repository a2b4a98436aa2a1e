"""Ablations of the MoCo paper (Sec. 4.1): sweep one setting, pretrain + evaluate per value and seed.

A sweep is a pretraining config (``PRETRAIN_CONFIG`` + ``OPTS``), one ``SETTING`` swept over
``VALUES``, optionally one line per mechanism (``SERIES``: the paper's Fig. 3 compares moco,
end_to_end and memory_bank over K), and ``SEEDS``. Each (series, value, seed) run pretrains in its
own folder ``OUTPUT_DIR/<mechanism>/<setting>=<value>/seed<seed>`` with the engine (resumed from its
last checkpoint if interrupted, skipped when its ``pretrain_summary.json`` says it finished) and is
scored by the kNN monitor's last top-1 (and, with ``LINEAR.EPOCHS`` > 0, linear classification on
the frozen encoder, moco.evaluation.lincls).

Settings: ``m`` (MODEL.M), ``K``, ``T`` (MODEL.T), ``mechanism`` (MODEL.MECHANISM). K is the
dictionary size, so for ``end_to_end`` it is the global batch (SOLVER.IMS_PER_BATCH = K with the
learning rate scaled linearly from the config's batch); for moco the queue, for memory_bank the
negatives drawn per step.

A run *fails* (the paper's "fail" for m = 0) when training raises (e.g. a NaN/inf loss), a logged
loss is not finite, the loss does not decrease (mean of the last quarter of the logged iterations
not at least ``FAIL.MIN_LOSS_DROP`` (relative) below the second quarter's, the first quarter being
the warm-up while a queue fills), or the final kNN top-1 is within ``FAIL.CHANCE_MARGIN`` points of
chance. Failed runs are labeled, not raised; the table gives mean ± std over the seeds that did
not fail, "fail" when all failed.

Outputs in OUTPUT_DIR: ``ablation.md``, ``ablation.csv``, ``ablation.json`` and ``ablation.png``.
"""

import json
import logging
import math
import os
import statistics
import time
import traceback

from fvcore.common.config import CfgNode as CN

from experiments import report
from experiments.report import Stat
from experiments.runs import check_same_config, fresh_loggers, read_marker
from moco.config import load_cfg
from moco.engine.launch import launch_training
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.modeling.build import mechanism_names
from moco.utils import file_io
from moco.utils.config_loading import load_config, merge_opts
from moco.utils.launch import LaunchSpec
from moco.utils.run_files import PRETRAIN_SUMMARY, read_metrics

logger = logging.getLogger(__name__)

SETTINGS = {"m": "MODEL.M", "K": "MODEL.K", "T": "MODEL.T", "mechanism": "MODEL.MECHANISM"}
_PARSE = {"m": float, "K": int, "T": float, "mechanism": str}
REPORT_NAME = "ablation"


def get_ablation_cfg():
    """Defaults of an ablation sweep (presets: configs/ablation/*.yaml)."""
    c = CN()
    c.PRETRAIN_CONFIG = "configs/pretrain/moco_v2_R18_cpu.yaml"
    c.OPTS = []  # KEY VALUE overrides of every run's pretraining config
    c.SETTING = "m"  # one of SETTINGS
    c.VALUES = []
    c.SERIES = []  # mechanisms, one line each; [] = the pretraining config's mechanism
    c.SEEDS = [0, 1, 2]
    c.NUM_PROCESSES = 1  # per run (Detectron2 launch; CPU processes without CUDA)
    c.LINEAR = CN()
    c.LINEAR.EPOCHS = 0  # 0: kNN only
    c.LINEAR.LR = 30.0
    c.LINEAR.BATCH_SIZE = 256
    c.LINEAR.SCHEDULE = []  # epochs where lr x0.1; [] = 60% and 80% of EPOCHS
    c.FAIL = CN()
    c.FAIL.MIN_LOSS_DROP = 0.01
    c.FAIL.CHANCE_MARGIN = 1.0  # kNN top-1 points above chance
    c.OUTPUT_DIR = "./output/ablation"
    return c


def load_ablation_cfg(preset=None, opts=None):
    return load_config(get_ablation_cfg, preset, opts)


# ------------------------------------------------------------------------------------------------
# runs


def parse_values(setting, values):
    if setting not in SETTINGS:
        raise ValueError(
            f"unknown ablation setting {setting!r}; choose one of: {', '.join(SETTINGS)}"
        )
    if not values:
        raise ValueError(f"no values to sweep for {setting} (VALUES / --values)")
    try:
        parsed = [_PARSE[setting](v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"values of {setting} must be {_PARSE[setting].__name__}s, got {list(values)}"
        ) from None
    if setting == "K" and any(float(v) != int(float(v)) for v in values):
        raise ValueError(f"values of K must be integers, got {list(values)}")
    return parsed


def run_name(setting, value):
    return f"{setting}={value:g}" if isinstance(value, float) else f"{setting}={value}"


def run_overrides(base, setting, value, mechanism):
    """KEY VALUE overrides of one run on top of ``base`` (the sweep's pretraining config)."""
    opts = []
    if mechanism:
        opts += ["MODEL.MECHANISM", mechanism]
    mech = mechanism or (value if setting == "mechanism" else base.MODEL.MECHANISM)
    if setting == "K" and mech == "end_to_end":  # the dictionary is the batch
        lr = base.SOLVER.BASE_LR * value / base.SOLVER.IMS_PER_BATCH  # linear scaling
        opts += ["SOLVER.IMS_PER_BATCH", value, "SOLVER.BASE_LR", lr]
    else:
        opts += [SETTINGS[setting], value]
    return opts


def plan_runs(acfg, world_size=None):
    """Every run of the sweep: dicts with series, value, seed, dir and its frozen pretrain cfg.

    Raises a one-line ValueError for a value that cannot train, before any run starts.
    """
    setting = acfg.SETTING
    values = parse_values(setting, list(acfg.VALUES))
    series = list(acfg.SERIES) or [None]
    for s in series:
        if s is not None and s not in mechanism_names():
            raise ValueError(
                f"SERIES (--series) names mechanisms ({', '.join(mechanism_names())}), got {s!r}"
            )
    if setting == "mechanism" and series != [None]:
        raise ValueError("SETTING mechanism sweeps the mechanisms itself; leave SERIES empty")
    if not acfg.SEEDS:
        raise ValueError("SEEDS (--seeds) is empty: give at least one seed")
    base = load_cfg(acfg.PRETRAIN_CONFIG, list(acfg.OPTS))
    world = world_size or acfg.NUM_PROCESSES
    runs = []
    for mech in series:
        for value in values:
            for seed in acfg.SEEDS:
                cfg = base.clone()
                try:
                    merge_opts(cfg, [str(x) for x in run_overrides(base, setting, value, mech)])
                    label = cfg.MODEL.MECHANISM  # the line of the run in the table and plot
                    out = os.path.join(
                        acfg.OUTPUT_DIR, label, run_name(setting, value), f"seed{seed}"
                    )
                    cfg.SEED, cfg.OUTPUT_DIR = int(seed), out
                    validate_cfg(cfg, world)
                except ValueError as e:
                    raise ValueError(
                        f"ablation run {mech or base.MODEL.MECHANISM} "
                        f"{run_name(setting, value)}: {e}"
                    ) from None
                cfg.freeze()
                check_same_config(cfg, out)
                runs.append(
                    {"series": label, "value": value, "seed": int(seed), "dir": out, "cfg": cfg}
                )
    return runs


def detect_failure(losses, knn_top1=None, chance=None, min_loss_drop=0.01, chance_margin=1.0):
    """The reason a run failed (a short string), or None. ``losses``: logged training losses."""
    if any(not math.isfinite(v) for v in losses):
        return "loss not finite"
    if len(losses) >= 8:
        q = len(losses) // 4
        second, last = statistics.fmean(losses[q : 2 * q]), statistics.fmean(losses[-q:])
        if last > second * (1.0 - min_loss_drop):
            return f"loss not decreasing ({second:.3f} -> {last:.3f})"
    if knn_top1 is not None and chance is not None and knn_top1 <= chance + chance_margin:
        return f"accuracy at chance (kNN top-1 {knn_top1:.1f}%, chance {chance:.1f}%)"
    if knn_top1 is not None and not math.isfinite(knn_top1):
        return "kNN accuracy not finite"
    return None


def finished_summary(run):
    """The run's pretrain_summary.json if it finished the configured schedule, else None."""
    summary = read_marker(os.path.join(run["dir"], PRETRAIN_SUMMARY))
    if summary is None:
        return None
    cfg = run["cfg"]
    if (
        summary.get("epochs") != cfg.SOLVER.EPOCHS
        or summary.get("mechanism") != cfg.MODEL.MECHANISM
    ):
        return None
    return summary


def _linear_eval(run, acfg, checkpoint):
    from moco.data.datasets import knn_data
    from moco.evaluation.lincls import RESULTS_FILE, LinclsOptions, run_lincls

    cfg, out = run["cfg"], os.path.join(run["dir"], "lincls")
    results_path = os.path.join(out, RESULTS_FILE)
    if os.path.isfile(results_path):
        with open(results_path) as f:
            done = json.load(f)
        if len(done.get("history", [])) >= acfg.LINEAR.EPOCHS:
            return done["top1"]
    epochs = acfg.LINEAR.EPOCHS
    schedule = list(acfg.LINEAR.SCHEDULE) or [int(epochs * 0.6), int(epochs * 0.8)]
    opts = LinclsOptions(
        data=knn_data(cfg) or cfg.DATA.ROOT,
        arch=cfg.MODEL.ARCH,
        workers=cfg.DATALOADER.NUM_WORKERS,
        epochs=epochs,
        batch_size=acfg.LINEAR.BATCH_SIZE,
        lr=acfg.LINEAR.LR,
        schedule=schedule,
        pretrained=checkpoint,
        seed=run["seed"],
        crop_size=cfg.INPUT.CROP_SIZE,
        output_dir=out,
        device=cfg.MODEL.DEVICE,
        print_freq=0,
    )
    return run_lincls(opts)["top1"]


def execute_run(run, acfg, spec):
    """Pretrain (unless finished) and score one run; returns its record (status ok / fail)."""
    record = {k: run[k] for k in ("series", "value", "seed", "dir")}
    start = time.perf_counter()
    summary = finished_summary(run)
    record["reused"] = summary is not None
    error = None
    if summary is None:
        try:
            with fresh_loggers():
                launch_training(PretrainTrainer, run["cfg"], spec, resume="auto")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a diverging run is a result of the sweep, not a crash
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            error = f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
            logger.warning("run %s failed:\n%s", run["dir"], traceback.format_exc())
        summary = None if error else finished_summary(run)
        if summary is None and error is None:
            error = f"no {PRETRAIN_SUMMARY} after training"
    losses = [r["total_loss"] for r in read_metrics(run["dir"]) if "total_loss" in r]
    knn = (summary or {}).get("knn") or []
    record.update(
        knn_top1=knn[-1]["top1"] if knn else None,
        knn_chance=(summary or {}).get("knn_chance"),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        iterations=(summary or {}).get("max_iter"),
        lincls_top1=None,
    )
    reason = error or detect_failure(
        losses,
        record["knn_top1"],
        record["knn_chance"],
        acfg.FAIL.MIN_LOSS_DROP,
        acfg.FAIL.CHANCE_MARGIN,
    )
    if reason is None and acfg.LINEAR.EPOCHS > 0:
        with fresh_loggers():
            record["lincls_top1"] = _linear_eval(run, acfg, summary["last_checkpoint"])
    record.update(
        status="fail" if reason else "ok", reason=reason, seconds=time.perf_counter() - start
    )
    return record


# ------------------------------------------------------------------------------------------------
# table and plot


def _mean_std(xs):
    if not xs:
        return None, None
    stat = Stat.of(xs)
    return stat.mean, (stat.std if stat.n > 1 else 0.0)


def aggregate(records, metrics=("knn_top1", "lincls_top1")):
    """One row per (series, value), in sweep order: mean/std of each metric over the ok runs."""
    rows, index = [], {}
    for r in records:
        key = (r["series"], r["value"])
        if key not in index:
            index[key] = len(rows)
            rows.append(
                {"series": r["series"], "value": r["value"], "runs": [], "failed": 0, "reasons": []}
            )
        row = rows[index[key]]
        row["runs"].append(r)
        if r["status"] == "fail":
            row["failed"] += 1
            row["reasons"].append(r["reason"])
    for row in rows:
        ok = [r for r in row["runs"] if r["status"] == "ok"]
        row["seeds"] = len(row["runs"])
        for m in metrics:
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m], row[m + "_std"] = _mean_std(vals)
        del row["runs"]
    return rows


def format_cell(row, metric):
    if row["failed"] == row["seeds"]:
        return "fail"
    mean, std = row[metric], row[metric + "_std"]
    if mean is None:
        return "-"
    cell = f"{mean:.1f} ± {std:.1f}"
    return cell + (f" ({row['failed']}/{row['seeds']} fail)" if row["failed"] else "")


def _columns(rows):
    cols = [("kNN top-1", "knn_top1")]
    if any(r["lincls_top1"] is not None for r in rows):
        cols.append(("linear top-1", "lincls_top1"))
    return cols


def markdown_table(rows, setting):
    cols = _columns(rows)
    head = ["mechanism", setting] + [c[0] for c in cols] + ["seeds"]
    cells = [
        [r["series"], _fmt_value(r["value"])]
        + [format_cell(r, c[1]) for c in cols]
        + [str(r["seeds"])]
        for r in rows
    ]
    return report.markdown_table(head, cells) + "\n"


def csv_table(rows, setting):
    head = [
        "mechanism",
        setting,
        "knn_top1_mean",
        "knn_top1_std",
        "lincls_top1_mean",
        "lincls_top1_std",
        "seeds",
        "failed",
        "label",
    ]
    cells = [
        [
            r["series"],
            r["value"],
            r["knn_top1"],
            r["knn_top1_std"],
            r["lincls_top1"],
            r["lincls_top1_std"],
            r["seeds"],
            r["failed"],
            "fail" if r["failed"] == r["seeds"] else "ok",
        ]
        for r in rows
    ]
    return report.csv_text(head, cells, lineterminator="\n")


def _fmt_value(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot(rows, setting, path, metric="knn_top1", title=None):
    """Accuracy vs the swept value with std error bars, one line per mechanism (paper Fig. 3);
    failed points are drawn as an x at the bottom, labeled "fail"."""
    plt = report.pyplot()
    values = []
    for r in rows:
        if r["value"] not in values:
            values.append(r["value"])
    numeric = setting == "K"  # K on a log axis as Fig. 3; m, T, mechanism as categories
    xpos = {v: (v if numeric else i) for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(6, 4))
    oks = [r[metric] for r in rows if r[metric] is not None]
    floor = (min(oks) - 5.0) if oks else 0.0
    for i, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        mine = [r for r in rows if r["series"] == series]
        y_fail = floor - 1.5 * i  # one height per line, so failed points do not hide each other
        good = [r for r in mine if r[metric] is not None and r["failed"] < r["seeds"]]
        line = ax.errorbar(
            [xpos[r["value"]] for r in good],
            [r[metric] for r in good],
            yerr=[r[metric + "_std"] for r in good],
            marker="o",
            capsize=3,
            label=series,
        )
        for r in mine:
            if r["failed"] == r["seeds"]:
                color = line[0].get_color()
                ax.plot([xpos[r["value"]]], [y_fail], marker="x", markersize=9, color=color)
                ax.annotate(
                    "fail",
                    (xpos[r["value"]], y_fail),
                    textcoords="offset points",
                    xytext=(8, -3),
                    color=color,
                )
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
    else:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([_fmt_value(v) for v in values])
    ax.set_xlabel(
        {
            "m": "momentum m",
            "K": "K (dictionary size)",
            "T": "temperature T",
            "mechanism": "mechanism",
        }[setting]
    )
    ax.set_ylabel({"knn_top1": "kNN top-1 (%)", "lincls_top1": "linear top-1 (%)"}[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    report.save_figure(fig, path)


def write_report(records, acfg, output_dir=None):
    """ablation.{md,csv,json,png} in OUTPUT_DIR; returns the aggregated rows."""
    out = output_dir or acfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    rows = aggregate(records)
    setting = acfg.SETTING
    base = os.path.join(out, REPORT_NAME)
    file_io.atomic_write_text(base + ".md", markdown_table(rows, setting))
    file_io.atomic_write_text(base + ".csv", csv_table(rows, setting))
    file_io.atomic_write_json(
        base + ".json", {"setting": setting, "config": acfg.dump(), "rows": rows, "runs": records}
    )
    metric = "lincls_top1" if any(r["lincls_top1"] is not None for r in rows) else "knn_top1"
    plot(rows, setting, base + ".png", metric=metric, title=f"{setting} sweep")
    return rows


def run_ablation(acfg):
    """Plan, run (or reuse) every run, write the report; returns (rows, records)."""
    spec = LaunchSpec(procs_per_machine=int(acfg.NUM_PROCESSES))
    runs = plan_runs(acfg)
    records = []
    for i, run in enumerate(runs):
        logger.info("ablation run %d/%d: %s", i + 1, len(runs), run["dir"])
        records.append(execute_run(run, acfg, spec))
        rec = records[-1]
        logger.info(
            "  %s%s, kNN top-1 %s%s",
            rec["status"],
            " (reused)" if rec["reused"] else "",
            rec["knn_top1"],
            f": {rec['reason']}" if rec["reason"] else "",
        )
    rows = write_report(records, acfg)
    return rows, records

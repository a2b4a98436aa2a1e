"""Ablations of the MoCo paper (Sec. 4.1, Fig. 3; MoCo v2 Table 1): sweep one setting,
pretrain + evaluate per value and seed, with paired statistics.

A sweep is a pretraining config (``PRETRAIN_CONFIG`` + ``OPTS``), one ``SETTING`` swept over
``VALUES``, optionally one line per mechanism (``SERIES``: the paper's Fig. 3 compares moco,
end_to_end and memory_bank over K), and ``SEEDS``. Settings: ``m`` (MODEL.M), ``K``, ``T``
(MODEL.T), ``mechanism`` (MODEL.MECHANISM) and ``variant``: a named list of config overrides
(``VARIANTS``: ``[name, KEY, VALUE, ...]`` each; the v1 -> v2 ladder), VALUES then naming the
variants run (all, in order, when empty). K is the dictionary size, so for ``end_to_end`` it is
the global batch (SOLVER.IMS_PER_BATCH = K with the learning rate scaled linearly from the
config's batch); for moco the queue, for memory_bank the negatives drawn per step. ``SKIP``
leaves out cells (``series:value`` or ``value``) that cannot run, e.g. end-to-end at a K its
memory cannot hold.

Runs are the run-folder machinery's stages (experiments.runs.Stages): each (series, value, seed)
pretrains in ``OUTPUT_DIR/<mechanism>/<setting>=<value>/seed<seed>-<key>`` (key: a hash of its
pretraining config, so a changed config gets a new folder), is reused when finished, resumes
from its last checkpoint when interrupted, and runs in one of ``JOBS`` lanes (worker processes,
one thread each; 0 = auto, one lane per available core; 1 = in this process). With
``LINEAR.EPOCHS`` > 0 a linear classifier (moco.evaluation.lincls) is trained on each run's frozen
encoder, as a stage that joins the queue when its pretraining finishes.

Every record carries the final kNN top-1 (backbone), the untrained encoder's (KNN.AT_START), the
loss curve's ends and, with a momentum encoder, the key encoder's drift per epoch
(moco.engine.hooks.KeyEncoderDrift).

A run *fails* in the paper's sense, a loss that does not train (the rule, fixed before the
sweeps ran, is in docs/RESULTS.md): training raises (e.g. a NaN/inf loss), a logged loss is not
finite, the loss does not decrease (mean of the last quarter of the logged iterations not at
least ``FAIL.MIN_LOSS_DROP`` (relative) below the second quarter's, the first quarter being the
warm-up while a queue fills), or the final kNN top-1 is within ``FAIL.CHANCE_MARGIN`` points of
chance. The reason is stated in each record. A run whose final kNN is below its untrained kNN is
flagged ``below_untrained`` (the loss trained, the features got worse) but not called failed.

Statistics (scipy): each cell (series, value) gives mean ± sd and a 95% t interval over its ok
runs; each adjacent pair of values within a series (``PAIR_ADJACENT``) and each ``COMPARE`` pair
``[a, b]`` gives a - b paired by seed over the seeds where both runs are ok, with its 95% t
interval and a two-sided paired t-test p.

Outputs in OUTPUT_DIR (or its sub-folder REPORT_DIR): ``ablation.md``, ``ablation.csv``,
``ablation.json`` and ``ablation.png``.
"""

import functools
import logging
import math
import os
import statistics
import traceback

from fvcore.common.config import CfgNode as CN

from experiments import report
from experiments.ablation_transfer import (
    Transfer,
    add_detection_cfg,
    check_cells,
    detection_cells,
)
from experiments.report.paired import paired_difference
from experiments.runs import (
    Stages,
    listing_fingerprint,
    localize,
    read_marker,
    resolve_jobs,
    stage_key,
)
from moco.config import identity_dump, load_cfg
from moco.engine.launch import launch_training
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.modeling.build import mechanism_names
from moco.utils import file_io
from moco.utils.config_loading import load_config, merge_opts
from moco.utils.launch import LaunchSpec
from moco.utils.run_files import PRETRAIN_SUMMARY, STAGE_FILE, read_metrics

logger = logging.getLogger(__name__)

SETTINGS = {
    "m": "MODEL.M",
    "K": "MODEL.K",
    "T": "MODEL.T",
    "mechanism": "MODEL.MECHANISM",
    "variant": None,  # VARIANTS' overrides
}
_PARSE = {"m": float, "K": int, "T": float, "mechanism": str, "variant": str}
REPORT_NAME = "ablation"
METRICS = ("knn_top1", "lincls_top1")


def get_ablation_cfg():
    """Defaults of an ablation sweep (presets: configs/ablation/*.yaml)."""
    c = CN()
    c.PRETRAIN_CONFIG = "configs/pretrain/moco_v2_R18w16_embedded.yaml"
    c.OPTS = []  # KEY VALUE overrides of every run's pretraining config
    c.SETTING = "m"  # one of SETTINGS
    c.VALUES = []
    c.VARIANTS = []  # SETTING variant: [[name, KEY, VALUE, ...], ...]
    c.SERIES = []  # mechanisms, one line each; [] = the pretraining config's mechanism
    c.SKIP = []  # cells not run: "series:value" or "value"
    c.SEEDS = [0, 1, 2]
    # lanes (worker processes, one thread each) running the runs side by side; 0 = auto: one
    # per available core; 1 = one run after the other in this process
    c.JOBS = 0
    c.NUM_PROCESSES = 1  # per run (Detectron2 launch; CPU processes without CUDA)
    c.PAIR_ADJACENT = True  # paired difference of each value and the one before it, per series
    c.COMPARE = []  # more paired differences: [[a, b], ...], cells named "series:value" or "value"
    c.LINEAR = CN()
    c.LINEAR.EPOCHS = 0  # 0: kNN only
    c.LINEAR.LR = 30.0
    c.LINEAR.BATCH_SIZE = 256
    c.LINEAR.SCHEDULE = []  # epochs where lr x0.1; [] = 60% and 80% of EPOCHS
    add_detection_cfg(c)  # DETECTION: fine-tune named cells' checkpoints (off by default)
    c.FAIL = CN()
    c.FAIL.MIN_LOSS_DROP = 0.01
    c.FAIL.CHANCE_MARGIN = 1.0  # kNN top-1 points above chance
    c.OUTPUT_DIR = "./output/ablation"
    # the report's folder under OUTPUT_DIR ("" = OUTPUT_DIR): sweeps sharing an OUTPUT_DIR share
    # the runs they both name (same cell, same config key) and keep their own reports
    c.REPORT_DIR = ""
    return c


def report_dir(acfg):
    """Where the sweep's report goes: OUTPUT_DIR/REPORT_DIR."""
    return os.path.join(acfg.OUTPUT_DIR, acfg.REPORT_DIR) if acfg.REPORT_DIR else acfg.OUTPUT_DIR


def load_ablation_cfg(preset=None, opts=None):
    return load_config(
        get_ablation_cfg, preset, opts, what="--preset", keys="experiments/ablate.py"
    )


def select_values(acfg, values):
    """Run only ``values`` (--values) of the sweep: the COMPARE pairs and DETECTION.CELLS that
    name another value of the preset are left out with them, not reported as unknown cells."""
    acfg.VALUES = list(values)
    given = {str(v) for v in values}

    def kept(name):
        return str(name).rsplit(":", 1)[-1] in given

    acfg.COMPARE = [
        e for e in acfg.COMPARE if not isinstance(e, (list, tuple)) or all(map(kept, e))
    ]
    acfg.DETECTION.CELLS = [c for c in acfg.DETECTION.CELLS if kept(c)]


# ------------------------------------------------------------------------------------------------
# runs


def variant_table(acfg):
    """{name: [KEY, VALUE, ...]} of VARIANTS, in order; one-line errors for a malformed entry."""
    table = {}
    for v in acfg.VARIANTS:
        if not isinstance(v, (list, tuple)) or not v or not isinstance(v[0], str):
            raise ValueError(f"VARIANTS: each entry is [name, KEY, VALUE, ...], got {v!r}")
        name, opts = v[0], [str(x) for x in v[1:]]
        if len(opts) % 2:
            raise ValueError(f"VARIANTS {name!r}: overrides must be KEY VALUE pairs, got {opts}")
        if name in table:
            raise ValueError(f"VARIANTS: {name!r} is named twice")
        table[name] = opts
    return table


def parse_values(setting, values, variants=None):
    if setting not in SETTINGS:
        raise ValueError(
            f"unknown ablation setting {setting!r}; choose one of: {', '.join(SETTINGS)}"
        )
    if setting == "variant":
        if not variants:
            raise ValueError("SETTING variant needs VARIANTS: [[name, KEY, VALUE, ...], ...]")
        values = list(values) or list(variants)
        unknown = [v for v in values if str(v) not in variants]
        if unknown:
            raise ValueError(
                f"VALUES (--values) {unknown} are not VARIANTS; known: {', '.join(variants)}"
            )
        return [str(v) for v in values]
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


def cell_name(series, value):
    """A cell's name in SKIP and COMPARE: ``series:value``."""
    return f"{series}:{_fmt_value(value)}"


def run_overrides(base, setting, value, mechanism, variants=None):
    """KEY VALUE overrides of one run on top of ``base`` (the sweep's pretraining config)."""
    opts = []
    if mechanism:
        opts += ["MODEL.MECHANISM", mechanism]
    mech = mechanism or (value if setting == "mechanism" else base.MODEL.MECHANISM)
    if setting == "variant":
        opts += list(variants[value])
    elif setting == "K" and mech == "end_to_end":  # the dictionary is the batch
        lr = base.SOLVER.BASE_LR * value / base.SOLVER.IMS_PER_BATCH  # linear scaling
        opts += ["SOLVER.IMS_PER_BATCH", value, "SOLVER.BASE_LR", lr]
    else:
        opts += [SETTINGS[setting], value]
    return opts


def _material(cfg, fingerprints):
    """What decides a pretraining run's result: its config, less the folder it is written to,
    and what its image folders hold (a set regenerated under the same path is another set).
    ``fingerprints`` caches each folder's listing for one plan."""
    from moco.data.datasets import resolve_data_path

    folders = {}
    for key in ("DATA.ROOT", "KNN.DATA"):
        value = cfg.DATA.ROOT if key == "DATA.ROOT" else cfg.KNN.DATA
        folder = resolve_data_path(value) if value and value != "auto" else None
        if folder and os.path.isdir(folder):
            if folder not in fingerprints:
                fingerprints[folder] = listing_fingerprint(folder)
            folders[key] = fingerprints[folder]
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    return {"pretrain": identity_dump(cfg), "data": folders}


def plan_runs(acfg, world_size=None):
    """Every run of the sweep: dicts with series, value, seed, name (its stage name under
    OUTPUT_DIR), material (its stage key's), dir and its frozen pretrain cfg.

    Raises a one-line ValueError for a value that cannot train, before any run starts.
    """
    setting = acfg.SETTING
    variants = variant_table(acfg) if setting == "variant" else None
    values = parse_values(setting, list(acfg.VALUES), variants)
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
    skip = {str(x) for x in acfg.SKIP}
    runs, fingerprints = [], {}
    # seed-major: every cell has its first seeds before any has its last, so the lanes' queue
    # order makes a sweep stopped early (or still running) comparable across all values
    for mech, seed, value in [(m, s, v) for s in acfg.SEEDS for m in series for v in values]:
        cfg = base.clone()
        try:
            overrides = run_overrides(base, setting, value, mech, variants)
            merge_opts(cfg, [str(x) for x in overrides])
            label = cfg.MODEL.MECHANISM  # the line of the run in the table and plot
            if cell_name(label, value) in skip or _fmt_value(value) in skip:
                continue
            name = os.path.join(label, run_name(setting, value), f"seed{seed}")
            cfg.SEED = int(seed)
            validate_cfg(cfg, world)
        except ValueError as e:
            raise ValueError(
                f"ablation run {mech or base.MODEL.MECHANISM} {run_name(setting, value)}: {e}"
            ) from None
        material = _material(cfg, fingerprints)
        key = stage_key(material)
        cfg.OUTPUT_DIR = os.path.join(acfg.OUTPUT_DIR, f"{name}-{key}")
        cfg.freeze()
        runs.append(
            {
                "series": label,
                "value": value,
                "seed": int(seed),
                "name": name,
                "material": material,
                "dir": cfg.OUTPUT_DIR,
                "cfg": cfg,
            }
        )
    if not runs:
        raise ValueError("SKIP leaves no run of the sweep")
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


def pretrain_run(cfg, num_processes, out, resume):
    """Stage function: pretrain one run in ``out`` (resumed from its last checkpoint) and return
    what its record needs. An exception in training (e.g. a NaN loss) is a result, not a crash:
    it comes back as ``error`` (and the run is tried again by the next call of the sweep)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = out
    cfg.freeze()
    error = None
    try:
        launch_training(
            PretrainTrainer, cfg, LaunchSpec(procs_per_machine=num_processes), resume="auto"
        )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a diverging run is a result of the sweep
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        error = f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
        logger.warning("run %s failed:\n%s", out, traceback.format_exc())
    summary = None if error else read_marker(os.path.join(out, PRETRAIN_SUMMARY))
    if summary is None and error is None:
        error = f"no {PRETRAIN_SUMMARY} after training"
    summary = summary or {}
    rows = read_metrics(out)
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    # The summary has this process's kNN and drift entries only; metrics.json keeps the rows
    # from before a resume (start_iter), written at the step's index: iteration i is i + 1
    # steps done, except KNN.AT_START's and the drift's start, put before the first step (0).
    start = summary.get("start_iter", math.inf)
    before = [r for r in rows if r["iteration"] < start]
    done = {id(r): (r["iteration"] + 1 if r["iteration"] else 0) for r in before}
    knn = {done[id(r)]: r["knn_top1"] for r in before if "knn_top1" in r}
    knn.update({e["iteration"]: e["top1"] for e in summary.get("knn") or []})
    drift = {done[id(r)]: r for r in before if "key_gap_query" in r}
    drift.update({e["iteration"]: e for e in summary.get("key_encoder_drift") or []})
    per_epoch = summary.get("iters_per_epoch") or 1
    return {
        "error": error,
        "losses": losses,
        "knn": [{"epoch": i / per_epoch, "top1": knn[i]} for i in sorted(knn)],
        "knn_top1": knn[max(knn)] if knn else None,
        "knn_untrained": knn.get(0),  # KNN.AT_START's pass
        "knn_chance": summary.get("knn_chance"),
        "iterations": summary.get("max_iter"),
        "train_step_seconds": summary.get("train_step_seconds"),
        "key_encoder_drift": [
            {
                "epoch": i / per_epoch,
                "iteration": i,
                "key_drift_start": drift[i].get("key_drift_start"),
                "key_gap_query": drift[i]["key_gap_query"],
            }
            for i in sorted(drift)
        ],
        "last_checkpoint": summary.get("last_checkpoint"),
    }


def linear_run(cfg, linear, seed, checkpoint, out, resume):
    """Stage function: linear classification on the frozen encoder of ``checkpoint``."""
    from moco.data.datasets import knn_data
    from moco.evaluation.lincls import LinclsOptions, run_lincls

    epochs = int(linear["EPOCHS"])
    schedule = list(linear["SCHEDULE"]) or [int(epochs * 0.6), int(epochs * 0.8)]
    opts = LinclsOptions(
        data=knn_data(cfg) or cfg.DATA.ROOT,
        arch=cfg.MODEL.ARCH,
        workers=cfg.DATALOADER.NUM_WORKERS,
        epochs=epochs,
        batch_size=int(linear["BATCH_SIZE"]),
        lr=float(linear["LR"]),
        schedule=schedule,
        pretrained=checkpoint,
        seed=seed,
        crop_size=cfg.INPUT.CROP_SIZE,
        output_dir=out,
        device=cfg.MODEL.DEVICE,
        print_freq=0,
    )
    return {"lincls_top1": run_lincls(opts)["top1"]}


def make_record(run, outputs, acfg, reused=False, seconds=None):
    """The run's record: values, metrics, untrained kNN, drift, status and the reason of a fail."""
    outputs = outputs or {}
    losses = outputs.get("losses") or []
    record = {k: run[k] for k in ("series", "value", "seed", "dir")}
    record.update(
        reused=reused,
        knn_top1=outputs.get("knn_top1"),
        knn_untrained=outputs.get("knn_untrained"),
        knn_chance=outputs.get("knn_chance"),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        iterations=outputs.get("iterations"),
        key_encoder_drift=outputs.get("key_encoder_drift") or [],
        lincls_top1=None,
        seconds=seconds,
    )
    reason = outputs.get("error") or detect_failure(
        losses,
        record["knn_top1"],
        record["knn_chance"],
        acfg.FAIL.MIN_LOSS_DROP,
        acfg.FAIL.CHANCE_MARGIN,
    )
    knn, untrained = record["knn_top1"], record["knn_untrained"]
    record.update(
        status="fail" if reason else "ok",
        reason=reason,
        knn_gain=(knn - untrained) if knn is not None and untrained is not None else None,
        below_untrained=bool(knn is not None and untrained is not None and knn < untrained),
    )
    return record


def _linear_material(acfg, checkpoint):
    """A linear evaluation's key: the encoder it reads by content (sha256), and its settings."""
    from moco.utils.file_io import file_sha256

    weights = file_sha256(checkpoint) if os.path.isfile(checkpoint) else checkpoint
    return {"checkpoint": weights, "linear": {k: v for k, v in acfg.LINEAR.items()}}


def report_finished(acfg):
    """Write the report of the runs finished so far (of a running or stopped sweep) and run
    nothing; the unfinished ones are listed as not run. Returns (rows, records, not_run)."""
    runs = plan_runs(acfg)
    pair_list(runs, acfg)  # a COMPARE name that is no cell of the sweep still fails
    records, not_run, checkpoints = [], [], {}  # checkpoints: cell -> its DETECTION run's
    for run in runs:
        done = read_marker(os.path.join(run["dir"], STAGE_FILE))
        if done is None:
            not_run.append(run["name"])
            continue
        outputs = localize(done["outputs"])
        records.append(make_record(run, outputs, acfg, True, done.get("seconds")))
        if outputs.get("last_checkpoint") and run["seed"] == int(acfg.DETECTION.PRETRAIN_SEED):
            checkpoints[cell_name(run["series"], run["value"])] = outputs["last_checkpoint"]
        if acfg.LINEAR.EPOCHS > 0 and outputs.get("last_checkpoint"):
            material = _linear_material(acfg, outputs["last_checkpoint"])
            folder = f"{os.path.join(run['name'], 'lincls')}-{stage_key(material)}"
            lin = read_marker(os.path.join(acfg.OUTPUT_DIR, folder, STAGE_FILE))
            if lin is not None:
                records[-1]["lincls_top1"] = lin["outputs"]["lincls_top1"]
    if not records:
        raise ValueError(f"no finished run of this sweep in {acfg.OUTPUT_DIR} yet")
    # a pair whose cell has no finished run yet is left out, as its runs are (listed not run)
    finished = _cell_index(records)
    acfg = acfg.clone()
    acfg.COMPARE = [e for e in acfg.COMPARE if all(_cells_named(finished, str(n)) for n in e)]
    detection = _finished_detection(acfg, checkpoints, not_run)
    rows = write_report(records, acfg, not_run=not_run, detection=detection)
    return rows, records, not_run


def _finished_detection(acfg, checkpoints, not_run):
    """The detection report of the DETECTION.CELLS whose trials have all finished (run nothing);
    ``checkpoints``: cell -> its DETECTION.PRETRAIN_SEED run's checkpoint. The cells not finished
    are added to ``not_run``."""
    cells = detection_cells(acfg)
    if not cells:
        return []
    transfer = Transfer(acfg, Stages(acfg.OUTPUT_DIR, total=0))
    for cell in cells:
        checkpoint = checkpoints.get(cell)
        if not (checkpoint and transfer.finished_stages(cell, checkpoint)):
            not_run.append(f"detection of {cell}")
    return transfer.report()[1]


def run_ablation(acfg, jobs=None):
    """Plan, run (or reuse) every run over ``jobs`` lanes (default JOBS), write the report;
    returns (rows, records)."""
    runs = plan_runs(acfg)
    lanes = resolve_jobs(acfg.JOBS if jobs is None else jobs, "JOBS (--jobs)")
    linear = acfg.LINEAR.EPOCHS > 0
    for run in runs:  # a run that raised is tried again (it resumes from its last checkpoint)
        marker = os.path.join(run["dir"], STAGE_FILE)
        done = read_marker(marker)
        if done is not None and (done.get("outputs") or {}).get("error"):
            os.remove(marker)
    cells = check_cells(acfg, list(dict.fromkeys(cell_name(r["series"], r["value"]) for r in runs)))
    pair_list(runs, acfg)  # a COMPARE name that is no cell: one line now, not after the runs
    pretrain_seed = int(acfg.DETECTION.PRETRAIN_SEED)
    if cells and not any(r["seed"] == pretrain_seed for r in runs):
        raise ValueError(f"DETECTION.PRETRAIN_SEED {pretrain_seed} is not one of SEEDS")
    total = len(runs) * (2 if linear else 1) + len(cells) * (1 + int(acfg.DETECTION.TRIALS))
    stages = Stages(acfg.OUTPUT_DIR, total=total)
    transfer = Transfer(acfg, stages) if cells else None
    procs = int(acfg.NUM_PROCESSES)
    initial = [
        (run["name"], run["material"], functools.partial(pretrain_run, run["cfg"], procs))
        for run in runs
    ]
    kinds = {}  # stage index -> run index, for the linear stages
    added = [len(runs)]  # the index the next added stage gets (run_many numbers them in order)

    def then(i, outputs):
        if i >= len(runs) or outputs.get("error") or not outputs["last_checkpoint"]:
            return []
        run, checkpoint, new = runs[i], outputs["last_checkpoint"], []
        if linear:
            material = _linear_material(acfg, checkpoint)
            kinds[added[0]] = i
            fn = functools.partial(
                linear_run, run["cfg"], dict(acfg.LINEAR), run["seed"], checkpoint
            )
            new.append((os.path.join(run["name"], "lincls"), material, fn))
        cell = cell_name(run["series"], run["value"])
        if transfer and cell in cells and run["seed"] == pretrain_seed:
            new += transfer.stages_of(cell, checkpoint)
        added[0] += len(new)
        return new

    outputs = stages.run_many(initial, jobs=lanes, threads=1 if lanes > 1 else None, then=then)
    by_stage = {r["name"]: r for r in stages.records}
    records = []
    for i, run in enumerate(runs):
        rec = by_stage.get(run["name"], {})
        records.append(
            make_record(run, outputs[i], acfg, bool(rec.get("reused")), rec.get("seconds"))
        )
    for j, i in kinds.items():
        records[i]["lincls_top1"] = outputs[j]["lincls_top1"]
    detection = transfer.report()[1] if transfer else []
    rows = write_report(records, acfg, detection=detection)
    return rows, records


# ------------------------------------------------------------------------------------------------
# table and plot


def cell_stats(xs):
    """(mean, sd, (lo, hi)) of ``xs``: sample sd, 95% t interval (scipy); Nones for none."""
    from scipy import stats as st

    if not xs:
        return None, None, None
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, 0.0, None
    sd = statistics.stdev(xs)
    if sd == 0:
        return mean, 0.0, (mean, mean)
    lo, hi = st.t.interval(0.95, len(xs) - 1, loc=mean, scale=st.sem(xs))
    return mean, sd, (float(lo), float(hi))


def aggregate(records, metrics=METRICS):
    """One row per (series, value), in sweep order: mean / sd / 95% CI of each metric over the
    ok runs, the untrained kNN's mean over all runs, and the counts of fails and collapses."""
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
            row["reasons"].append(f"seed {r['seed']}: {r['reason']}")
    for row in rows:
        ok = [r for r in row["runs"] if r["status"] == "ok"]
        row["seeds"] = len(row["runs"])
        row["below_untrained"] = sum(bool(r.get("below_untrained")) for r in row["runs"])
        for m in metrics:
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m], row[m + "_std"], row[m + "_ci95"] = cell_stats(vals)
        untrained = [r["knn_untrained"] for r in row["runs"] if r.get("knn_untrained") is not None]
        row["knn_untrained"] = statistics.fmean(untrained) if untrained else None
        del row["runs"]
    return rows


def _cell_index(records):
    cells = {}
    for r in records:
        cells.setdefault((r["series"], r["value"]), []).append(r)
    return cells


def _cells_named(cells, name):
    """The cells a COMPARE name can mean: ``series:value``, or ``value`` in any series."""
    return [c for c in cells if name in (cell_name(*c), _fmt_value(c[1]))]


def _find_cell(cells, name):
    """The (series, value) a COMPARE name means: ``series:value``, or ``value`` with one series."""
    matches = _cells_named(cells, name)
    if len(matches) != 1:
        known = ", ".join(cell_name(*c) for c in cells)
        why = "names several cells" if matches else "is no cell of this sweep"
        raise ValueError(f"COMPARE: {name!r} {why}; cells: {known}")
    return matches[0]


def pair_list(records, acfg):
    """The (a, b) cells compared: each value minus the one before it within a series
    (PAIR_ADJACENT), then COMPARE's pairs."""
    cells = _cell_index(records)
    pairs = []
    if acfg.PAIR_ADJACENT:
        for series in dict.fromkeys(c[0] for c in cells):
            mine = [c for c in cells if c[0] == series]
            pairs += [(b, a) for a, b in zip(mine, mine[1:])]
    for entry in acfg.COMPARE:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"COMPARE: each entry is [a, b] (a minus b), got {entry!r}")
        pair = (_find_cell(cells, str(entry[0])), _find_cell(cells, str(entry[1])))
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def paired_rows(records, acfg, metrics=METRICS, any_status=False):
    """Each pair of :func:`pair_list` and metric: a - b paired by seed over the seeds where both
    runs are ok (``any_status``: where both measured it, whatever their status); mean, 95% t
    interval and the two-sided paired t-test's p (scipy)."""
    cells = _cell_index(records)
    out = []

    def values(cell, m):
        return {
            r["seed"]: r[m]
            for r in cells[cell]
            if (any_status or r["status"] == "ok") and r.get(m) is not None
        }

    for a, b in pair_list(records, acfg):
        for m in metrics:
            va, vb = values(a, m), values(b, m)
            if m != "knn_top1" and not (va or vb):
                continue  # a metric not measured in this sweep
            seeds = [s for s in va if s in vb]
            n, mean, ci, p = paired_difference(
                [va[s] for s in seeds], [vb[s] for s in seeds], alternative="two-sided"
            )
            out.append(
                {
                    "a": cell_name(*a),
                    "b": cell_name(*b),
                    "metric": m,
                    "seeds": seeds,
                    "n_pairs": n,
                    "mean_diff": mean,
                    "ci95": list(ci) if ci else None,
                    "p_value": p,
                }
            )
    return out


def format_cell(row, metric):
    if row["failed"] == row["seeds"]:
        return "fail"
    mean, std = row[metric], row[metric + "_std"]
    if mean is None:
        return "-"
    cell = f"{mean:.1f} ± {std:.1f}"
    return cell + (f" ({row['failed']}/{row['seeds']} fail)" if row["failed"] else "")


def format_ci(ci):
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-"


def _columns(rows):
    cols = [("kNN top-1", "knn_top1")]
    if any(r["lincls_top1"] is not None for r in rows):
        cols.append(("linear top-1", "lincls_top1"))
    return cols


def markdown_table(rows, setting):
    cols = _columns(rows)
    head = ["mechanism", setting]
    for name, _ in cols:
        head += [name, "95% CI"]
    head += ["untrained kNN", "seeds", "below untrained"]
    cells = []
    for r in rows:
        line = [r["series"], _fmt_value(r["value"])]
        for _, m in cols:
            line += [format_cell(r, m), format_ci(r[m + "_ci95"])]
        untrained = r["knn_untrained"]
        line += [
            "-" if untrained is None else f"{untrained:.1f}",
            str(r["seeds"]),
            f"{r['below_untrained']}/{r['seeds']}",
        ]
        cells.append(line)
    return report.markdown_table(head, cells) + "\n"


def markdown_pairs(pairs):
    """The paired differences as a Markdown table."""
    names = {"knn_top1": "kNN top-1", "lincls_top1": "linear top-1"}
    cells = []
    for p in pairs:
        diff = "-" if p["mean_diff"] is None else f"{p['mean_diff']:+.1f}"
        ci = f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]" if p["ci95"] else "-"
        pv = "-" if p["p_value"] is None else f"{p['p_value']:.3g}"
        cells.append([f"{p['a']} - {p['b']}", names[p["metric"]], str(p["n_pairs"]), diff, ci, pv])
    head = ["difference (paired by seed)", "metric", "pairs", "mean", "95% CI", "p (two-sided)"]
    return report.markdown_table(head, cells) + "\n"


def csv_table(rows, setting):
    head = [
        "mechanism",
        setting,
        "knn_top1_mean",
        "knn_top1_std",
        "knn_top1_ci95_lo",
        "knn_top1_ci95_hi",
        "knn_untrained_mean",
        "lincls_top1_mean",
        "lincls_top1_std",
        "seeds",
        "failed",
        "below_untrained",
        "label",
    ]
    cells = [
        [
            r["series"],
            r["value"],
            r["knn_top1"],
            r["knn_top1_std"],
            *(r["knn_top1_ci95"] or (None, None)),
            r["knn_untrained"],
            r["lincls_top1"],
            r["lincls_top1_std"],
            r["seeds"],
            r["failed"],
            r["below_untrained"],
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
            "variant": "variant",
        }[setting]
    )
    ax.set_ylabel({"knn_top1": "kNN top-1 (%)", "lincls_top1": "linear top-1 (%)"}[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    report.save_figure(fig, path)


def write_report(records, acfg, output_dir=None, not_run=(), detection=()):
    """ablation.{md,csv,json,png} in OUTPUT_DIR/REPORT_DIR; returns the aggregated rows.
    ``not_run``: names of the sweep's runs not finished (a partial report), listed under the
    tables; ``detection``: the detection report's paired lines (experiments.ablation_transfer)."""
    out = output_dir or report_dir(acfg)
    os.makedirs(out, exist_ok=True)
    rows = aggregate(records)
    pairs = paired_rows(records, acfg)
    # the fail rule reads the loss; where it flags a run its kNN was still measured: the same
    # pairs over every measured run, so a misfiring rule hides no difference (issue 23)
    any_status = paired_rows(records, acfg, any_status=True)
    any_status = any_status if any_status != pairs else []
    setting = acfg.SETTING
    base = os.path.join(out, REPORT_NAME)
    text = markdown_table(rows, setting)
    if pairs:
        text += "\n" + markdown_pairs(pairs)
    if any_status:
        text += "\nThe same pairs over every run that measured it, failed runs included:\n\n"
        text += markdown_pairs(any_status)
    if detection:
        text += "\nDetection transfer (AP50 paired by detection seed; detection/transfer.md):\n\n"
        text += "".join(f"- {line}\n" for line in detection)
    if not_run:
        text += f"\nNot finished, so not in the tables ({len(not_run)} runs): "
        text += ", ".join(not_run) + "\n"
    file_io.atomic_write_text(base + ".md", text)
    file_io.atomic_write_text(base + ".csv", csv_table(rows, setting))
    file_io.atomic_write_json(
        base + ".json",
        {
            "setting": setting,
            "config": acfg.dump(),
            "rows": rows,
            "pairs": pairs,
            "pairs_any_status": any_status,
            "runs": records,
            "not_run": list(not_run),
            "detection": list(detection),
        },
    )
    metric = "lincls_top1" if any(r["lincls_top1"] is not None for r in rows) else "knn_top1"
    plot(rows, setting, base + ".png", metric=metric, title=f"{setting} sweep")
    return rows

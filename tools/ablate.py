#!/usr/bin/env python
"""Ablation sweeps of the MoCo paper: one setting (m, K, T, the mechanism or named variants)
over given values, pretraining + kNN (optionally linear) evaluation per value and seed, over
parallel lanes; table with 95% CIs, paired differences by seed (Markdown, CSV, JSON) and plot in
OUTPUT_DIR. Finished runs are reused, interrupted ones resume.

  # the paper's momentum ablation on the embedded recipe: 5 m x 3 seeds
  python tools/ablate.py --preset configs/ablation/momentum.yaml
  # the mechanisms over K (paper Fig. 3); the MoCo v2 ladder (v2 paper, Table 1)
  python tools/ablate.py --preset configs/ablation/mechanisms_K.yaml
  python tools/ablate.py --preset configs/ablation/v1_to_v2.yaml
  # any sweep: flags override the preset, trailing KEY VALUE override every pretraining run
  python tools/ablate.py --setting T --values 0.07 0.2 0.5 --seeds 0 1 \\
      --config-file configs/pretrain/moco_v2_R18w16_embedded.yaml SOLVER.EPOCHS 6
"""

import argparse
import os
import sys

from moco.utils.cli import run_cli


def build_parser():
    p = argparse.ArgumentParser(
        prog="ablate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", metavar="FILE", help="sweep preset (configs/ablation/*.yaml)")
    p.add_argument("--config-file", metavar="FILE", help="pretraining config of every run")
    p.add_argument("--setting", metavar="NAME", help="the setting swept: m, K, T or mechanism")
    p.add_argument("--values", nargs="+", metavar="V", help="values of the setting")
    p.add_argument(
        "--series",
        nargs="+",
        metavar="MECH",
        help="one line per mechanism (moco end_to_end memory_bank), e.g. over K",
    )
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds of every value")
    p.add_argument(
        "--jobs",
        metavar="N",
        help="runs side by side, one thread each (default auto: one per available core)",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        metavar="N",
        help="processes per run (GPUs; CPU processes without CUDA)",
    )
    p.add_argument(
        "--linear-epochs",
        type=int,
        metavar="N",
        help="also linear classification for N epochs (0: kNN only)",
    )
    p.add_argument(
        "--detection-trials",
        type=int,
        metavar="N",
        help="fine-tune the preset's DETECTION.CELLS in N paired trials each (0: no detection)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="sweep folder (runs, table, plot)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: the report of the runs (and detection trials) finished so far",
    )
    p.add_argument(
        "opts",
        nargs="*",
        metavar="KEY VALUE",
        help="pretraining config overrides of every run, e.g. SOLVER.EPOCHS 10",
    )
    return p


def run(args):
    # after parsing: a fast --help
    from experiments.ablate import (
        load_ablation_cfg,
        report_dir,
        report_finished,
        run_ablation,
        select_values,
    )

    acfg = load_ablation_cfg(args.preset)
    for flag, key in (
        ("config_file", "PRETRAIN_CONFIG"),
        ("setting", "SETTING"),
        ("series", "SERIES"),
        ("seeds", "SEEDS"),
        ("num_gpus", "NUM_PROCESSES"),
        ("output_dir", "OUTPUT_DIR"),
    ):
        value = getattr(args, flag)
        if value is not None:
            acfg[key] = value
    if args.values is not None:
        select_values(acfg, args.values)
    if args.jobs is not None:
        if args.jobs == "auto":
            acfg.JOBS = 0
        elif not args.jobs.isdigit() or int(args.jobs) < 1:
            raise ValueError(f"--jobs must be auto or a number >= 1, got {args.jobs!r}")
        else:
            acfg.JOBS = int(args.jobs)
    if args.linear_epochs is not None:
        acfg.LINEAR.EPOCHS = args.linear_epochs
    if args.detection_trials is not None:
        acfg.DETECTION.TRIALS = args.detection_trials
    if len(args.opts) % 2:
        raise ValueError(f"pretraining overrides must be KEY VALUE pairs, got {args.opts}")
    acfg.OPTS = list(acfg.OPTS) + list(args.opts)
    not_run = []
    if args.report_only:
        rows, records, not_run = report_finished(acfg)
    else:
        rows, records = run_ablation(acfg)
    out = report_dir(acfg)
    with open(os.path.join(out, "ablation.md")) as f:
        print(f.read(), end="")
    failed = sum(r["status"] == "fail" for r in records)
    print(
        f"{len(records)} runs ({failed} fail{f', {len(not_run)} not finished' if not_run else ''});"
        f" table and plot: {os.path.join(out, 'ablation')}.{{md,csv,json,png}}"
    )


def main(argv=None):
    return run_cli("ablate.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

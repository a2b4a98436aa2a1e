"""Detection transfer of an ablation's cells (issue 23: the seed's claim is about transfer, not only
about kNN): the checkpoint of each cell named in ``DETECTION.CELLS`` (its ``DETECTION.PRETRAIN_SEED``
run) is converted and fine-tuned in ``DETECTION.TRIALS`` paired trials (trial i: detection seed
``DETECTION.SEED + i`` for every cell), with the pipeline's own stages (experiments.pipeline's
convert and detect stages, keyed by the weights' sha256 and the resolved detection config), and
reported as the pipeline reports: a table, and each pair of cells' AP50 difference paired by
detection seed with its 95% CI and p.

The stages live in the sweep's OUTPUT_DIR (``convert_<cell>``, ``detect_<cell>_s<seed>``), the
report in ``OUTPUT_DIR/detection/``.
"""

import itertools
import os

from fvcore.common.config import CfgNode as CN

REPORT_DIR = "detection"


def add_detection_cfg(c):
    """The ablation config's DETECTION section (off while CELLS is empty)."""
    c.DETECTION = CN()
    c.DETECTION.CELLS = []  # "series:value" cells whose checkpoints are fine-tuned
    c.DETECTION.PRETRAIN_SEED = 0  # the run (of each cell) whose checkpoint is used
    c.DETECTION.CONFIG = "configs/detection/embedded_voc_R_18w16_FPN_bn_backbone_lr0.02.yaml"
    c.DETECTION.OPTS = []
    c.DETECTION.TRIALS = 5  # 0: CELLS are not fine-tuned (tools/ablate.py --detection-trials)
    c.DETECTION.SEED = 0
    c.DETECTION.NUM_PROCESSES = 1


def init_name(cell):
    """A cell's name as a row and stage name ("moco:4096" -> "moco_4096")."""
    return cell.replace(":", "_")


def detection_cells(acfg):
    """The DETECTION.CELLS that are fine-tuned: none while DETECTION.TRIALS is 0."""
    return [str(c) for c in acfg.DETECTION.CELLS] if acfg.DETECTION.TRIALS else []


def check_cells(acfg, cells):
    """The cells to fine-tune (:func:`detection_cells`); a one-line error for a DETECTION.CELLS
    entry that is no cell of the sweep (checked with TRIALS 0 too) or a negative TRIALS."""
    for cell in map(str, acfg.DETECTION.CELLS):
        if cell not in cells:
            raise ValueError(
                f"DETECTION.CELLS: {cell!r} is not a cell of this sweep ({', '.join(cells)})"
            )
    if acfg.DETECTION.TRIALS < 0:
        raise ValueError(
            f"DETECTION.TRIALS (--detection-trials) must be >= 0 (0: no fine-tunes), "
            f"got {acfg.DETECTION.TRIALS}"
        )
    return detection_cells(acfg)


class Transfer:
    """The detection stages of a sweep, added to its queue as each cell's checkpoint appears."""

    def __init__(self, acfg, stages):
        from detection.data.datasets import register_synthetic

        self.acfg, self.stages = acfg, stages
        # the embedded detection set ($DETECTRON2_DATASETS/moco_det_synthetic) under its usual
        # names, as the fine-tunes see it; its annotation files are the stage keys' data
        register_synthetic(None)
        self.data = {"pretraining": None, "detection": {}}
        self.trials = list(range(acfg.DETECTION.SEED, acfg.DETECTION.SEED + acfg.DETECTION.TRIALS))
        self.weights = {}  # init -> its converted weights

    def stages_of(self, cell, checkpoint):
        """Convert ``cell``'s checkpoint (here: a moment) and return its detection stages."""
        from experiments.pipeline import _convert_stage, _detect_stage

        init = init_name(cell)
        self.weights[init] = self.stages.run(*_convert_stage(init, checkpoint))["weights"]
        return [
            _detect_stage(self.acfg, init, self.weights[init], seed, None, self.data)
            for seed in self.trials
        ]

    def finished_stages(self, cell, checkpoint):
        """Look up (run nothing) ``cell``'s convert and detection stages; True when all its
        trials have finished, so that :meth:`report` includes it."""
        from experiments.pipeline import _convert_stage, _detect_stage

        init = init_name(cell)
        convert = self.stages.finished(*_convert_stage(init, checkpoint)[:2])
        if convert is None:
            return False
        weights = convert["outputs"]["weights"]
        trials = [
            self.stages.finished(
                *_detect_stage(self.acfg, init, weights, seed, None, self.data)[:2]
            )
            for seed in self.trials
        ]
        if any(t is None for t in trials):
            return False
        self.weights[init] = weights
        return True

    def report(self):
        """The detection report (OUTPUT_DIR/REPORT_DIR/detection/transfer.*) of the cells
        fine-tuned, each pair's AP50 paired by detection seed; returns (paths, verdict lines),
        (None, []) when no cell was fine-tuned."""
        from experiments.ablate import report_dir
        from experiments.pipeline import diverged_lines, trial_runs
        from experiments.report import summarize, write_report
        from experiments.report.paired import comparisons

        stage_of = {r["name"]: (r["folder"], r["outputs"]) for r in self.stages.records}
        outcomes = {
            init: trial_runs(stage_of, init, self.trials, weights)
            for init, weights in self.weights.items()
        }
        # a cell whose every trial diverged has no row; its diverged trials are named
        groups = {init: runs for init, (runs, _) in outcomes.items() if runs}
        notes = diverged_lines({init: d for init, (_, d) in outcomes.items()})
        if not groups:
            return None, notes
        table = summarize(groups)
        _, verdicts = comparisons(table, itertools.combinations(groups, 2))
        verdicts = notes + verdicts
        paths = write_report(
            table,
            os.path.join(report_dir(self.acfg), REPORT_DIR),
            title="Detection transfer of the ablation's cells",
            notes=verdicts,
            base=self.acfg.OUTPUT_DIR,
        )
        return paths, verdicts

"""The run folder's contract: the names of the files every run writes into its ``OUTPUT_DIR`` and
the one reader of its metrics.json. Writers (the trainers) and readers (report, pipeline,
ablations) take the names from here, so a renamed file cannot leave a reader behind.
"""

import json
import os

CONFIG_FILE = "config.yaml"  # the run's full config (a reused or resumed folder must match it)
METRICS_FILE = "metrics.json"  # one JSON object a line per logged iteration (Detectron2 JSONWriter)
PRETRAIN_SUMMARY = "pretrain_summary.json"  # a finished pretraining run (kNN, digests, timing)
SUPERVISED_SUMMARY = "supervised_summary.json"  # a finished supervised baseline run
FINAL_METRICS = "final_metrics.json"  # a finished detection run (AP, weights, seed, config)
STAGE_FILE = "stage.json"  # a finished pipeline / ablation stage (its key and outputs)


def read_metrics(run_dir):
    """The rows of ``run_dir``'s metrics.json in iteration order ([] when there is none).

    A torn or foreign line is skipped. A row written again for an iteration with the same keys
    (a resumed run logs again what the killed run logged after its last checkpoint) replaces the
    earlier one; rows of one iteration with other keys (an evaluation's) are kept beside it.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    rows = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and isinstance(row.get("iteration"), int):
                rows.pop((row["iteration"], frozenset(row)), None)
                rows[(row["iteration"], frozenset(row))] = row
    return sorted(rows.values(), key=lambda r: r["iteration"])

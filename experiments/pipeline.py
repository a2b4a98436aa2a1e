"""The main job: pretraining -> conversion -> detection fine-tuning -> AP report, as stages.

Stages, in order (each one a folder ``RUN_DIR/<stage>-<key>``):

1. ``data``: the embedded synthetic set (:func:`moco.data.synthetic.ensure_generated`; cached);
2. ``pretrain_<method>``: each of ``METHODS`` (default MoCo, v2 by default; also ``cmc``, ``cpc``)
   on the image folder, labels unused: ``PRETRAIN.CONFIG`` with ``MODEL.MECHANISM <method>``;
3. ``pretrain_supervised``: the same ResNet, data and budget, trained with the labels (stands in
   for ImageNet-supervised weights), unless ``SUPERVISED.WEIGHTS`` names released weights;
4. ``convert_*``: both checkpoints to Detectron2 pickles (official key rule), and each of ``INITS``
   (one's own checkpoints, ``[[name, path], ...]``: MoCo v1/v2/v3, torchvision, this toolkit's;
   a Detectron2 ``.pkl`` is used as it is), keyed by the file's sha256, not its path;
5. ``detect_<init>_s<seed>``: the detector fine-tuned from each method, each of INITS, supervised and random
   init, same config and schedule (CMC: ``CMC.DETECTION_CONFIG``, the same detector on its Lab
   backbone), ``DETECTION.TRIALS`` paired trials: trial i uses detection seed
   ``DETECTION.SEED + i`` (so the same data order and head initialisation) for every init;
   ``TASKS`` (default ``["voc_det"]``) adds the MoCo paper's other tasks on the embedded set
   (``coco_kp``, ``lvis_mask``, ``cityscapes_mask``, ``voc_semseg``: :data:`PIPELINE_TASKS`), each
   fine-tuned from the same converted weights in the same paired trials as
   ``detect_<task>_<init>_s<seed>`` (VOC detection keeps its stage names and keys);
6. ``report``: AP50 / AP / AP75 (VOC) or AP^bb / AP^mk (COCO), mean ± std, deltas vs supervised;
   with 2 or more trials, each method and each of INITS minus every row after it (the other
   inits, random and supervised) as paired differences
   with a 95% confidence interval and a one-sided paired t-test (scipy), also in
   ``pipeline_summary.json`` (``comparisons``), next to each pretraining's untrained and final kNN
   (``pretraining``). Each other task gets the same table, in ``report/<task>/`` (AP^kp, AP^mk
   with APr / APc / APf, AP^mk, mIoU), and its entry in the summary's ``tasks``.

``JOBS`` > 1 runs independent stages side by side, each in its own process (``Stages.run_many``).

A stage's key hashes everything that decides its result: its resolved config, what its data is (not
where: the embedded set's generator version, spec and seed; a user image folder's listing; a user
detection set's annotation files by content) and its input weights by content (sha256). So a
finished stage (``stage.json`` written last) is reused on rerun, a stage whose inputs changed in
place (``DATA.SEED 1`` under the same ``DATA.ROOT``, weights rewritten) gets a new folder, and an
interrupted one resumes from its last checkpoint in the same folder.
"""

import argparse
import functools
import json
import logging
import os
import re
import time

from fvcore.common.config import CfgNode as CN

from experiments.runs import Stages, listing_fingerprint, resolve_jobs
from moco.config import identity_dump, load_cfg
from moco.utils.cli import RunFailed
from moco.utils.config_loading import load_config
from moco.utils.file_io import atomic_write_json, check_output_dir, file_sha256
from moco.utils.run_files import FINAL_METRICS, PRETRAIN_SUMMARY, SUPERVISED_SUMMARY

logger = logging.getLogger(__name__)

DEFAULT_PRESET = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "pipeline",
    "embedded_cpu.yaml",
)  # the README's demo
BASELINES = ("supervised", "random")  # detection initialisations after the methods, in report order
METHODS = ("moco", "cmc", "cpc")  # the contrastive pretrainings the pipeline can compare
_TASK_CONFIGS = os.path.join(os.path.dirname(DEFAULT_PRESET), os.pardir, "tasks")
# TASKS name -> (embedded config, the SyntheticSpec.tasks format its sets are in, the backbone
# CMC's weights load into); "voc_det" is DETECTION.CONFIG (CMC: CMC.DETECTION_CONFIG)
PIPELINE_TASKS = {
    "voc_det": None,
    "coco_kp": ("embedded_kp_R_18w16_FPN.yaml", "keypoints", "build_lab_resnet_fpn_backbone"),
    "lvis_mask": ("embedded_lvis_R_18w16_FPN.yaml", "lvis", "build_lab_resnet_fpn_backbone"),
    "cityscapes_mask": (
        "embedded_cityscapes_R_18w16_FPN.yaml",
        "cityscapes",
        "build_lab_resnet_fpn_backbone",
    ),
    "voc_semseg": (
        "embedded_voc_sem_seg_R_18w16_FCN.yaml",
        "voc_semseg",
        "build_lab_resnet_backbone",
    ),
}


def get_pipeline_cfg():
    """Every pipeline default in one place; presets under ``configs/pipeline/`` override them."""
    c = CN()
    c.RUN_DIR = "output/pipeline"
    # Stages run at a time, each in its own process with cores // JOBS threads (0 = auto: one
    # single-thread process per available core, experiments.runs.resolve_jobs; 1 = in this
    # process, one after the other). On a 2-core CPU, 2 single-thread processes beat one
    # 2-thread process (docs/RESULTS.md).
    c.JOBS = 0
    c.DATA = CN()
    c.DATA.SYNTHETIC = True  # generate the embedded set; False: DATA.ROOT is a real image folder
    c.DATA.ROOT = ""  # "" = $DETECTRON2_DATASETS/moco_det_synthetic
    c.DATA.SEED = 0
    c.DATA.SPEC = []  # other SyntheticSpec fields as NAME VALUE pairs, e.g. [cls_train_per_class, 50]
    c.DATA.WORKERS = 2  # processes rendering the synthetic set
    c.PRETRAIN = CN()
    c.PRETRAIN.CONFIG = "configs/pretrain/moco_v2_R18_cpu.yaml"
    c.PRETRAIN.OPTS = []  # KEY VALUE overrides of every pretraining run (supervised too)
    c.PRETRAIN.NUM_PROCESSES = 1  # per machine (GPUs, or CPU processes without CUDA)
    # The methods pretrained and compared (MODEL.MECHANISM of each run, in report order): any of
    # moco, cmc, cpc. Each runs PRETRAIN.CONFIG and PRETRAIN.OPTS, then its own OPTS below.
    c.METHODS = ["moco"]
    # One's own checkpoints as rows beside (or, with METHODS [], instead of) the pretrained ones:
    # [[name, path], ...], each converted (detection.convert) and fine-tuned in the same paired
    # trials, e.g. INITS "[['mine', 'path/to/my.pth']]"
    c.INITS = []
    # Each method's own overrides, after PRETRAIN's (the supervised baseline takes PRETRAIN's
    # and SUPERVISED's only), e.g. MoCo with v1's settings on the demo's v2 config beside the
    # same supervised baseline
    c.MOCO = CN()
    c.MOCO.OPTS = []
    c.CMC = CN()
    c.CMC.OPTS = []  # e.g. ["MODEL.CMC_DICTIONARY", "moco"]
    c.CMC.DETECTION_CONFIG = "configs/detection/embedded_voc_R_18w16_FPN_cmc.yaml"  # Lab backbone
    c.CPC = CN()
    c.CPC.OPTS = []  # e.g. ["MODEL.CPC_PATCH_SIZE", 16] (32-px crops: a 3 x 3 grid of patches)
    c.SUPERVISED = CN()
    c.SUPERVISED.WEIGHTS = ""  # torchvision ResNet weights to use instead of training a baseline
    c.SUPERVISED.OPTS = []  # overrides of the supervised run on top of PRETRAIN's config and opts
    c.DETECTION = CN()
    c.DETECTION.CONFIG = "configs/detection/embedded_voc_R_18_FPN.yaml"
    c.DETECTION.OPTS = []
    c.DETECTION.NUM_PROCESSES = 1
    c.DETECTION.TRIALS = 1
    c.DETECTION.SEED = 0  # trial i uses SEED + i
    # The tasks fine-tuned from every init (PIPELINE_TASKS), each with its own report table:
    # voc_det (DETECTION.CONFIG) and the paper's others on the embedded set, e.g.
    # TASKS "['voc_det', 'coco_kp', 'lvis_mask', 'cityscapes_mask', 'voc_semseg']". DETECTION.OPTS
    # apply to every task's config.
    c.TASKS = ["voc_det"]
    return c


def resolve_preset(preset, listed=".yaml"):
    """``preset`` as a path: itself if it exists, else a file name (with or without .yaml) under
    configs/pipeline/; a missing one is one line listing the presets whose names contain
    ``listed``."""
    presets = os.path.dirname(DEFAULT_PRESET)
    if not preset or os.path.exists(preset):
        return preset
    for name in (preset, preset + ".yaml"):  # --preset ci.yaml (as the help names them), ci
        if os.path.isfile(os.path.join(presets, name)):
            return os.path.join(presets, name)
    names = sorted(n for n in os.listdir(presets) if listed in n and n.endswith(".yaml"))
    raise FileNotFoundError(
        f"--preset {preset} does not exist; the presets are {', '.join(names)} "
        f"(in configs/pipeline/), or give a YAML file's path"
    )


def load_pipeline_cfg(preset=None, opts=()):
    """The pipeline config of ``preset`` (a path, or a file name under configs/pipeline/) and
    ``opts`` (KEY VALUE)."""
    preset = resolve_preset(preset)
    cfg = load_config(
        get_pipeline_cfg,
        preset,
        list(opts),
        what="--preset",
        keys="experiments/pipeline.py",
    )
    if cfg.DETECTION.TRIALS < 1:
        raise ValueError(f"DETECTION.TRIALS must be >= 1, got {cfg.DETECTION.TRIALS}")
    resolve_jobs(cfg.JOBS)  # one line for a negative JOBS
    methods = list(cfg.METHODS)
    inits = external_inits(cfg)
    if len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise ValueError(f"METHODS {methods}: expected distinct names among {', '.join(METHODS)}")
    if not methods and not inits:
        raise ValueError("METHODS is empty and INITS names no checkpoint: nothing to compare")
    tasks = list(cfg.TASKS)
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(PIPELINE_TASKS):
        raise ValueError(
            f"TASKS {tasks}: expected distinct names among {', '.join(PIPELINE_TASKS)}"
        )
    if not cfg.DATA.SYNTHETIC and tasks != ["voc_det"]:
        raise ValueError(
            f"TASKS {tasks}: the other tasks' configs are the embedded set's (DATA.SYNTHETIC "
            "True); on real data run tools/train_net.py with configs/tasks/ (README)"
        )
    cfg.freeze()
    return cfg


_INIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def external_inits(cfg):
    """``INITS`` as {name: absolute checkpoint path}; a bad entry is one ValueError naming it."""
    inits = {}
    for i, entry in enumerate(cfg.INITS):
        where = f"INITS[{i}] {list(entry) if isinstance(entry, (list, tuple)) else entry!r}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"{where}: expected a [name, checkpoint] pair")
        name, path = (str(x) for x in entry)
        if not _INIT_NAME.fullmatch(name):
            raise ValueError(f"{where}: the name must be letters, digits, '_', '.' or '-'")
        if name in METHODS or name in BASELINES or name in inits:
            raise ValueError(
                f"{where}: {name!r} is taken (by METHODS, the baselines {', '.join(BASELINES)} "
                "or another INITS entry); give the row another name"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: checkpoint {path} not found")
        inits[name] = os.path.abspath(path)
    return inits


# ------------------------------------------------------------------------------------------------
# the stages' work


def _data_stage(cfg):
    from moco.data.synthetic.spec import default_synthetic_root

    root = os.path.abspath(cfg.DATA.ROOT or default_synthetic_root())
    if not cfg.DATA.SYNTHETIC:
        if not os.path.isdir(os.path.join(root, "train")):
            raise FileNotFoundError(
                f"DATA.ROOT {root}: no train/ folder (an ImageNet-style folder)"
            )
        return {"image_folder": root, "synthetic_root": None}
    manifest = ensure_data(cfg, root)
    print(f"    embedded data in {root}: {manifest['counts']}", flush=True)
    return {"image_folder": os.path.join(root, "imagefolder"), "synthetic_root": root}


def ensure_data(cfg, root):
    """The embedded set of ``cfg`` in ``root`` with the formats its TASKS read, generated unless
    there; returns its manifest. Formats the set there already holds are kept: with or without
    them the image folder and the detection scenes are the same bytes (the same seed), so a run
    with fewer TASKS does not regenerate the set a run with more wrote."""
    import dataclasses

    from moco.data.synthetic.writers import ensure_generated, read_manifest

    spec = synthetic_spec(cfg)
    wanted = {PIPELINE_TASKS[t][1] for t in cfg.get("TASKS", ()) if PIPELINE_TASKS.get(t)}
    have = (read_manifest(root) or {}).get("spec") or {}
    if {k: v for k, v in have.items() if k != "tasks"} == spec.to_dict():
        wanted |= set(have.get("tasks", ()))
    spec = dataclasses.replace(spec, tasks=tuple(sorted(wanted)))
    return ensure_generated(root, spec, workers=cfg.DATA.WORKERS)


def synthetic_spec(cfg):
    """The SyntheticSpec of DATA.SEED and DATA.SPEC (NAME VALUE pairs)."""
    from moco.data.synthetic.spec import SyntheticSpec

    pairs = list(cfg.DATA.SPEC)
    fields = set(SyntheticSpec.__dataclass_fields__) - {"seed"}
    if len(pairs) % 2 or any(name not in fields for name in pairs[::2]):
        raise ValueError(
            f"DATA.SPEC {pairs}: expected NAME VALUE pairs with NAME in {sorted(fields)}"
        )
    try:
        values = {name: int(v) for name, v in zip(pairs[::2], pairs[1::2])}
    except ValueError:
        raise ValueError(f"DATA.SPEC {pairs}: values must be integers") from None
    return SyntheticSpec(seed=cfg.DATA.SEED, **values)


def data_identity(cfg, image_folder):
    """What the data is, for the stage keys: ``DATA.ROOT`` says where it is, and a set regenerated
    there with another seed or spec is another set. The embedded set: its generator version and
    spec (seed included); a user image folder: its listing (:func:`listing_fingerprint`)."""
    if cfg.DATA.SYNTHETIC:
        from moco.data.synthetic.spec import GENERATOR_VERSION

        return {"generator_version": GENERATOR_VERSION, "spec": synthetic_spec(cfg).to_dict()}
    return {"image_folder": listing_fingerprint(image_folder)}


def _annotation_files(name):
    """The annotation files of a registered detection dataset, from its metadata: a COCO
    ``json_file``; a VOC split's listing and the XML files it names. [] when it names none."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None)
    if json_file:
        return [json_file]
    dirname, split = getattr(meta, "dirname", None), getattr(meta, "split", None)
    if not (dirname and split):
        return []
    listing = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    try:
        with open(listing) as f:
            ids = f.read().split()
    except OSError:
        return [listing]  # missing: the fine-tune names it; here it only marks the key
    return [listing] + [os.path.join(dirname, "Annotations", f"{i}.xml") for i in ids]


def detection_data_identity(dcfg, embedded=None):
    """What a detection config's datasets are, for the stage keys: the embedded set's names
    (synthetic_*) are ``embedded`` (its :func:`data_identity`) when this run generated it; any
    other dataset is its annotation files by content (sha256 over file names and contents)."""
    import hashlib

    from detection.data.datasets import SYNTHETIC_DATASETS, TASK_DATASETS, register_datasets

    # their metadata names the annotation files (a config of plain Detectron2 has no REGISTER)
    register_datasets(dcfg.DATASETS.get("REGISTER", ()))
    identity = {}
    for name in list(dcfg.DATASETS.TRAIN) + list(dcfg.DATASETS.TEST):
        # the task formats are the same scenes: the spec and generator version decide their bytes
        if embedded is not None and (name in SYNTHETIC_DATASETS or name in TASK_DATASETS):
            identity[name] = embedded
            continue
        files = _annotation_files(name)
        digest = hashlib.sha256()
        for path in files:
            digest.update(os.path.basename(path).encode() + b"\0")
            try:
                digest.update(bytes.fromhex(file_sha256(path)))
            except OSError:
                digest.update(b"missing")
        identity[name] = digest.hexdigest() if files else "no annotation files in its metadata"
    return identity


def _method_opts(cfg, method):
    """The pretraining overrides of ``method`` on top of PRETRAIN's: its section's OPTS (MOCO, CMC,
    CPC), after its MODEL.MECHANISM for all but MoCo (the config's default)."""
    own = list(cfg[method.upper()].OPTS)
    return own if method == "moco" else ["MODEL.MECHANISM", method, *own]


def _detection_config(cfg, init, task="voc_det"):
    """(config file, extra overrides) of ``init``'s fine-tune on ``task``."""
    if task == "voc_det":
        return (cfg.CMC.DETECTION_CONFIG if init == "cmc" else cfg.DETECTION.CONFIG), []
    config, _, lab_backbone = PIPELINE_TASKS[task]
    opts = ["MODEL.BACKBONE.NAME", lab_backbone] if init == "cmc" else []
    return os.path.normpath(os.path.join(_TASK_CONFIGS, config)), opts


def _pretrain_cfg(cfg, image_folder, extra_opts=()):
    opts = ["DATA.ROOT", image_folder, "KNN.DATA", image_folder]
    return load_cfg(cfg.PRETRAIN.CONFIG, opts + list(cfg.PRETRAIN.OPTS) + list(extra_opts))


def _read_json(path, what):
    if not os.path.isfile(path):
        raise RuntimeError(f"{what} finished without writing {path}")
    with open(path) as f:
        return json.load(f)


# Each stage's work is a module-level function of picklable arguments, bound with
# functools.partial, so that Stages.run_many can run it in a process of its own.


def _knn_outputs(summary):
    knn = summary["knn"]
    return {
        "knn": knn,
        "knn_chance": summary["knn_chance"],
        "knn_untrained": knn[0]["top1"] if knn and knn[0]["iteration"] == 0 else None,
        "knn_final": knn[-1]["top1"] if knn else None,
    }


def _pretrain_work(pcfg, supervised, nproc, out, resume):
    from moco.engine.launch import launch_training
    from moco.utils.launch import LaunchSpec

    if supervised:
        summary_file = SUPERVISED_SUMMARY
        from moco.engine.supervised import SupervisedTrainer as trainer_cls
    else:
        summary_file = PRETRAIN_SUMMARY
        from moco.engine.trainer import PretrainTrainer as trainer_cls

    pcfg = pcfg.clone()
    pcfg.OUTPUT_DIR = out
    launch_training(
        trainer_cls, pcfg, LaunchSpec(procs_per_machine=nproc), "auto" if resume else None
    )
    what = "supervised pretraining" if supervised else f"{pcfg.MODEL.MECHANISM} pretraining"
    summary = _read_json(os.path.join(out, summary_file), what)
    outputs = {
        "checkpoint": summary["weights" if supervised else "last_checkpoint"],
        **_knn_outputs(summary),
    }
    if supervised:
        outputs["val_top1"] = summary.get("val_top1")
    else:
        outputs["images_per_sec"] = summary["images_per_sec"]
    return outputs


def _pretrain_stage(cfg, image_folder, method, data):
    """``method``: one of METHODS, or "supervised"; ``data``: :func:`data_identity`."""
    supervised = method == "supervised"
    pcfg = _pretrain_cfg(
        cfg, image_folder, cfg.SUPERVISED.OPTS if supervised else _method_opts(cfg, method)
    )
    work = functools.partial(_pretrain_work, pcfg, supervised, cfg.PRETRAIN.NUM_PROCESSES)
    return f"pretrain_{method}", {"config": identity_dump(pcfg), "data": data}, work


def _convert_work(label, checkpoint, out, resume):
    from detection.convert import convert_checkpoint

    dst = os.path.join(out, f"{label}.pkl")
    result = convert_checkpoint(checkpoint, dst)
    print("    " + result.summary(checkpoint, dst), flush=True)
    return {"weights": dst}


def _convert_stage(label, checkpoint, by_content=False):
    """``by_content``: keyed by the file's sha256 only (one's own checkpoint, wherever it lies)."""
    material = {"sha256": file_sha256(checkpoint)}
    if not by_content:
        material = {"checkpoint": checkpoint, **material}
    return f"convert_{label}", material, functools.partial(_convert_work, label, checkpoint)


def _detect_work(config_file, num_processes, opts, synthetic_root, out, resume):
    from detectron2.engine import default_argument_parser

    from detection.data.datasets import register_synthetic
    from detection.trainer import run

    if synthetic_root:  # this run's embedded set under the synthetic_* names
        register_synthetic(synthetic_root)
    argv = ["--config-file", config_file, "--num-gpus", str(num_processes)]
    argv += ["--resume"] if resume else []
    try:
        run(default_argument_parser().parse_args(argv + opts + ["OUTPUT_DIR", out]))
    except FloatingPointError as e:
        # Detectron2's NaN or inf loss or boxes: an outcome of this init and seed, as an
        # ablation's NaN run is labelled fail. Recorded with its reason (the stage finishes, a
        # rerun reuses it), left out of the report's rows and pairs, and the sweep goes on.
        return {"run_dir": out, "diverged": " ".join(str(e).split())}
    metrics = _read_json(os.path.join(out, FINAL_METRICS), "detection fine-tuning")
    return {"run_dir": out, "metrics": metrics["metrics"]}


def _detect_stage(cfg, init, weights, seed, synthetic_root, data, task="voc_det"):
    """``data``: {"pretraining": :func:`data_identity`, "detection": {config file:
    :func:`detection_data_identity`}} (filled here on first use). ``task``: one of TASKS."""
    from detection.config import load_cfg as load_detection_cfg

    config, task_opts = _detection_config(cfg, init, task)
    opts = list(cfg.DETECTION.OPTS) + task_opts + ["MODEL.WEIGHTS", weights, "SEED", str(seed)]
    # the resolved config: a changed _BASE_ changes the key too
    dcfg = load_detection_cfg(config, opts, cfg.DETECTION.NUM_PROCESSES)
    if config not in data["detection"]:  # the same datasets for every init and trial
        embedded = data["pretraining"] if synthetic_root else None
        data["detection"][config] = detection_data_identity(dcfg, embedded)
    material = {
        "config": os.path.abspath(config),
        "resolved": dcfg.dump(),
        "opts": opts,
        "data": data["detection"][config],
        "weights_sha256": file_sha256(weights) if weights else None,
    }
    work = functools.partial(
        _detect_work, config, cfg.DETECTION.NUM_PROCESSES, opts, synthetic_root
    )
    return _detect_name(task, init, seed), material, work


def _detect_name(task, init, seed):
    """VOC detection keeps the names (and keys) its stages had before TASKS existed."""
    return f"detect_{init}_s{seed}" if task == "voc_det" else f"detect_{task}_{init}_s{seed}"


def _tail(path, parts=2):
    """The last ``parts`` components of a path: a copied repository keeps them."""
    return os.path.normpath(path).split(os.sep)[-parts:] if path else []


def _trial_run(folder, outputs, seed, weights):
    """A detection stage's run folder, checked against the stage: its record names its own
    folder, and its final_metrics.json this trial's seed and weights. A record or result copied
    from another stage would otherwise add another init's trial to this row (issue 27.3)."""
    from experiments.report import load_metrics

    record = os.path.join(folder, "stage.json")
    run = outputs.get("run_dir")
    if not isinstance(run, str) or os.path.realpath(run) != os.path.realpath(folder):
        raise ValueError(
            f"{record}: its run_dir {run!r} is not its own folder; remove {folder} to run the "
            "stage again"
        )
    data = load_metrics(run)
    if data.get("seed") != seed or _tail(data.get("weights")) != _tail(weights):
        raise ValueError(
            f"{os.path.join(run, FINAL_METRICS)}: seed {data.get('seed')!r} and weights "
            f"{data.get('weights')!r} are not this trial's (seed {seed}, weights {weights!r}); "
            f"remove {folder} to run the stage again"
        )
    return run


def trial_runs(stage_of, init, seeds, weights, task="voc_det"):
    """``init``'s trials on ``task`` from their stages (``stage_of``: stage name -> (folder,
    outputs)): the run folders of the trained ones (checked by :func:`_trial_run`) and {seed:
    reason} of the diverged ones."""
    trained, diverged = [], {}
    for seed in seeds:
        folder, outputs = stage_of[_detect_name(task, init, seed)]
        if isinstance(outputs, dict) and "diverged" in outputs:
            diverged[seed] = str(outputs["diverged"])
        else:
            trained.append(_trial_run(folder, outputs, seed, weights))
    return trained, diverged


def diverged_lines(diverged):
    """One note per init with diverged trials ({init: {seed: reason}}), naming the seeds and the
    first reason."""
    return [
        f"{init} diverged in trial(s) {', '.join(f's{s}' for s in by_seed)}: "
        f"{next(iter(by_seed.values()))}; left out of its row and pairs"
        for init, by_seed in diverged.items()
        if by_seed
    ]


def run_pipeline(cfg, submit=None):
    """Run every stage of ``cfg`` (see :func:`get_pipeline_cfg`); returns the report's paths.

    ``submit``: the pretrainings and fine-tunes as submitit jobs instead
    (:class:`experiments.cluster.StageSubmitter`, ``Stages.run_many``); the data check and the
    conversions (seconds each) run in this process, which waits for the jobs.

    With ``JOBS`` > 1, independent stages run side by side in worker processes: MoCo pretraining,
    the supervised baseline and the random-init trials (which need no pretraining) first, and each
    pretraining's trials as soon as its weights exist.
    """
    from experiments.report import TASKS, summarize, to_markdown, write_report
    from experiments.report import comparisons as paired_comparisons

    run_dir = os.path.abspath(cfg.RUN_DIR)
    check_output_dir(run_dir, "RUN_DIR")
    os.makedirs(run_dir, exist_ok=True)
    methods = list(cfg.METHODS)
    external = external_inits(cfg)
    trials = list(range(cfg.DETECTION.SEED, cfg.DETECTION.SEED + cfg.DETECTION.TRIALS))
    train_supervised = not cfg.SUPERVISED.WEIGHTS
    pretrainings = methods + ["supervised"] * int(train_supervised)
    inits = methods + list(external) + list(BASELINES)
    converted = [n for n, path in external.items() if not path.endswith(".pkl")]
    tasks = list(cfg.TASKS)
    total = 1 + len(pretrainings) + len(methods) + 1 + len(converted)
    total += len(inits) * len(trials) * len(tasks) + 1
    stages = Stages(run_dir, total)
    start = time.perf_counter()

    data = stages.run("data", dict(cfg.DATA), lambda out, resume: _data_stage(cfg))
    folder, synthetic_root = data["image_folder"], data["synthetic_root"]
    if synthetic_root:  # a reused data stage: the set may have been regenerated with another spec
        ensure_data(cfg, synthetic_root)
    sup_ckpt = os.path.abspath(cfg.SUPERVISED.WEIGHTS) if not train_supervised else None
    if sup_ckpt and not os.path.isfile(sup_ckpt):
        raise FileNotFoundError(f"SUPERVISED.WEIGHTS {sup_ckpt}: no such file")
    # read on every run, never from the data stage's record: the set may have changed in place
    data = {"pretraining": data_identity(cfg, folder), "detection": {}}

    def trials_of(init, checkpoint, by_content=False):
        """Convert ``checkpoint`` (here: it takes a moment) and return ``init``'s trials."""
        if by_content and checkpoint.endswith(".pkl"):  # Detectron2 weights already
            weights = checkpoint
        else:
            weights = stages.run(*_convert_stage(init, checkpoint, by_content))["weights"]
        return [
            _detect_stage(cfg, init, weights, seed, synthetic_root, data, task)
            for task in tasks
            for seed in trials
        ]

    # Each init's trials join the queue as soon as its weights exist, so neither worker waits
    # for an unrelated stage: the random trials and the supervised baseline's run beside MoCo's.
    first = [_pretrain_stage(cfg, folder, method, data["pretraining"]) for method in pretrainings]
    first += [
        _detect_stage(cfg, "random", "", seed, synthetic_root, data, task)
        for task in tasks
        for seed in trials
    ]
    later = [] if train_supervised else trials_of("supervised", sup_ckpt)
    for name, checkpoint in external.items():  # one's own checkpoints: converted, then trials
        later += trials_of(name, checkpoint, by_content=True)

    def then(i, outputs):  # a finished pretraining's trials
        return trials_of(pretrainings[i], outputs["checkpoint"]) if i < len(pretrainings) else []

    stages.run_many(first + later, resolve_jobs(cfg.JOBS), then=then, submit=submit)
    outputs = {r["name"]: r["outputs"] for r in stages.records}
    stage_of = {r["name"]: (r["folder"], r["outputs"]) for r in stages.records}
    pretrained = {name: outputs[f"pretrain_{name}"] for name in pretrainings}
    weights = {
        init: external[init]
        if init not in converted and init in external
        else outputs[f"convert_{init}"]["weights"]
        for init in inits
        if init != "random"
    }
    outcomes = {
        task: {
            init: trial_runs(stage_of, init, trials, weights.get(init, ""), task) for init in inits
        }
        for task in tasks
    }
    runs = {task: {init: o[0] for init, o in by.items()} for task, by in outcomes.items()}
    diverged = {task: {init: o[1] for init, o in by.items()} for task, by in outcomes.items()}

    stages.done += 1
    report_dir = os.path.join(run_dir, "report")
    # each method and own checkpoint against every row after it (paired by seed with 2+ trials)
    heads = methods + list(external)
    pairs = [(a, b) for i, a in enumerate(heads) for b in heads[i + 1 :] + ["random", "supervised"]]
    from detection.data.datasets import SYNTHETIC_DATASETS, TASK_DATASETS

    # "on the embedded set" only when the detector saw it (not a DATASETS.REGISTER set)
    detection_sets = {name for sets in data["detection"].values() for name in sets}
    embedded = cfg.DATA.SYNTHETIC and detection_sets <= set(SYNTHETIC_DATASETS) | set(TASK_DATASETS)
    reports = {}
    for i, task in enumerate(tasks):
        # an init whose every trial diverged has no row, and its pairs are not compared
        trained = {init: folders for init, folders in runs[task].items() if folders}
        if not trained:
            raise RunFailed(
                f"every {task} fine-tune diverged ({diverged_lines(diverged[task])[0]}); "
                "nothing to report: lower the detector's SOLVER.BASE_LR (DETECTION.OPTS)"
            )
        table = summarize(trained, baseline="supervised" if "supervised" in trained else None)
        comparisons, verdicts = paired_comparisons(
            table, [(a, b) for a, b in pairs if a in trained and b in trained]
        )
        verdicts = diverged_lines(diverged[task]) + verdicts
        what = "Detection" if task == "voc_det" else TASKS[table.task].name
        # with the pretraining runs' loss, kNN and lr over iterations (their folders' metrics.json),
        # once: beside the first task's table
        paths = write_report(
            table,
            report_dir if task == "voc_det" else os.path.join(report_dir, task),
            title=f"{what} transfer on the embedded set" if embedded else f"{what} transfer",
            notes=verdicts,
            published=task == "voc_det",
            base=run_dir,
            curves={
                f"pretrain_{name}": os.path.dirname(out["checkpoint"])
                for name, out in pretrained.items()
            }
            if i == 0
            else None,
            curves_name="pretraining_curves.png",
        )
        reports[task] = {
            "table": table,
            "comparisons": comparisons,
            "runs": runs[task],
            "diverged": {init: sorted(by) for init, by in diverged[task].items() if by},
            "verdicts": verdicts,
            "report": paths,
        }
    # the first task's report is the summary's (VOC detection's unless TASKS says otherwise)
    first_task = reports[tasks[0]]
    comparisons, verdicts, paths = (first_task[k] for k in ("comparisons", "verdicts", "report"))
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "stages": [
            {k: r[k] for k in ("name", "key", "seconds", "reused") if k in r}
            for r in stages.records
        ],
        **{f"pretrain_{method}": pretrained[method] for method in methods},
        "pretraining": {
            k: {m: v.get(m) for m in ("knn_untrained", "knn_final", "knn_chance", "val_top1")}
            for k, v in pretrained.items()
        },
        "inits": external,  # one's own checkpoints, by row name
        "comparisons": comparisons,
        "runs": first_task["runs"],  # the trained trials' folders
        "diverged": first_task["diverged"],  # {init: [seeds]} of the diverged ones
        "verdicts": verdicts,
        "report": paths,
    }
    if tasks != ["voc_det"]:  # every task's, by TASKS name
        summary["tasks"] = {
            task: {k: v for k, v in r.items() if k != "table"} for task, r in reports.items()
        }
    atomic_write_json(os.path.join(report_dir, "pipeline_summary.json"), summary)
    print(f"[{stages.done}/{total}] report")
    print(_pretrain_lines(pretrained))
    for task, r in reports.items():
        if len(tasks) > 1:
            print(f"\n{task}:")
        print(to_markdown(r["table"]), end="")
        print("\n".join(r["verdicts"]))
    print(
        "report written to:\n  "
        + "\n  ".join(p for r in reports.values() for p in r["report"].values())
    )
    print(f"pipeline finished in {summary['seconds']:.0f} s ({run_dir})")
    return paths


def _pretrain_lines(pretrained):
    lines = []
    for name, out in pretrained.items():
        if out.get("knn"):
            last = out["knn"][-1]
            base = out.get("knn_untrained")
            start = f"{base:.1f}% untrained -> " if base is not None else ""
            lines.append(
                f"pretrain_{name}: backbone kNN top-1 {start}{last['top1']:.1f}% after "
                f"{last['epoch']} epochs (chance {out['knn_chance']:.1f}%)"
            )
    return "\n".join(lines)


def build_argument_parser():
    p = argparse.ArgumentParser(
        prog="pipeline.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="a YAML file, or the name of one under configs/pipeline/ (default: "
        "embedded_cpu.yaml, the CPU demo)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="overrides, e.g. RUN_DIR out/demo DETECTION.TRIALS 3",
    )
    return p

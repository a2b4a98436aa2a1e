"""Detection fine-tuning with Detectron2's ``DefaultTrainer`` (the official ``train_net.py`` flow).

What this adds to Detectron2:

* evaluator by the test set's ``evaluator_type``: ``pascal_voc`` -> ``PascalVOCDetectionEvaluator``
  (AP, AP50, AP75 under "bbox"); ``coco`` -> ``COCOEvaluator`` with bbox, plus segm when masks
  are on and keypoints when keypoints are; ``lvis`` -> ``LVISEvaluator`` (APr / APc / APf; the
  ``lvis`` package); ``cityscapes_instance`` -> ``CityscapesInstanceEvaluator`` (the
  ``cityscapesscripts`` package); ``sem_seg`` / ``cityscapes_sem_seg`` -> ``SemSegEvaluator``
  (mIoU);
* weights and resume checkpoints are read by :class:`SafeDetectionCheckpointer` (no code execution);
* the embedded datasets (``synthetic_*``) are registered when a config names them (root:
  ``default_synthetic_root()``, i.e. ``$DETECTRON2_DATASETS/moco_det_synthetic``);
* ``final_metrics.json`` in OUTPUT_DIR (written atomically) with what ``tools/report.py`` reads;
  checkpoints and metrics.json are written atomically too;
* one run per OUTPUT_DIR (``run`` holds its lock, moco.utils.file_io.run_folder_lock); SIGTERM / SIGINT
  stop after the current step with a checkpoint and one line (moco.engine.hooks.SignalStop);
* ``--resume`` continues the data order and augmentation draws where the checkpoint left them
  (detection.data.order: the loader's position in the trainer's checkpoint, per-step seeds);
* a config written for ``SOLVER.REFERENCE_WORLD_SIZE`` GPUs (the paper configs: 8) runs on
  ``--num-gpus`` 1, 2 or 4 by Detectron2's rule (``DefaultTrainer.auto_scale_workers``: the
  per-GPU batch kept, the learning rate scaled with the batch, the iterations inversely);
  :func:`effective_schedule` is that rule, and ``run`` prints its result once at start.

CPU: ``setup_cfg`` picks ``MODEL.DEVICE cpu`` without CUDA. Multi-process runs need CUDA GPUs:
``DefaultTrainer`` wraps the model in DDP with GPU device ids.
"""

import importlib
import logging
import math
import os
import time
import weakref

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)
from detectron2.utils import comm

from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import load_cfg, setup_cfg
from detection.data.checks import build_checked_train_loader, set_annotation_limits
from detection.data.datasets import (
    REGISTER_HINT,
    SYNTHETIC_DATASETS,
    TASK_DATASETS,
    evaluator_type,
    register_datasets,
    register_synthetic,
    use_checked_loaders,
)
from detection.data.order import DataOrder
from detection.semantic_seg import load_label_png
from moco.utils import file_io
from moco.utils.file_io import atomic_write_json
from moco.utils.hooks import SignalStop, build_writers
from moco.utils.launch import LaunchSpec, kernels, launch_processes, process_group_timeout
from moco.utils.run_files import FINAL_METRICS

__all__ = [
    "CityscapesInstanceEvaluatorInFolder",
    "DetectionTrainer",
    "NoPredictionsScoreZeroCOCOEvaluator",
    "effective_schedule",
    "main",
    "prepare_datasets",
    "run",
    "schedule_line",
    "write_final_metrics",
]

logger = logging.getLogger(__name__)

# what a set's evaluator_type needs beyond Detectron2 (its loader and evaluator import it)
_PACKAGES = {"lvis": "lvis", "cityscapes_instance": "cityscapesscripts"}
_TASKS = {
    "pascal_voc": "voc",
    "coco": "coco",
    "lvis": "lvis",
    "cityscapes_instance": "cityscapes",
    "sem_seg": "sem_seg",
    "cityscapes_sem_seg": "sem_seg",
}


class DetectionTrainer(DefaultTrainer):
    """``DefaultTrainer`` with evaluator choice by dataset type and the safe checkpointer."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        kind = evaluator_type(dataset_name)
        if kind == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if kind in ("sem_seg", "cityscapes_sem_seg"):  # mIoU from the label PNGs, no extra package
            return SemSegEvaluator(
                dataset_name,
                distributed=True,
                output_dir=output_folder,
                sem_seg_loading_fn=load_label_png,
            )
        if kind == "cityscapes_instance":
            return CityscapesInstanceEvaluatorInFolder(dataset_name, output_folder)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if cfg.MODEL.KEYPOINT_ON:
            tasks += ("keypoints",)
        if kind == "lvis":
            return LVISEvaluator(
                dataset_name, tasks=tasks, distributed=True, output_dir=output_folder
            )
        return NoPredictionsScoreZeroCOCOEvaluator(
            dataset_name,
            tasks=tasks,
            distributed=True,
            output_dir=output_folder,
            # a set with other keypoints than COCO's 17 (the embedded K = 5) names its sigmas
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS
            or MetadataCatalog.get(dataset_name).get("keypoint_oks_sigmas", ()),
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader over the readable training images (detection.data.checks)."""
        loader, skipped = build_checked_train_loader(cfg)
        loader.skipped_images = skipped
        return loader

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer and then calls build_hooks,
        # whose PeriodicCheckpointer captures self.checkpointer: swap it in first.
        self.checkpointer = SafeDetectionCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            allow_partial_weights=self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS,
        )
        ret = super().build_hooks()
        # first: the step's RNGs are seeded before anything draws; its state is the data position
        ret.insert(0, DataOrder(self._trainer.data_loader))
        skipped = getattr(self._trainer.data_loader, "skipped_images", None)
        if skipped is not None:  # before the writers (last): metrics.json gets the count
            ret.insert(
                1,
                hooks.CallbackHook(
                    after_step=lambda t: t.storage.put_scalar(
                        "data/skipped_images", skipped(), smoothing_hint=False
                    )
                ),
            )
        # last: the step's checkpoint and metrics hooks have run when a signal stops the run
        ret.append(
            SignalStop(
                self._save_stop_checkpoint,
                f"rerun the same command with --resume (OUTPUT_DIR {self.cfg.OUTPUT_DIR})",
            )
        )
        return ret

    def _save_stop_checkpoint(self):
        """``model_{iter:07d}.pth`` as PeriodicCheckpointer names it (unless it just wrote it)."""
        name = f"model_{self.iter:07d}"
        path = os.path.abspath(os.path.join(self.cfg.OUTPUT_DIR, name + ".pth"))
        if os.path.basename(self.checkpointer.get_checkpoint_file()) != name + ".pth":
            self.checkpointer.save(name, iteration=self.iter)
        comm.synchronize()
        return path

    def build_writers(self):
        """Detectron2's ``default_writers`` as pretraining's (moco.engine.hooks.build_writers): metrics.json
        written atomically, with each logged iteration's own values, which a resumed run repeats."""
        return build_writers(self.cfg.OUTPUT_DIR, self.max_iter)


class NoPredictionsScoreZeroCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator``, with AP, AP50 and AP75 0 rather than NaN when the model
    detected nothing in the whole test set (a briefly trained keypoint model from random init
    did, in the pipeline's test): with ground truth there, nothing detected is nothing recalled.
    The area APs stay NaN (null in final_metrics.json): an area range may hold no ground truth."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if coco_eval is None:
            results.update({k: 0.0 for k in ("AP", "AP50", "AP75")})
        return results


class CityscapesInstanceEvaluatorInFolder(CityscapesInstanceEvaluator):
    """Detectron2's ``CityscapesInstanceEvaluator`` with cityscapesscripts' files in
    ``output_dir`` (the run's inference folder): its ``evaluateImgLists`` writes ``matches.json``
    into the working folder (the repository, for a test or the pipeline) and its ``exportFile``
    defaults to the package's own folder."""

    def __init__(self, dataset_name, output_dir):
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        if comm.get_rank() > 0:
            return super().evaluate()
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        os.makedirs(self._output_dir, exist_ok=True)
        write = cityscapes_eval.writeDict2JSON
        args = cityscapes_eval.args
        export = args.exportFile
        args.exportFile = os.path.join(self._output_dir, "resultInstanceLevelSemanticLabeling.json")

        def in_folder(data, file_name):  # absolute paths (gtInstances.json) stay as they are
            write(data, os.path.join(self._output_dir, file_name))

        cityscapes_eval.writeDict2JSON = in_folder
        try:
            return super().evaluate()
        finally:
            cityscapes_eval.writeDict2JSON, args.exportFile = write, export


def prepare_datasets(cfg):
    """Register the sets of ``DATASETS.REGISTER`` and the embedded ones the config names (if not
    yet registered), give Detectron2's builtin and registered names the checked loaders
    (:func:`use_checked_loaders`), check every set's class count, set the annotation bounds the
    checked loaders apply."""
    set_annotation_limits(cfg.DATALOADER.MAX_ANNOTATIONS, cfg.DATALOADER.MAX_ANNOTATIONS_PER_IMAGE)
    register_datasets(cfg.DATASETS.REGISTER)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    registered = set(DatasetCatalog.list())
    embedded = SYNTHETIC_DATASETS.keys() | TASK_DATASETS.keys()  # a root's task sets: its tasks
    if any(n in embedded and n not in registered for n in names):
        register_synthetic(None)
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ValueError(f"DATASETS: {name!r} is not a registered dataset; {REGISTER_HINT}")
    use_checked_loaders(names)
    _check_packages(names)
    # a semantic segmentor predicts the sets' stuff classes with its head, a detector things
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        key, field = "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes"
        n_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    else:
        key, field = "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes"
        n_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    first = None  # (name, classes) of the first set that names its classes
    for name in dict.fromkeys(names):
        classes = dataset_classes(name, field)
        if classes is None:
            continue
        if len(classes) != n_classes:
            raise ValueError(
                f"{key} is {n_classes} but {name} has {len(classes)} classes; "
                f"set {key} {len(classes)}"
            )
        # class i must be the same class in every set: the detector is scored by its index
        if first is not None and list(classes) != list(first[1]):
            diff = next(i for i, (a, b) in enumerate(zip(classes, first[1])) if a != b)
            raise ValueError(
                f"DATASETS: class {diff} of {name} is {classes[diff]!r} but of {first[0]} "
                f"{first[1][diff]!r}; TRAIN and TEST sets must share one class list (names and "
                "order; a COCO file's categories in id order)"
            )
        first = first or (name, classes)
    for name in cfg.DATASETS.TEST:
        evaluator_type(name)  # fails early, with the dataset named, if it cannot be scored


def _check_packages(names):
    """A set whose loader or evaluator needs a package that is not installed fails at start, in
    one line, not in an ImportError traceback (for a test set: after the whole training)."""
    for name in dict.fromkeys(names):
        package = _PACKAGES.get(MetadataCatalog.get(name).get("evaluator_type"))
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(
                f"DATASETS: {name} needs the {package!r} package (its loader and evaluator); "
                f"install it: .venv/bin/pip install {package}"
            ) from None


def dataset_classes(name, field="thing_classes"):
    """``name``'s ``thing_classes`` (or ``field``: ``stuff_classes`` for semantic segmentation).
    A COCO set registered with ``register_coco_instances`` has
    them only once its JSON is loaded: it is loaded here (checked, as the loader will), so that a
    wrong NUM_CLASSES is one line at start, not a failed evaluation after training (issue 28.2);
    a training set's file is then parsed twice, seconds against a run's hours. None when the
    set's loader sets no classes."""
    meta = MetadataCatalog.get(name)
    if meta.get(field) is None and field == "thing_classes" and meta.get("json_file"):
        DatasetCatalog.get(name)  # load_coco_json sets thing_classes (categories in id order)
    return MetadataCatalog.get(name).get(field)


def check_test_annotations(cfg):
    """Load the test sets once at start: their loaders check the annotations (detection.data.checks),
    so a bad test file fails now with its name, not in the evaluator after training."""
    for name in cfg.DATASETS.TEST:
        DatasetCatalog.get(name)


def _finite(obj):
    # COCOeval reports NaN for empty area ranges; JSON has no NaN, so write null
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):  # numpy scalars
        return _finite(obj.item())
    return obj


def _lvis_absent(results):
    """LVISEval's -1 (Detectron2 scales it to -100) means no ground truth in that group (APr of a
    test set without rare categories): null, as COCOeval's NaN is, not a score to average."""
    return {
        section: {k: None if v == -100 else v for k, v in scores.items()}
        if isinstance(scores, dict)
        else scores
        for section, scores in results.items()
    }


def _task(cfg, kind):
    # COCO's keypoint sets share evaluator_type "coco" with its instance sets
    return "coco_kp" if kind == "coco" and cfg.MODEL.KEYPOINT_ON else _TASKS[kind]


def write_final_metrics(cfg, args, results, **extra):
    """Write ``OUTPUT_DIR/final_metrics.json`` from ``DefaultTrainer.test`` results; return its path.

    ``metrics`` holds the first test set's scores ({"bbox": {"AP", "AP50", "AP75", ...}, "segm": ...});
    ``datasets`` holds every test set's.
    """
    test_sets = list(cfg.DATASETS.TEST)
    if not test_sets or results is None:
        raise ValueError("no evaluation results: set DATASETS.TEST to score the model")
    # DefaultTrainer.test unwraps the per-dataset dict when there is one test set
    per_dataset = {test_sets[0]: results} if len(test_sets) == 1 else dict(results)
    per_dataset = {
        name: _lvis_absent(scores) if evaluator_type(name) == "lvis" else scores
        for name, scores in per_dataset.items()
    }
    primary = test_sets[0]
    data = {
        "task": _task(cfg, evaluator_type(primary)),
        "dataset": primary,
        "metrics": per_dataset[primary],
        "datasets": per_dataset,
        "config_file": os.path.abspath(args.config_file),
        "weights": cfg.MODEL.WEIGHTS,
        "seed": cfg.SEED,
        "iterations": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "device": cfg.MODEL.DEVICE,
        # torch and the CPU kernels' instruction set / the GPU: AP differs across them
        "kernels": kernels(cfg.MODEL.DEVICE),
        "world_size": comm.get_world_size(),
        "eval_only": bool(args.eval_only),
        "opts": list(args.opts),
    }
    data.update(extra)
    path = os.path.join(cfg.OUTPUT_DIR, FINAL_METRICS)
    atomic_write_json(path, _finite(data))
    logger.info("final metrics written to %s", path)
    return path


def effective_schedule(cfg, world_size):
    """``cfg`` as ``DefaultTrainer`` trains it in ``world_size`` processes: Detectron2's
    ``auto_scale_workers`` (unchanged when ``SOLVER.REFERENCE_WORLD_SIZE`` is 0 or equal to
    ``world_size``), whose bare assert on the batch becomes one line naming both keys."""
    ref, batch = cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH
    if ref < 0 or (ref and batch % ref):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {batch} is not a multiple of SOLVER.REFERENCE_WORLD_SIZE {ref} "
            f"(the GPUs the batch is written for); give a multiple, or SOLVER.REFERENCE_WORLD_SIZE 0 "
            "to train with IMS_PER_BATCH, BASE_LR and MAX_ITER as written"
        )
    return DefaultTrainer.auto_scale_workers(cfg, world_size)


def schedule_line(cfg, world_size):
    """One line: the schedule ``world_size`` processes train with, and where it comes from."""
    s = effective_schedule(cfg, world_size).SOLVER
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if ref and ref != world_size:
        source = f"scaled from SOLVER.REFERENCE_WORLD_SIZE {ref} by Detectron2's rule"
    elif ref:
        source = "as written for this world size"
    else:
        source = "as written (SOLVER.REFERENCE_WORLD_SIZE 0: no scaling)"
    return (
        f"schedule: world size {world_size}, IMS_PER_BATCH {s.IMS_PER_BATCH} "
        f"({s.IMS_PER_BATCH // world_size} per process), BASE_LR {s.BASE_LR:g}, MAX_ITER "
        f"{s.MAX_ITER}, STEPS {tuple(s.STEPS)}, WARMUP_ITERS {s.WARMUP_ITERS} ({source})"
    )


def _num_images(names):
    return sum(len(DatasetCatalog.get(n)) for n in names)


def main(args):
    """One process's work: train (or evaluate) and write ``final_metrics.json``; returns results."""
    cfg = setup_cfg(args)
    prepare_datasets(cfg)
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the backbone starts from random initialization")
    if args.eval_only:
        model = DetectionTrainer.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_partial_weights=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS
        )
        checkpoint = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        start = time.perf_counter()
        results = DetectionTrainer.test(cfg, model)
        seconds = time.perf_counter() - start
        extra = {"eval_seconds": seconds, "test_images": _num_images(cfg.DATASETS.TEST)}
        extra["s_per_test_image"] = seconds / max(1, extra["test_images"])
        # a training checkpoint knows its iteration; converted weights (.pkl) were never fine-tuned
        extra["iterations"] = int(checkpoint["iteration"]) + 1 if "iteration" in checkpoint else 0
    else:
        trainer = DetectionTrainer(cfg)
        cfg = trainer.cfg  # the schedule it trains with (auto_scale_workers), in final_metrics.json
        trainer.resume_or_load(resume=args.resume)
        start = time.perf_counter()
        trainer.train()
        checkpointer = trainer.checkpointer
        extra = {"train_seconds": time.perf_counter() - start}
        times = (
            trainer.storage.history("time").values()
            if "time" in trainer.storage.histories()
            else []
        )
        if times:  # IterationTimer's per-iteration time, hooks (PreciseBN, eval) excluded
            extra["s_per_iter"] = sum(t for t, _ in times) / len(times)
        # DefaultTrainer's EvalHook stores the last evaluation here (it always runs after training)
        results = getattr(trainer, "_last_eval_results", None)
    # which file filled how many backbone tensors (None: random init); tools/report.py checks it
    extra["weights_load"] = checkpointer.weights_load
    if comm.is_main_process():
        # what the initial weights were, not only where: the report shows it (a file rewritten in
        # place keeps its name)
        weights = cfg.MODEL.WEIGHTS
        extra["weights_sha256"] = file_io.file_sha256(weights) if os.path.isfile(weights) else None
        write_final_metrics(cfg, args, results, **extra)
    return results


def run(args, prog="train_net.py"):
    """Validate the command line in this process, then ``launch`` :func:`main` (the CLI entry);
    prints (as ``prog``) the output folder first and the metrics file last."""
    world_size = args.num_gpus * args.num_machines
    if args.num_gpus < 1:
        raise ValueError(f"--num-gpus {args.num_gpus}: must be at least 1")
    if world_size > 1 and torch.cuda.device_count() < args.num_gpus:
        raise ValueError(
            f"--num-gpus {args.num_gpus} --num-machines {args.num_machines}: this machine has "
            f"{torch.cuda.device_count()} CUDA GPUs; Detectron2's DefaultTrainer needs one GPU per "
            "process (on CPU use --num-gpus 1 --num-machines 1)"
        )
    # fail here with one clear line rather than inside every spawned worker
    cfg = load_cfg(args.config_file, args.opts, world_size=world_size)
    process_group_timeout(cfg.DIST.TIMEOUT_MINUTES)
    file_io.check_output_dir(cfg.OUTPUT_DIR)  # before anything (the logger) writes there
    print(f"{prog}: output folder {cfg.OUTPUT_DIR}", flush=True)
    if not args.eval_only:
        print(f"{prog}: {schedule_line(cfg, world_size)}", flush=True)
    prepare_datasets(cfg)
    check_test_annotations(cfg)
    weights = cfg.MODEL.WEIGHTS
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not resuming and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: no such file")
    if args.machine_rank != 0:  # machine 0 holds the folder's lock
        return _launch(args, cfg)
    # a start that fails (bad weights, data) leaves no folder to refuse the corrected run
    with file_io.locked_new_run(cfg.OUTPUT_DIR, started=(*file_io.STARTED_FILES, FINAL_METRICS)):
        if not (args.resume or args.eval_only):  # an evaluation writes no checkpoints
            file_io.check_folder_config(cfg.OUTPUT_DIR, cfg.dump(), "pass --resume")
            _check_no_earlier_run(cfg.OUTPUT_DIR)
        for name in file_io.remove_stale_temp_files(cfg.OUTPUT_DIR):
            logger.warning("removed %s: a partial write of an earlier, killed run", name)
        result = _launch(args, cfg)
    print(
        f"{prog}: wrote {os.path.join(cfg.OUTPUT_DIR, FINAL_METRICS)} (AP: tools/report.py); "
        f"curves: tensorboard --logdir {cfg.OUTPUT_DIR}"
    )
    return result


def _check_no_earlier_run(folder):
    """A fresh start never trains again over a finished or interrupted run of the same config
    (Detectron2 would retrain and append to its metrics.json)."""
    pointer = os.path.join(folder, "last_checkpoint")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            found = f"last checkpoint {os.path.join(folder, f.read().strip())}"
    elif os.path.isfile(os.path.join(folder, FINAL_METRICS)):
        found = os.path.join(folder, FINAL_METRICS)
    else:
        return
    raise ValueError(
        f"OUTPUT_DIR {folder} holds a run ({found}); continue it with --resume, or give "
        "another OUTPUT_DIR"
    )


def _launch(args, cfg):
    """Detectron2's launch of :func:`main` (moco.utils.launch: DIST.TIMEOUT_MINUTES, a timed-out
    collective names the silent ranks)."""
    spec = LaunchSpec(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)
    return launch_processes(main, spec, (args,), timeout_minutes=cfg.DIST.TIMEOUT_MINUTES)

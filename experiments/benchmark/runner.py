"""Side-by-side pretraining throughput: moco-det's fast path against the official algorithm.

One run measures every row of a group in interleaved repetitions (A, B, C, A, B, C, ...), so slow
drifts of a shared machine hit all rows alike; the report gives the median, the min-max spread and
the ratio to the group's baseline. Groups:

* ``model`` -- one pretraining step (forward, InfoNCE loss, backward, SGD step; the momentum update
  and the enqueue happen inside the forward) on synthetic image tensors:
  ``official``: :class:`experiments.benchmark.official.OfficialMoCo`, a line-by-line re-implementation of facebookresearch/moco's
  ``builder.py`` + ``main_moco.py`` step (fp32, per-parameter momentum loop on ``.data``, queue
  cloned every step, slice enqueue with a host-read pointer, ``torch.optim.SGD`` defaults);
  ``moco-det``: :class:`moco.modeling.moco.MoCo` with :class:`moco.fast.FastPath` (bf16 autocast where
  the hardware has it, channels_last, fused SGD, foreach momentum update, no queue copy);
  ``lightly``: lightly's MoCo blocks (MoCoProjectionHead, NTXentLoss with a memory bank,
  update_momentum) on the same backbone and batch, when ``import lightly`` works.
  One process has no cross-GPU Shuffle BN, so official and moco-det both use split BN with the
  same groups (the official CIFAR demo's emulation); lightly's example uses plain BN.
* ``momentum`` -- the key-encoder update alone: official loop vs moco-det's foreach update.
* ``data`` -- two-crop augmentation from JPEG files through a DataLoader with ``workers``
  processes, images/s: the official PIL pipeline vs :func:`moco.data.augment.pretrain_transform`
  ``fast=True`` with :class:`moco.data.augment.JpegDraftLoader`. Every repetition starts a fresh
  iterator, consumes 2 x workers batches untimed (start-up, the workers' initial burst) and
  times whole rounds of the workers (:func:`loader_schedule`).
* ``e2e`` -- data and step together (official loader + official step vs fast loader + fast step),
  timed the same way, so a data bottleneck shows as a slower step.
* ``startup`` -- seconds from the start of a fresh process to the first batch of its training
  loader (interpreter, imports, dataset, workers; the data rows' fast loader and transform), one
  process per repetition: torchvision's ``ImageFolder`` (the baseline) against
  :class:`moco.data.checks.CheckedImageFolder` with DATA.SCAN_IMAGES ``always`` (scan cache removed
  first, then reused), ``never`` and ``auto``. The cold row removes the folder's scan cache. CPU
  time is the process tree's. The 100,000-file run of docs/RESULTS.md: ``--rows startup --data DIR
  --data-per-class 10000``.
* ``detstartup`` -- the same for detection (:mod:`experiments.benchmark.det_startup`): plain
  Detectron2's ``DefaultTrainer.build_train_loader`` on its builtin ``coco_2017_train`` (the
  baseline) against the toolkit's start (annotation checks, ``DATALOADER.SCAN_IMAGES`` always cold
  / warm, never, auto), on a generated COCO layout. The 100,000-image run of docs/RESULTS.md:
  ``--rows detstartup --data DIR --det-images 100000``.

``time_detectron2_iteration`` times Detectron2 fine-tuning iterations of a config (the paper's
VOC R50-C4) on synthetic inputs at the config's input sizes.
"""

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

# the settings live in a torch-free module, so tools/benchmark.py --help answers at once
from experiments.benchmark.child import time_child_start
from experiments.benchmark.config import BASELINE, BASELINES, GROUPS, resolve_image_folder
from experiments.benchmark.det_startup import DetStartupRunner, detstartup_rows
from experiments.benchmark.official import OfficialMoCo, official_train_step
from experiments.benchmark.undo_log import UndoLogMoCo
from moco import config as moco_config
from moco import fast as fastlib
from moco.data.augment import JpegDraftLoader, pretrain_transform
from moco.data.batch_augment import BatchAugment, batch_source_transform
from moco.data.checks import CheckedImageFolder, scan_cache_path, scan_wanted
from moco.modeling.moco import MoCo
from moco.modeling.resnet import resnet_encoder
from moco.utils.launch import resolve_device

# ------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class Row:
    group: str
    name: str
    unit: str  # what one timing covers: step, update, batch
    images_per_unit: int  # 0 when images/s does not apply
    detail: str = ""
    status: str = "ok"
    seconds: list = dataclasses.field(default_factory=list)  # per unit, one entry per repetition
    cpu_seconds: list = dataclasses.field(default_factory=list)  # this process's CPU time, same
    ratio: float = None  # images/s (or speed) relative to the group's baseline row
    cpu_ratio: float = None  # the same from CPU time

    @property
    def median(self):
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_cpu(self):
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def images_per_s(self):
        if not self.seconds or not self.images_per_unit:
            return None
        return self.images_per_unit / self.median

    def to_dict(self):
        ok = bool(self.seconds)
        return {
            "group": self.group,
            "name": self.name,
            "detail": self.detail,
            "status": self.status,
            "unit": self.unit,
            "images_per_unit": self.images_per_unit,
            "seconds_per_unit": self.seconds,
            "median_ms": self.median * 1e3 if ok else None,
            "min_ms": min(self.seconds) * 1e3 if ok else None,
            "max_ms": max(self.seconds) * 1e3 if ok else None,
            "cpu_seconds_per_unit": self.cpu_seconds,
            "median_cpu_ms": self.median_cpu * 1e3 if self.cpu_seconds else None,
            "images_per_s": self.images_per_s,
            "ratio_vs_baseline": self.ratio,
            "cpu_ratio_vs_baseline": self.cpu_ratio,
        }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock():
    return time.perf_counter(), time.process_time()


def _per_unit(start, units):
    """(wall, CPU) seconds per unit since ``start`` (from :func:`_clock`).

    CPU time is this process's (all its threads, not DataLoader workers); on a shared machine it
    moves far less than wall time when other jobs take the cores.
    """
    wall, cpu = _clock()
    return (wall - start[0]) / units, (cpu - start[1]) / units


# ------------------------------------------------------------------------------------------------
# the rows' runners: each has warm() and run() -> seconds per unit


class _StepRunner:
    """Timed training steps on fixed synthetic tensors (model rows)."""

    def __init__(self, step, batch, device, steps):
        self.step, self.batch, self.device, self.steps = step, batch, device, steps

    def warm(self, n):
        for _ in range(n):
            self.step(*self.batch)
        _sync(self.device)

    def run(self):
        _sync(self.device)
        start = _clock()
        for _ in range(self.steps):
            self.step(*self.batch)
        _sync(self.device)
        return _per_unit(start, self.steps)


class _MomentumRunner:
    def __init__(self, update, device, updates):
        self.update, self.device, self.updates = update, device, updates

    def warm(self, n):
        for _ in range(max(1, n)):
            self.update()
        _sync(self.device)

    def run(self):
        _sync(self.device)
        start = _clock()
        for _ in range(self.updates):
            self.update()
        _sync(self.device)
        return _per_unit(start, self.updates)


class _LoaderRunner:
    """A fresh DataLoader iterator per repetition, timed in steady state.

    Each of the W workers builds whole batches and keeps up to 2 ready, so the first ~2W batches
    arrive in bursts after start-up; they are consumed untimed (``fill``), then ``timed`` batches
    (a multiple of W, whole rounds of the workers) are timed. With ``step`` (e2e rows) every batch
    goes to the device and through a training step, so a data bottleneck shows as a slower step.
    """

    def __init__(self, loader, fill, timed, device, step=None, channels_last=False, augment=None):
        self.loader, self.fill, self.timed, self.device = loader, fill, timed, device
        self.step, self.channels_last, self.augment = step, channels_last, augment

    def _consume(self, batch):
        if self.augment is not None:  # uint8 images: both crops drawn on the device
            images = batch[0].to(self.device, non_blocking=True)
            im_q, im_k = self.augment(images), self.augment(images)
        else:
            (im_q, im_k), _ = batch
        if self.step is not None:
            self.step(
                fastlib.to_device(im_q, self.device, self.channels_last),
                fastlib.to_device(im_k, self.device, self.channels_last),
            )

    def warm(self, n):
        pass  # every repetition reaches steady state itself (``fill``)

    def run(self):
        it = iter(self.loader)
        try:
            for _ in range(self.fill):
                self._consume(next(it))
            _sync(self.device)
            start = _clock()
            for _ in range(self.timed):
                self._consume(next(it))
            _sync(self.device)
            return _per_unit(start, self.timed)
        finally:
            del it  # shuts the workers down before the next row runs


# where a start-up row's scan cache goes when the folder is not writable (scan_cache_path)
STARTUP_CACHE_DIR = os.path.join(tempfile.gettempdir(), "moco_det_benchmark")


class _StartupRunner:
    """One fresh process per repetition (:func:`startup_child`), timed from its start to its first
    batch; ``cold``: the folder's scan cache is removed first."""

    def __init__(self, folder, scan, cfg, cold=False):
        self.cold = cold
        self.spec = json.dumps(
            {
                "folder": folder,
                "scan": scan,
                "image_size": cfg.image_size,
                "batch_size": cfg.batch_size,
                "workers": cfg.workers,
                "v2": cfg.mlp,
                "cache_dir": STARTUP_CACHE_DIR,
            }
        )
        self.cache = scan and scan_cache_path(folder, STARTUP_CACHE_DIR)

    def warm(self, n):
        for _ in range(n):
            self.run()

    def run(self):
        if self.cold and self.cache and os.path.exists(self.cache):
            os.remove(self.cache)
        code = (
            "import json, sys; from experiments.benchmark.runner import startup_child; "
            "startup_child(json.loads(sys.argv[1]))"
        )
        return time_child_start(code, self.spec, "start-up")


def startup_child(spec):
    """A start-up row's process: build the dataset (``scan`` None: torchvision's ImageFolder), a
    shuffling DataLoader with ``workers`` processes, take its first batch, say so on stdout."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    transform = pretrain_transform(spec["image_size"], spec["v2"], fast=True)
    loader = JpegDraftLoader(spec["image_size"])
    if spec["scan"] is None:
        dataset = ImageFolder(spec["folder"], transform=transform, loader=loader)
    else:
        dataset = CheckedImageFolder(
            spec["folder"],
            transform=transform,
            loader=loader,
            scan=spec["scan"],
            cache_dir=spec["cache_dir"],
        )
    batches = DataLoader(
        dataset,
        batch_size=spec["batch_size"],
        shuffle=True,
        num_workers=spec["workers"],
        generator=torch.Generator().manual_seed(0),
    )
    next(iter(batches))
    print(f"first batch of {len(dataset)} images", flush=True)


def startup_rows(folder):
    """(name, scan mode, cold, detail) of the start-up rows; auto's detail says what it chose."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    n = sum(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder) for f in files)
    auto = "full scan" if scan_wanted("auto", n) else "no scan"
    checked = "CheckedImageFolder, DATA.SCAN_IMAGES"
    return (
        ("imagefolder", None, False, f"torchvision ImageFolder, {n} files, no check"),
        ("scan always cold", "always", True, f"{checked} always, no scan cache"),
        ("scan always warm", "always", False, f"{checked} always, the scan cache of the row above"),
        ("scan never", "never", False, f"{checked} never: load-time check only"),
        (
            "scan auto",
            "auto",
            False,
            f"{checked} auto: {auto} ({n} files, threshold {moco_config.SCAN_AUTO_MAX_FILES})",
        ),
    )


def loader_schedule(workers, at_least):
    """(untimed, timed) batches per repetition: 2W to reach steady state, then whole rounds."""
    w = max(1, workers)
    return 2 * w, w * math.ceil(at_least / w)


def _loader(folder, cfg, fast, device, images, batched=False):
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    crop = cfg.image_size
    kwargs = {"loader": JpegDraftLoader(crop)} if fast and not batched else {}
    transform = (
        batch_source_transform(int(round(1.5 * crop)))
        if batched
        else pretrain_transform(crop, cfg.mlp, fast=fast)
    )
    dataset = ImageFolder(folder, transform=transform, **kwargs)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=images, generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )


# ------------------------------------------------------------------------------------------------
# building the rows


def _official(cfg, device):
    torch.manual_seed(cfg.seed)
    groups = cfg.split_bn_groups if cfg.shuffle_bn == "split" else 1
    model = OfficialMoCo(
        resnet_encoder(cfg.arch), 128, cfg.K, cfg.m, cfg.temperature, cfg.mlp, groups
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss().to(device)

    def step(im_q, im_k):
        return official_train_step(model, optimizer, criterion, im_q, im_k)

    return model, step


def _moco_det(cfg, device, path, state_dict, model_cls=MoCo):
    model = model_cls(
        resnet_encoder(cfg.arch),
        128,
        cfg.K,
        cfg.m,
        cfg.temperature,
        cfg.mlp,
        shuffle_bn=cfg.shuffle_bn,
        split_bn_groups=cfg.split_bn_groups,
    )
    model = model.to(device)
    model.load_state_dict(state_dict)  # same start as the official row: the formats agree
    model = fastlib.prepare_model(model, path.channels_last, path.compile)
    optimizer = fastlib.sgd(model.parameters(), 0.03, 0.9, 1e-4, device, fused=path.fused_sgd)

    def step(im_q, im_k):
        return fastlib.moco_train_step(model, optimizer, im_q, im_k, path.amp, device)

    return model, step


def _lightly(cfg, device):
    """lightly's MoCo building blocks on the same backbone; raises ImportError if not installed."""
    import copy

    import lightly  # noqa: F401
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    torch.manual_seed(cfg.seed)
    backbone = resnet_encoder(cfg.arch)()
    feat = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = MoCoProjectionHead(feat, feat, 128) if cfg.mlp else nn.Linear(feat, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    for mod in (backbone, head, backbone_m, head_m):
        mod.to(device)
    try:
        criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.K, 128))
    except (TypeError, ValueError):  # lightly < 1.5 takes the bank size as an int
        criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=cfg.K)
    criterion = criterion.to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)

    def step(im_q, im_k):
        update_momentum(backbone, backbone_m, cfg.m)
        update_momentum(head, head_m, cfg.m)
        query = head(backbone(im_q))
        with torch.no_grad():
            key = head_m(backbone_m(im_k))
        loss = criterion(query, key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _describe(path):
    parts = [
        "bf16 autocast" if path.amp else "fp32",
        "channels_last" if path.channels_last else "NCHW",
        "fused SGD" if path.fused_sgd else "SGD",
        "foreach momentum",
        "queue clone",
    ]
    if path.compile:
        parts.append("torch.compile")
    return ", ".join(parts)


def build_rows(cfg, device):
    """(rows, runners): the runners of every requested group, keyed by row."""
    path = fastlib.FastPath.resolve(device, cfg.amp, cfg.channels_last, image_size=cfg.image_size)
    B, S = cfg.batch_size, cfg.image_size
    gen = torch.Generator().manual_seed(cfg.seed)
    batch_nchw = tuple(torch.randn(B, 3, S, S, generator=gen).to(device) for _ in range(2))
    batch_fast = tuple(fastlib.to_device(x, device, path.channels_last) for x in batch_nchw)

    rows, runners = [], {}
    if any(g in cfg.groups for g in ("model", "momentum", "e2e")):
        official, official_step = _official(cfg, device)
        fast_model, fast_step = _moco_det(cfg, device, path, official.state_dict())
    split = f"split BN x{cfg.split_bn_groups}" if cfg.shuffle_bn == "split" else "plain BN"

    def add(row, runner):
        rows.append(row)
        if runner is not None:
            runners[id(row)] = runner

    if "model" in cfg.groups:
        official_desc = f"fp32, loop momentum, queue clone, SGD default, {split}"
        add(
            Row("model", BASELINE, "step", B, official_desc),
            _StepRunner(official_step, batch_nchw, device, cfg.steps),
        )
        add(
            Row("model", "moco-det", "step", B, f"{_describe(path)}, {split}"),
            _StepRunner(fast_step, batch_fast, device, cfg.steps),
        )
        # the undo log the model used before 2026-12-04 instead of the clone (docs/RESULTS.md)
        _, ustep = _moco_det(cfg, device, path, official.state_dict(), UndoLogMoCo)
        udesc = _describe(path).replace("queue clone", "undo log, no queue copy")
        add(
            Row("model", "moco-det undo-log", "step", B, f"{udesc}, {split}"),
            _StepRunner(ustep, batch_fast, device, cfg.steps),
        )
        if cfg.compile:
            cpath = dataclasses.replace(path, compile=True)
            _, cstep = _moco_det(cfg, device, cpath, official.state_dict())
            add(
                Row("model", "moco-det + compile", "step", B, f"{_describe(cpath)}, {split}"),
                _StepRunner(cstep, batch_fast, device, cfg.steps),
            )
        try:
            lstep = _lightly(cfg, device)
        except ImportError as e:
            add(Row("model", "lightly", "step", B, status=f"not installed ({e})"), None)
        except Exception as e:  # an installed lightly whose API differs: report, keep measuring
            add(Row("model", "lightly", "step", B, status=f"failed: {type(e).__name__}: {e}"), None)
        else:
            import lightly

            version = getattr(lightly, "__version__", "?")
            desc = (
                f"lightly {version}: MoCoProjectionHead, NTXentLoss memory bank, "
                "update_momentum; fp32, plain BN"
            )
            add(
                Row("model", "lightly", "step", B, desc),
                _StepRunner(lstep, batch_nchw, device, cfg.steps),
            )

    if "momentum" in cfg.groups:
        n = cfg.momentum_updates
        add(
            Row(
                "momentum",
                BASELINE,
                "update",
                0,
                "for p_q, p_k: p_k.data = p_k.data * m + p_q.data * (1 - m)",
            ),
            _MomentumRunner(official._momentum_update_key_encoder, device, n),
        )
        add(
            Row("momentum", "moco-det", "update", 0, "torch._foreach_mul_ + _foreach_add_"),
            _MomentumRunner(fast_model._momentum_update_key_encoder, device, n),
        )

    if "data" in cfg.groups or "e2e" in cfg.groups:
        folder = resolve_image_folder(cfg.data)
        data_fill, data_timed = loader_schedule(cfg.workers, cfg.data_batches)
        e2e_fill, e2e_timed = loader_schedule(cfg.workers, cfg.steps)
        slack = 2 * max(1, cfg.workers)  # batches the workers may prefetch past the last one
        n_data = (data_fill + data_timed + slack) * B
        n_e2e = (e2e_fill + e2e_timed + slack) * B
        fast_desc = (
            f"JpegDraftLoader + fast {cfg.moco} transform (OpenCV hue/blur, fused "
            f"normalise), {cfg.workers} workers"
        )
        off_desc = f"torchvision PIL {cfg.moco} transform, {cfg.workers} workers"
        augment = BatchAugment(cfg.image_size, cfg.mlp).to(device)
        batch_desc = (
            f"INPUT.BATCH_AUGMENT: {cfg.workers} workers decode, {cfg.moco} crops "
            f"drawn per batch on {device.type}"
        )
        variants = (
            (BASELINE, False, off_desc, None),
            ("moco-det", True, fast_desc, None),
            ("moco-det batch", True, batch_desc, augment),
        )
        if "data" in cfg.groups:
            for name, is_fast, desc, aug in variants:
                loader = _loader(folder, cfg, is_fast, device, n_data, batched=aug is not None)
                add(
                    Row("data", name, "batch", B, desc),
                    _LoaderRunner(loader, data_fill, data_timed, device, augment=aug),
                )
        if "e2e" in cfg.groups:
            for name, is_fast, desc, aug in variants:
                step, cl = (fast_step, path.channels_last) if is_fast else (official_step, False)
                loader = _loader(folder, cfg, is_fast, device, n_e2e, batched=aug is not None)
                add(
                    Row(
                        "e2e",
                        name,
                        "step",
                        B,
                        desc + (" + fast step" if is_fast else " + official step"),
                    ),
                    _LoaderRunner(loader, e2e_fill, e2e_timed, device, step, cl, augment=aug),
                )

    if "startup" in cfg.groups:
        folder = resolve_image_folder(cfg.data)
        for name, scan, cold, desc in startup_rows(folder):
            add(
                Row("startup", name, "start", 0, f"{desc}, {cfg.workers} workers"),
                _StartupRunner(folder, scan, cfg, cold),
            )
    if "detstartup" in cfg.groups:
        for name, scan, cold, desc in detstartup_rows(cfg.data):
            add(
                Row("detstartup", name, "start", 0, f"{desc}, {cfg.workers} workers"),
                DetStartupRunner(cfg.data, scan, cfg.workers, cfg.det_ims_per_batch, cold),
            )
    return rows, runners, path


def measure(rows, runners, reps, warmup, log=None):
    """Interleaved repetitions within each group; fills ``row.seconds`` and ``row.ratio``."""
    for group in GROUPS:
        members = [r for r in rows if r.group == group and id(r) in runners]
        for row in members:
            try:
                runners[id(row)].warm(warmup)
            except torch.cuda.OutOfMemoryError as e:
                row.status = f"failed: out of memory ({str(e).splitlines()[0]})"
        members = [r for r in members if r.status == "ok"]
        for rep in range(reps):
            for row in members:
                wall, cpu = runners[id(row)].run()
                row.seconds.append(wall)
                row.cpu_seconds.append(cpu)
                if log:
                    ms = row.seconds[-1] * 1e3
                    log(f"{group:8s} {row.name:20s} rep {rep + 1}/{reps}: {ms:.1f} ms")
        base = next((r for r in members if r.name == BASELINES.get(group, BASELINE)), None)
        for row in members:
            if base is not None and base.seconds and row.seconds:
                row.ratio = base.median / row.median  # speed relative to the baseline
                row.cpu_ratio = base.median_cpu / row.median_cpu
    return rows


def environment(device):
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": fastlib.cpu_has_native_bf16(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = os.getloadavg()
    return env


def run_benchmark(cfg, log=None):
    """Build and measure every requested row; returns the JSON-ready report."""
    cfg.validate()
    device = resolve_device(cfg.device, "--device")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as main_moco.py, for every row
    env = environment(device)
    rows, runners, path = build_rows(cfg, device)
    measure(rows, runners, cfg.reps, cfg.warmup, log)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()
    return {
        "config": dataclasses.asdict(cfg),
        "fast_path": path.describe(),
        "environment": env,
        "rows": [r.to_dict() for r in rows],
    }


# ------------------------------------------------------------------------------------------------
# report


def _fmt(value, spec):
    return format(value, spec) if value is not None else "-"


def format_table(report):
    """The rows as a fixed-width text table."""
    lines = []
    g = max([9] + [len(r["group"]) + 1 for r in report["rows"]])  # "detstartup" is 10 wide
    header = (
        f"{'group':{g}s}{'row':20s}{'median ms':>11s}{'min-max ms':>19s}{'cpu ms':>10s}"
        f"{'img/s':>9s}{'x baseline':>11s}  detail"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['group']:{g}s}{r['name']:20s}{'':60s}  {r['status']}")
            continue
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        lines.append(
            f"{r['group']:{g}s}{r['name']:20s}{_fmt(r['median_ms'], '.1f'):>11s}{spread:>19s}"
            f"{_fmt(r.get('median_cpu_ms'), '.1f'):>10s}"
            f"{_fmt(r['images_per_s'], '.1f'):>9s}{_fmt(r['ratio_vs_baseline'], '.2f'):>11s}"
            f"  {r['detail']}"
        )
    return "\n".join(lines)


def write_json(report, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Detectron2 fine-tuning iterations


def _synthetic_detection_batch(cfg, n, gen):
    from detectron2.structures import Boxes, Instances

    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    batch = []
    for _ in range(n):
        short = int(sizes[int(torch.randint(len(sizes), (1,), generator=gen))])
        long_ = min(int(cfg.INPUT.MAX_SIZE_TRAIN), int(round(short * 4 / 3)))
        h, w = short, long_
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        k = int(torch.randint(2, 6, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(k, 2, generator=gen) * 0.25 + 0.05) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (k,), generator=gen)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def time_detectron2_iteration(
    config_file, ims_per_batch=2, iters=5, warmup=2, device="auto", opts=()
):
    """Seconds per Detectron2 training iteration (forward, losses, backward, SGD step) of
    ``config_file`` at its input sizes on synthetic images and boxes (no data loading).

    ``ims_per_batch`` is this process's batch (the paper: 16 over 8 GPUs = 2 per GPU).
    Returns a dict; ``status`` says "not installed" when Detectron2 cannot be imported.
    """
    try:
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer

        from detection.config import load_cfg
    except ImportError as e:
        return {"status": f"not installed ({e})"}
    dev = resolve_device(device, "--device")
    overrides = [
        "SOLVER.IMS_PER_BATCH",
        str(ims_per_batch),
        "MODEL.DEVICE",
        str(dev),
        "MODEL.WEIGHTS",
        "",
    ]
    cfg = load_cfg(config_file, list(overrides) + list(opts))
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK  # as Detectron2's default_setup
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(0)
    batches = [_synthetic_detection_batch(cfg, ims_per_batch, gen) for _ in range(2)]
    times = []
    try:
        _detection_iterations(model, optimizer, batches, dev, warmup, iters, times, config_file)
    except torch.cuda.OutOfMemoryError as e:
        return {
            "status": f"failed: out of memory ({str(e).splitlines()[0]})",
            "config_file": config_file,
            "ims_per_batch": ims_per_batch,
        }
    return {
        "status": "ok",
        "config_file": config_file,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "ims_per_batch": ims_per_batch,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
        "seconds_per_iter": times,
        "median_s": statistics.median(times),
        "images_per_s": ims_per_batch / statistics.median(times),
    }


def _detection_iterations(model, optimizer, batches, dev, warmup, iters, times, config_file):
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:  # the heads log to it, as in Detectron2's trainers
        for i in range(warmup + iters):
            batch = batches[i % len(batches)]
            _sync(dev)
            start = time.perf_counter()
            losses = sum(model(batch).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            value = float(losses.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"{config_file}: non-finite loss {value} in iteration {i}")
            storage.iter = i + 1

"""Linear classification on a frozen backbone, the protocol of facebookresearch/moco main_lincls.py.

A torchvision ResNet is built with ``num_classes`` outputs; every parameter except ``fc`` is frozen,
``fc`` is re-initialised (weight ~ N(0, 0.01), bias 0) and the whole model runs in eval mode, so
BatchNorm uses the pretrained running statistics and nothing but ``fc`` can change. After the
first epoch the backbone is compared with the pretrained weights tensor by tensor (official
``sanity_check``). SGD (lr 30, momentum 0.9, wd 0), lr x0.1 at each epoch in ``schedule``.

``pretrained`` may be a checkpoint of this toolkit or of facebookresearch/moco
(``module.encoder_q.*``), of MoCo v3 (``module.base_encoder.*``) or a plain torchvision ResNet
state_dict; files are loaded with ``weights_only=True``. Results (top-1/top-5 of every epoch) go
to ``lincls_results.json``; checkpoints ``checkpoint.pth.tar`` / ``model_best.pth.tar`` as official;
each logged step's loss and lr and each epoch's ``val_top1`` / ``val_top5`` / ``val_loss`` to
metrics.json and TensorBoard events (Detectron2's writers, as every run of the toolkit).
"""

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, EventStorage
from detectron2.utils.logger import setup_logger
from torch.utils.data import DistributedSampler

from moco import checkpoint as ckpt_lib
from moco.data.augment import imagenet_normalize
from moco.data.datasets import build_eval_loader, build_labeled_datasets, make_loader
from moco.fast import to_device
from moco.modeling.resnet import resnet_encoder
from moco.solver import epoch_lr_factors
from moco.utils import file_io
from moco.utils.hooks import build_writers
from moco.utils.launch import resolve_device

logger = logging.getLogger(__name__)

RESULTS_FILE = "lincls_results.json"
CHECKPOINT_FILE, BEST_FILE = "checkpoint.pth.tar", "model_best.pth.tar"  # official names
HEAD_KEYS = ("fc.weight", "fc.bias")
# (prefix of the backbone keys, format name), tried in this order
_PRETRAINED_FORMATS = (
    ("module.encoder_q.", "moco"),
    ("encoder_q.", "moco (no DDP prefix)"),
    ("module.base_encoder.", "moco_v3"),
    ("base_encoder.", "moco_v3 (no DDP prefix)"),
    ("module.", "torchvision (DDP prefix)"),
    ("", "torchvision"),
)


@dataclasses.dataclass
class LinclsOptions:
    """main_lincls.py's settings (same defaults); ``batch_size`` and ``workers`` are per process."""

    data: str = ""
    arch: str = "resnet50"
    workers: int = 4
    epochs: int = 100
    start_epoch: int = 0
    batch_size: int = 256
    lr: float = 30.0
    schedule: Sequence[int] = (60, 80)
    momentum: float = 0.9
    weight_decay: float = 0.0
    print_freq: int = 10
    resume: str = ""
    evaluate: bool = False
    pretrained: str = ""
    seed: int | None = None
    crop_size: int = 224
    output_dir: str = "."
    device: str = "auto"
    scan_images: str | None = None  # DATA.SCAN_IMAGES (None: its default)


def lincls_train_transform(crop_size):
    """main_lincls.py's training augmentation: random-resized crop and flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            imagenet_normalize(),
        ]
    )


def build_linear_model(arch, num_classes):
    """ResNet with everything but ``fc`` frozen and ``fc`` ~ N(0, 0.01), bias 0 (official)."""
    model = resnet_encoder(arch)(num_classes=num_classes)
    for name, param in model.named_parameters():
        if name not in HEAD_KEYS:
            param.requires_grad = False
    torch.nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    return model


def backbone_state(state_dict, path="<pretrained>"):
    """(torchvision-keyed backbone tensors without ``fc``, format name) of a pretrained state_dict."""
    for prefix, name in _PRETRAINED_FORMATS:
        keys = [k for k in state_dict if k.startswith(prefix)]
        if prefix and not keys:
            continue
        backbone = {
            k[len(prefix) :]: state_dict[k] for k in keys if not k[len(prefix) :].startswith("fc.")
        }
        if "conv1.weight" in backbone:
            return backbone, name
    raise ValueError(
        f"{path}: no ResNet backbone found (expected keys module.encoder_q.*, "
        "module.base_encoder.* or torchvision's conv1.weight ...)"
    )


def read_pretrained(path):
    """Backbone tensors and format name of a pretrained file (weights_only load)."""
    ckpt = ckpt_lib.load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state_dict' is not a dict")
    return backbone_state(state, path)


def load_pretrained(model, path, arch):
    """Load the backbone of ``path`` into ``model`` (built as ``arch``, named in errors); every
    non-fc weight must be present."""
    backbone, fmt = read_pretrained(path)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in HEAD_KEYS and k not in backbone)
    unexpected = sorted(k for k in backbone if k not in own)
    if missing or unexpected:
        raise ValueError(
            f"{path} ({fmt}) does not fit -a {arch}: {len(missing)} weights "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "check --arch"
        )
    bad = [k for k in backbone if tuple(backbone[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(
            f"{path}: {bad[0]} has shape {tuple(backbone[bad[0]].shape)} but "
            f"-a {arch} needs {tuple(own[bad[0]].shape)}; check --arch"
        )
    result = model.load_state_dict(backbone, strict=False)
    assert set(result.missing_keys) == set(HEAD_KEYS), result.missing_keys
    logger.info("loaded %s backbone from %s (%d tensors)", fmt, path, len(backbone))
    return fmt


def sanity_check(state_dict, pretrained_path):
    """Official check: every non-fc tensor still equals the pretrained one. Raises RuntimeError."""
    reference, _ = read_pretrained(pretrained_path)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for k, ref in reference.items():
        if not torch.equal(state_dict[k].detach().cpu(), ref.cpu()):
            raise RuntimeError(
                f"{k} is changed in linear classifier training (it must stay frozen "
                f"at the weights of {pretrained_path})"
            )
    logger.info("=> sanity check passed: the backbone equals %s", pretrained_path)


def _accuracy_counts(output, target):
    maxk = min(5, output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hit = pred == target[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


@torch.no_grad()
def validate(model, loader, device):
    """(top-1 %, top-5 %, mean loss) over the whole loader dataset (sharded under DDP)."""
    model.eval()
    c1 = c5 = n = 0
    loss_sum = 0.0
    for images, target in loader:
        images, target = to_device(images, device), target.to(device)
        out = model(images)
        loss_sum += float(F.cross_entropy(out, target, reduction="sum"))
        a, b = _accuracy_counts(out, target)
        c1, c5, n = c1 + a, c5 + b, n + target.shape[0]
    totals = (
        comm.all_gather((c1, c5, n, loss_sum))
        if comm.get_world_size() > 1
        else [(c1, c5, n, loss_sum)]
    )
    c1, c5, n, loss_sum = (sum(t[i] for t in totals) for i in range(4))
    if n == 0:
        raise ValueError("validation set is empty")
    return 100.0 * c1 / n, 100.0 * c5 / n, loss_sum / n


def check_new_run(output_dir):
    """A new training run never writes into an earlier run's files: one line naming the resume."""
    ckpt = os.path.join(output_dir, CHECKPOINT_FILE)
    if os.path.exists(ckpt):
        raise ValueError(
            f"--output-dir {output_dir} holds a linear classifier run ({ckpt}); "
            f"continue it with --resume {ckpt}, or give another "
            "--output-dir"
        )


def run_lincls(opts: LinclsOptions):
    """Train (or with ``evaluate`` only validate) the linear classifier; returns the results dict.

    Call in every process of a launch; rank 0 writes files.
    """
    os.makedirs(opts.output_dir, exist_ok=True)
    rank, world = comm.get_rank(), comm.get_world_size()
    for name in ("moco", "detectron2"):  # detectron2: its CommonMetricPrinter (progress, ETA)
        setup_logger(opts.output_dir, distributed_rank=rank, name=name, abbrev_name=name)
    if opts.seed is not None:
        seed_all_rng(opts.seed + rank)
    if opts.epochs < 1 or opts.batch_size < 1:
        raise ValueError(
            f"--epochs ({opts.epochs}) and --batch-size ({opts.batch_size}) must be >= 1"
        )
    device = resolve_device(opts.device, "device (--gpu)")
    train_set, val_set = build_labeled_datasets(
        opts.data,
        opts.crop_size,
        "DATA",
        lincls_train_transform(opts.crop_size),
        scan=opts.scan_images,
        cache_dir=opts.output_dir,
    )
    num_classes = len(train_set.classes)
    model = build_linear_model(opts.arch, num_classes)
    fmt = load_pretrained(model, opts.pretrained, opts.arch) if opts.pretrained else None
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias are trained"
    optimizer = torch.optim.SGD(
        params, opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
    )
    start_epoch, best_acc1, history = opts.start_epoch, 0.0, []
    if opts.resume:
        ckpt = ckpt_lib.load_checkpoint(opts.resume)
        try:
            model.load_state_dict(
                ckpt_lib.strip_prefix(ckpt["state_dict"], "module.")
                if all(k.startswith("module.") for k in ckpt["state_dict"])
                else ckpt["state_dict"]
            )
        except (KeyError, RuntimeError) as e:
            raise ValueError(
                f"--resume {opts.resume}: not a linear-classifier checkpoint of "
                f"-a {opts.arch} ({str(e).splitlines()[0]})"
            ) from None
        if ckpt.get("optimizer"):
            ckpt_lib.check_optimizer_state(ckpt["optimizer"], optimizer, f"--resume {opts.resume}")
            optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_acc1 = int(ckpt.get("epoch", 0)), float(ckpt.get("best_acc1", 0.0))
        history = list(ckpt.get("history", []))
        logger.info("resumed %s at epoch %d (best top-1 %.3f)", opts.resume, start_epoch, best_acc1)
    ddp = create_ddp_model(model, device_ids=[device.index] if device.type == "cuda" else None)
    pin = device.type == "cuda"
    val_loader = build_eval_loader(val_set, opts.batch_size, opts.workers, pin)
    results = {
        "arch": opts.arch,
        "pretrained": opts.pretrained or None,
        "pretrained_format": fmt,
        "num_classes": num_classes,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch_size_per_process": opts.batch_size,
        "world_size": world,
        "history": history,
    }

    def write_results(**extra):
        results.update(extra)
        if comm.is_main_process():
            file_io.atomic_write_text(
                os.path.join(opts.output_dir, RESULTS_FILE), json.dumps(results, indent=2) + "\n"
            )

    if opts.evaluate:
        top1, top5, loss = validate(ddp, val_loader, device)
        logger.info(" * Acc@1 %.3f Acc@5 %.3f", top1, top5)
        write_results(evaluate=True, top1=top1, top5=top5, val_loss=loss)
        return results

    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=opts.seed or 0
    )
    train_loader = make_loader(
        train_set, opts.batch_size, sampler, opts.workers, drop_last=False, pin_memory=pin
    )
    factors = epoch_lr_factors(opts.epochs, tuple(opts.schedule), 0.1, cos=False)
    iters = len(train_loader)
    # Detectron2's event storage and writers, as the trainers: console (ETA, median loss, lr),
    # metrics.json and TensorBoard events (rank 0)
    writers = build_writers(opts.output_dir, opts.epochs * iters) if comm.is_main_process() else []
    with EventStorage(start_epoch * iters) as storage, contextlib.ExitStack() as closing:
        for w in writers:
            closing.callback(w.close)
        for epoch in range(start_epoch, opts.epochs):
            sampler.set_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = opts.lr * factors[epoch]
            train_loss = _train_epoch(
                ddp, train_loader, optimizer, device, storage, writers, opts.print_freq
            )
            top1, top5, val_loss = validate(ddp, val_loader, device)
            # at the iteration after the epoch's steps (the writers skip those already written)
            storage.put_scalars(
                val_top1=top1, val_top5=top5, val_loss=val_loss, smoothing_hint=False
            )
            for w in writers:
                if not isinstance(w, CommonMetricPrinter):
                    w.write()
            is_best = top1 >= best_acc1
            best_acc1 = max(best_acc1, top1)
            # epochs count from 1 on the console and in the JSON (the number finished)
            logger.info(
                " * epoch %d/%d: Acc@1 %.3f Acc@5 %.3f (best %.3f; chance %.1f)",
                epoch + 1,
                opts.epochs,
                top1,
                top5,
                best_acc1,
                100.0 / num_classes,
            )
            history.append(
                {
                    "epoch": epoch + 1,
                    "lr": opts.lr * factors[epoch],
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "top1": top1,
                    "top5": top5,
                }
            )
            if comm.is_main_process():
                state = {
                    "epoch": epoch + 1,
                    "arch": opts.arch,
                    "state_dict": ckpt_lib.model_state_dict(ddp),  # module.* as official
                    "best_acc1": best_acc1,
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                }
                file_io.atomic_save(state, os.path.join(opts.output_dir, CHECKPOINT_FILE))
                if is_best:
                    file_io.atomic_save(state, os.path.join(opts.output_dir, BEST_FILE))
            if epoch == start_epoch and opts.pretrained:
                sanity_check(model.state_dict(), opts.pretrained)
            write_results(top1=top1, top5=top5, best_top1=best_acc1)
    comm.synchronize()
    return results


def _train_epoch(model, loader, optimizer, device, storage, writers, print_freq):
    """One epoch; each step's loss, lr and time go to ``storage``, every ``print_freq`` steps to
    ``writers`` (rank 0's console, metrics.json and TensorBoard; none elsewhere)."""
    model.eval()  # BN in eval mode: only the linear classifier is trained (official)
    total, n = 0.0, 0
    start = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        images, target = to_device(images, device), target.to(device)
        loss = F.cross_entropy(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * target.shape[0], n + target.shape[0]
        now = time.perf_counter()
        storage.put_scalars(
            loss=loss.item(),
            lr=optimizer.param_groups[0]["lr"],
            time=now - start,
            smoothing_hint=False,
        )
        start = now
        due = print_freq > 0 and ((i + 1) % print_freq == 0 or i + 1 == len(loader))
        if due:
            for w in writers:
                w.write()
        storage.step()
    return total / max(n, 1)

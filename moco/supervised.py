"""Supervised baseline pretraining: the same ResNet, images and budget as MoCo, with the labels.

It stands in for the paper's ImageNet-supervised weights ("super. IN-1M") where ImageNet is not at
hand, e.g. on the embedded synthetic set whose image-folder classes are the detection categories.
Same engine as MoCo pretraining (launch, per-epoch LR, samplers, writers, kNN monitor, official-
format checkpoints with resume); the differences are the model (a torchvision ResNet with a
classifier over the folder's classes), the augmentation (RandomResizedCrop(0.2-1) + flip: MoCo's
crop without the colour and blur augmentations, which a classifier does not need) and the loss
(cross-entropy on the labels). Plain BN: there are no keys to leak batch statistics into.

The final weights are also written as a plain torchvision state dict, ``model_final.pth``, the
format of torchvision's released ImageNet weights, which ``tools/convert_to_d2.py`` reads.
"""

import json
import logging
import os
import time

import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.engine.defaults import create_ddp_model
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm
from torchvision import transforms

from moco import checkpoint as ckpt_lib
from moco.augment import imagenet_normalize
from moco.builder import resnet_encoder
from moco.data import build_pretrain_loader, image_folder, tensor_batch_to
from moco.engine import (
    build_optimizer,
    launch_processes,
    resolve_device,
    setup_process,
    topk_accuracy,
)
from moco.hooks import build_epoch_hooks, build_lr_multiplier

logger = logging.getLogger("moco")

SUMMARY_FILE = "supervised_summary.json"
FINAL_WEIGHTS = "model_final.pth"


def supervised_transform(crop_size):
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        imagenet_normalize(),
    ])  # fmt: skip


def launch_supervised(cfg, spec, resume=None):
    """Run :func:`supervised_worker` in every process of ``spec`` (see moco.engine.LaunchSpec)."""
    return launch_processes(supervised_worker, spec, (cfg, resume))


def supervised_worker(cfg, resume=None):
    setup_process(cfg)
    return SupervisedTrainer(cfg, resume=resume).train()


class SupervisedTrainer(SimpleTrainer):
    """Cross-entropy training of ``MODEL.ARCH`` on ``DATA.ROOT/train`` with its class labels."""

    def __init__(self, cfg, resume=None):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        dataset = image_folder(cfg.DATA.ROOT, "train", supervised_transform(cfg.INPUT.CROP_SIZE),
                               "DATA.ROOT (DATA)")  # fmt: skip
        batch, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
        if batch % world or len(dataset) < batch:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {batch}: must divide over {world} processes and "
                             f"not exceed the {len(dataset)} training images")  # fmt: skip
        self.num_classes = len(dataset.classes)
        self.iters_per_epoch = len(dataset) // batch
        self.dataset_size = len(dataset)
        self.net = resnet_encoder(cfg.MODEL.ARCH)(num_classes=self.num_classes).to(self.device)
        optimizer = build_optimizer(cfg, self.net)
        self.max_iter = cfg.SOLVER.EPOCHS * self.iters_per_epoch

        path = ckpt_lib.resolve_resume(resume, cfg.OUTPUT_DIR)
        start_iter, seed = 0, cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        if path:
            ckpt = ckpt_lib.load_checkpoint(path)
            ckpt_lib.load_model_state(self.net, ckpt["state_dict"], path)
            optimizer.load_state_dict(ckpt["optimizer"])
            start_iter, seed = int(ckpt["iteration"]), int(ckpt["sampler_seed"])
            logger.info("resuming supervised training from %s at iteration %d", path, start_iter)
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.SOLVER.BASE_LR
        self.scheduler = LRMultiplier(optimizer, build_lr_multiplier(cfg), self.max_iter,
                                      last_iter=start_iter - 1)  # fmt: skip
        self.sampler_seed = int(seed)
        loader = build_pretrain_loader(cfg, dataset, self.iters_per_epoch, start_iter, self.sampler_seed,
                                       pin_memory=self.device.type == "cuda")  # fmt: skip
        ddp = create_ddp_model(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        super().__init__(ddp, loader, optimizer)
        self.start_iter = self.iter = self.completed_iters = start_iter
        self.knn_history, self.knn_num_classes = [], None
        self.last_checkpoint = path
        self.register_hooks(self.build_hooks())

    @property
    def encoder(self):
        """The network whose L2-normalised output the kNN monitor scores."""
        return self.net

    def build_hooks(self):
        return build_epoch_hooks(self, self.cfg)

    def run_step(self):
        start = time.perf_counter()
        images, labels = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        images = tensor_batch_to(images, self.device, self.cfg.MODEL.CHANNELS_LAST)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.SOLVER.AMP):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        acc1, _ = topk_accuracy(logits.detach(), labels)
        self._write_metrics({"loss": loss.detach()}, data_time)  # raises on NaN/inf
        acc = comm.reduce_dict({"acc1": acc1})
        if comm.is_main_process():
            self.storage.put_scalar("acc1", float(acc["acc1"]))
        self.optimizer.step()
        self.completed_iters = self.iter + 1

    def save_checkpoint(self, epoch):
        if comm.is_main_process():
            ckpt = ckpt_lib.build_checkpoint(
                self.net, self.optimizer, epoch, self.cfg.MODEL.ARCH, iteration=self.iter + 1,
                scheduler=self.scheduler.state_dict(), sampler_seed=self.sampler_seed,
                config=self.cfg.dump(),
            )  # fmt: skip
            self.last_checkpoint = ckpt_lib.save_checkpoint(ckpt, self.cfg.OUTPUT_DIR)
        comm.synchronize()

    def train(self):
        cfg = self.cfg
        if self.start_iter < self.max_iter:
            super().train(self.start_iter, self.max_iter)
        summary = {
            "arch": cfg.MODEL.ARCH,
            "num_classes": self.num_classes,
            "epochs": cfg.SOLVER.EPOCHS,
            "max_iter": self.max_iter,
            "knn": self.knn_history,
            "knn_chance": 100.0 / self.knn_num_classes if self.knn_num_classes else None,
            "last_checkpoint": self.last_checkpoint,
            "weights": os.path.join(cfg.OUTPUT_DIR, FINAL_WEIGHTS),
        }
        if comm.is_main_process():
            state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            ckpt_lib.atomic_save(state, summary["weights"])
            ckpt_lib.atomic_write_text(os.path.join(cfg.OUTPUT_DIR, SUMMARY_FILE),
                                       json.dumps(summary, indent=2) + "\n")  # fmt: skip
        return summary

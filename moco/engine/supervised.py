"""Supervised baseline pretraining: the same ResNet, images and budget as MoCo, with the labels.

It stands in for the paper's ImageNet-supervised weights ("super. IN-1M") where ImageNet is not at
hand, e.g. on the embedded synthetic set whose image-folder classes are the detection categories.
Same engine as MoCo pretraining (launch, per-epoch LR, samplers, writers, kNN monitor, official-
format checkpoints with resume); the differences are the model (a torchvision ResNet with a
classifier over the folder's classes), the augmentation (RandomResizedCrop(INPUT.MIN_SCALE-1) + flip: MoCo's
crop without the colour and blur augmentations, which a classifier does not need) and the loss
(cross-entropy on the labels). Plain BN: there are no keys to leak batch statistics into.

The final weights are also written as a plain torchvision state dict, ``model_final.pth``, the
format of torchvision's released ImageNet weights, which ``tools/convert_to_d2.py`` reads.
"""

import os

import torch
from torchvision import transforms

from moco.data.augment import imagenet_normalize
from moco.data.datasets import (
    build_eval_loader,
    build_labeled_datasets,
    folder_checks,
    image_folder,
    knn_data,
)
from moco.engine.trainer import PretrainTrainer
from moco.evaluation.lincls import validate
from moco.fast import autocast_context, to_device
from moco.modeling.resnet import resnet_encoder
from moco.utils import file_io
from moco.utils.run_files import SUPERVISED_SUMMARY

FINAL_WEIGHTS = "model_final.pth"


def supervised_transform(crop_size, min_scale=0.2):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            imagenet_normalize(),
        ]
    )


class SupervisedTrainer(PretrainTrainer):
    """Cross-entropy training of ``MODEL.ARCH`` on ``DATA.ROOT/train`` with its class labels.

    PretrainTrainer with another dataset, model and step input; resume, schedule, loader, hooks and
    checkpoints are the MoCo engine's.
    """

    summary_file = SUPERVISED_SUMMARY

    @classmethod
    def check_launch(cls, cfg, world_size):
        """Nothing before the processes start: each process checks in :meth:`validate`."""

    def validate(self, world_size):
        batch = self.cfg.SOLVER.IMS_PER_BATCH
        if batch < 1 or batch % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH {batch}: must be >= 1 and divide over {world_size} processes"
            )

    def build_dataset(self):
        dataset = image_folder(
            self.cfg.DATA.ROOT,
            "train",
            supervised_transform(self.cfg.INPUT.CROP_SIZE, self.cfg.INPUT.MIN_SCALE),
            "DATA.ROOT (DATA)",
            **folder_checks(self.cfg),
        )
        self.num_classes = len(dataset.classes)
        return dataset

    def build_model(self, dataset):
        return resnet_encoder(self.cfg.MODEL.ARCH)(num_classes=self.num_classes)

    @property
    def net(self):
        """The classifier (unwrapped)."""
        return self.moco

    @property
    def encoder(self):
        """The network whose L2-normalised output the kNN monitor scores."""
        return self.moco

    def forward_batch(self, batch):
        images, labels = batch
        images = to_device(images, self.device, self.fast.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.fast.amp):
            return self.model(images), labels

    def val_top1(self):
        """Top-1 accuracy (%) of the classifier on KNN.DATA's val/ (None without KNN.DATA):
        the learnability gate of the embedded study."""
        cfg = self.cfg
        if not knn_data(cfg):
            return None
        _, val = build_labeled_datasets(
            knn_data(cfg), cfg.INPUT.CROP_SIZE, "KNN.DATA (--knn-data)", **folder_checks(cfg)
        )
        loader = build_eval_loader(val, cfg.KNN.BATCH_SIZE, cfg.DATALOADER.NUM_WORKERS)
        was_training = self.net.training
        try:
            with torch.no_grad():
                return validate(self.net, loader, self.device)[0]
        finally:
            self.net.train(was_training)

    def build_summary(self):
        cfg = self.cfg
        return {
            "val_top1": self.val_top1(),
            "arch": cfg.MODEL.ARCH,
            "num_classes": self.num_classes,
            "epochs": cfg.SOLVER.EPOCHS,
            "max_iter": self.max_iter,
            "knn": self.knn_history,
            "knn_chance": 100.0 / self.knn_num_classes if self.knn_num_classes else None,
            "last_checkpoint": self.last_checkpoint,
            "weights": os.path.join(cfg.OUTPUT_DIR, FINAL_WEIGHTS),
        }

    def write_outputs(self, summary):
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        file_io.atomic_save(state, summary["weights"])
        super().write_outputs(summary)

"""PASCAL VOC 2012 semantic segmentation in Detectron2's catalogs (Detectron2 registers none).

``voc_2012_sem_seg_train_aug`` and ``voc_2012_sem_seg_val`` (the MoCo paper's appendix A.5:
"train_aug2012 set (augmented by [SBD], 10582 images)", evaluated on val2012) are registered at
import, under ``$DETECTRON2_DATASETS`` as Detectron2's builtin sets are::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClassAug/<id>.png       class indices 0-20, 255 ignored (one channel)
    VOC2012/ImageSets/Segmentation/{train_aug,val}.txt

``SegmentationClassAug`` is the usual one-channel form of VOC + SBD labels. VOC's own
``SegmentationClass`` PNGs are palette images, which Detectron2's ``DatasetMapper`` reads as
grayscale luminance, not as class indices: the loader refuses them in one line rather than train on
wrong labels. Scored by ``SemSegEvaluator`` (``evaluator_type`` "sem_seg"; mIoU over background +
the 20 classes).
"""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import CLASS_NAMES

__all__ = ["VOC_SEM_SEG_SPLITS", "load_voc_sem_seg", "register_voc_sem_seg"]

VOC_SEM_SEG_SPLITS = {"voc_2012_sem_seg_train_aug": "train_aug", "voc_2012_sem_seg_val": "val"}
LABELS = "SegmentationClassAug"
STUFF_CLASSES = ["background", *CLASS_NAMES]


def load_voc_sem_seg(dirname, split):
    """Detectron2 dataset dicts (``file_name``, ``sem_seg_file_name``, ``image_id``, size) of the
    ids in ``dirname/ImageSets/Segmentation/{split}.txt``; every label PNG checked as the embedded
    set's are (:func:`detection.data.task_formats.check_voc_sem_seg`: one channel, its image's size,
    class ids 0-20 or 255)."""
    from detection.data.task_formats import check_voc_sem_seg

    dicts = check_voc_sem_seg(dirname, split, len(CLASS_NAMES), masks=LABELS)
    for d in dicts:
        d["image_id"] = os.path.splitext(os.path.basename(d["file_name"]))[0]
    return dicts


def register_voc_sem_seg(root):
    """Register the two sets for the VOC2012 folder under ``root`` (names already registered are
    left as they are)."""
    dirname = os.path.join(root, "VOC2012")
    for name, split in VOC_SEM_SEG_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda d=dirname, s=split: load_voc_sem_seg(d, s))
        MetadataCatalog.get(name).set(
            dirname=dirname,
            split=split,
            stuff_classes=list(STUFF_CLASSES),
            ignore_label=255,
            evaluator_type="sem_seg",
        )


# as Detectron2's builtin sets (detectron2.data.datasets.builtin)
register_voc_sem_seg(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))

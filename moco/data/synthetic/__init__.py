"""Deterministic embedded data: an image folder, a Pascal VOC detection set and its COCO twin.

Layout under one root (docs/DESIGN.md)::

    imagefolder/{train,val}/<class>/<class>_NNNN.jpg     one object per image
    VOC2007/JPEGImages/NNNNNN.jpg                         several objects per image
    VOC2007/Annotations/NNNNNN.xml
    VOC2007/ImageSets/Main/{trainval,test}.txt
    coco/annotations/instances_{trainval,test}.json       same detection data, images in VOC2007/JPEGImages
    spec.json                                             manifest, written last

With ``SyntheticSpec.tasks`` (opt-in; ``spec.TASK_FORMATS``) also the paper's other task formats::

    coco/annotations/keypoints_{trainval,test}.json       keypoints: COCO keypoint JSON, 5 points
                                                          an object (``KEYPOINT_NAMES``), v 0/1/2
    lvis/lvis_v0.5_{trainval,test}.json                   lvis: federated (neg / not-exhaustive
                                                          ids per image), frequency r/c/f
    cityscapes/leftImg8bit/{train,val}/<city>/*.png       cityscapes: scenes of its own seed words,
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_*       8 shapes as Cityscapes' 8 thing classes
    VOC2007/SegmentationClass/NNNNNN.png                  voc_semseg: palette PNGs, 255 = void band
    VOC2007/SegmentationClassRaw/NNNNNN.png               the same as grey values (DeepLab's name)
    VOC2007/ImageSets/Segmentation/{trainval,test}.txt

The detection files are the same bytes with or without tasks; the keypoints follow each shape's
deformation and placement (no extra draws), and the LVIS and Cityscapes draws use their own seed
words, so no stream of the default set changes.

Content (generator version 2, designed for instance discrimination; docs/RESULTS.md has the
measurements behind it). Each of the ``CLASS_NAMES`` is a shape with its own texture family
(``TEXTURE_OF_CLASS``). What tells one instance from another is object content that clusters by
class: a per-instance deformation of the outline, the texture's period, phase and orientation, the
aspect ratio, and two grey levels from ``GREY_LEVELS``. Backgrounds are low-entropy (two colours of
a pool shared by all images and a smooth ramp) and objects stand nearly upright (tilt within
``MAX_TILT_DEG``), so neither the background nor the pose is an identity key that has nothing to do
with the class; in the classification images the object fills most of the frame. Version 1's
per-image clutter, random colours and free rotation made MoCo's kNN fall below the untrained
encoder's at CPU budgets.

Detection annotation rules (the visible part of an object is what VOC and COCO annotate):
  * objects are drawn in order, later ones on top; an object's visible mask is its in-image mask
    minus the masks of the objects kept above it;
  * an occluded object with less than ``MIN_VISIBLE_FRACTION`` of its in-image area visible, or
    fewer than ``MIN_VISIBLE_PIXELS`` visible pixels, is *not drawn at all* (so nothing unannotated
    remains);
  * a kept object with less than ``DIFFICULT_VISIBLE_FRACTION`` visible is ``difficult`` in VOC
    (ignored by the VOC evaluator, used in training by Detectron2); COCO has no such flag, so it is
    an ordinary annotation there -- both versions hold the same boxes;
  * ``truncated`` = the object's full shape extends beyond the image border;
  * boxes are the extent of the visible mask: VOC xmin..xmax are 1-based inclusive pixel indices,
    COCO bbox = [xmin-1, ymin-1, width, height]; COCO segmentation polygons trace the visible mask
    exactly (holes are joined to their outline by a zero-width cut, since COCO polygons are merged
    by union); area = visible pixel count.
  * the top-most object of detection image i has class ``i % num_classes``, so every class occurs
    in a split that has at least ``num_classes`` images (VOC AP is undefined for an absent class).

Determinism: every image draws from its own ``numpy.random.Generator`` seeded with
(seed, kind, split, class, index), so output does not depend on generation order or worker count;
JPEG quality is fixed and no timestamps are written. Same spec => byte-identical files.
"""

from moco.data.synthetic.render import (
    mask_to_polygons,
    render_classification_image,
    render_detection_image,
)
from moco.data.synthetic.spec import (
    CLASS_NAMES,
    CLS_SPLITS,
    DIFFICULT_VISIBLE_FRACTION,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    MAX_TILT_DEG,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    TEXTURE_OF_CLASS,
    VOC_SPLITS,
    VOC_YEAR,
    SyntheticSpec,
    default_synthetic_root,
)
from moco.data.synthetic.writers import ensure_generated, generate, is_generated, read_manifest

__all__ = [
    "CLASS_NAMES",
    "CLS_SPLITS",
    "DIFFICULT_VISIBLE_FRACTION",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "MAX_TILT_DEG",
    "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_PIXELS",
    "TEXTURE_OF_CLASS",
    "VOC_SPLITS",
    "VOC_YEAR",
    "SyntheticSpec",
    "default_synthetic_root",
    "ensure_generated",
    "generate",
    "is_generated",
    "mask_to_polygons",
    "read_manifest",
    "render_classification_image",
    "render_detection_image",
]

"""Detection data: the embedded sets registered in Detectron2's DatasetCatalog, the annotation and
image checks every training start runs (VOC XML, COCO JSON, boxes, unreadable images), and the
resumable training loader that makes ``--resume`` bit-identical.
"""

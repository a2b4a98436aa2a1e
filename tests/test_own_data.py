"""Your own detection data and checkpoints (issue 28): a COCO JSON or a VOC-layout folder named
from the command line (``DATASETS.REGISTER``), its class count checked at start against
``MODEL.ROI_HEADS.NUM_CLASSES`` for every TRAIN and TEST set, the toolkit's annotation checks on it.
"""

import json
import os
import shutil

import pytest
from conftest import load_tool
from test_train_net import TINY, VOC_CFG

NEW_IDS = (1, 2, 5)  # three classes whose ids are not contiguous: Detectron2 maps them to 0, 1, 2
NAMES = ("disk", "square", "star")


def write_coco_set(synthetic_root, folder):
    """A fresh COCO set of 3 classes (ids 1, 2, 5) from the embedded scenes: every object keeps
    its box, its class becomes one of the three. Returns {split: (json file, image folder)}."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    sets = {}
    for split in ("trainval", "test"):
        src = os.path.join(synthetic_root, "coco", "annotations", f"instances_{split}.json")
        with open(src) as f:
            data = json.load(f)
        for image in data["images"]:
            shutil.copy(
                os.path.join(synthetic_root, "VOC2007", "JPEGImages", image["file_name"]), images
            )
        for ann in data["annotations"]:
            ann["category_id"] = NEW_IDS[(ann["category_id"] - 1) % 3]
        data["categories"] = [{"id": i, "name": n} for i, n in zip(NEW_IDS, NAMES)]
        path = os.path.join(folder, f"{split}.json")
        with open(path, "w") as f:
            json.dump(data, f)
        sets[split] = (path, images)
    return sets


def register_opts(sets, prefix="mine"):
    """``DATASETS.REGISTER`` and TRAIN / TEST overrides naming ``sets`` as a user types them."""
    entries = [[f"{prefix}_{split}", "coco", *sets[split]] for split in ("trainval", "test")]
    return [
        "DATASETS.REGISTER",
        repr(entries),
        "DATASETS.TRAIN",
        f"('{prefix}_trainval',)",
        "DATASETS.TEST",
        f"('{prefix}_test',)",
    ]


def test_an_unknown_dataset_name_says_how_to_register_one(synthetic_datasets, tmp_path, capsys):
    main = load_tool("train_net").main
    argv = ["--config-file", VOC_CFG, "DATASETS.TRAIN", "('my_train',)"]
    assert main(argv + ["OUTPUT_DIR", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'my_train' is not a registered dataset" in err and "DATASETS.REGISTER" in err
    assert not os.path.exists(tmp_path / "o")


def test_a_registered_coco_set_gets_its_classes_checked_at_start_for_train_and_test(
    synthetic_root, tmp_path, capsys
):
    from detectron2.data import MetadataCatalog

    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    main = load_tool("train_net").main
    out = str(tmp_path / "o")
    # NUM_CLASSES left at the config's 10: one line at start naming the set and the value to set
    assert main(["--config-file", VOC_CFG, *register_opts(sets), "OUTPUT_DIR", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train_net.py: error: MODEL.ROI_HEADS.NUM_CLASSES is 10 but mine_trainval has 3 classes; "
        "set MODEL.ROI_HEADS.NUM_CLASSES 3"
    )
    assert not os.path.exists(out)  # nothing trained, nothing left behind
    meta = MetadataCatalog.get("mine_trainval")
    assert meta.thing_classes == list(NAMES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 5: 2}
    # the TEST set is checked too: a train set of 3 classes beside a test set of 10
    opts = register_opts(sets)[:4] + ["DATASETS.TEST", "('synthetic_voc_test',)"]
    argv = ["--config-file", VOC_CFG, *opts, "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    assert main(argv + ["OUTPUT_DIR", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "MODEL.ROI_HEADS.NUM_CLASSES is 3 but synthetic_voc_test has 10 classes; "
        "set MODEL.ROI_HEADS.NUM_CLASSES 10"
    ), err


def test_registered_sets_get_the_toolkits_annotation_checks(synthetic_root, tmp_path, capsys):
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    path = sets["test"][0]
    with open(path) as f:
        data = json.load(f)
    data["annotations"][0]["bbox"] = [5, 5, -3, 4]  # negative width
    with open(path, "w") as f:
        json.dump(data, f)
    argv = ["--config-file", VOC_CFG, *register_opts(sets, "checked")]
    argv += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "o")]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and "Traceback" not in err, err


def test_a_voc_layout_folder_registers_with_classes_from_its_annotations(synthetic_root, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.config import load_cfg
    from detection.data.datasets import CLASS_NAMES
    from detection.trainer import prepare_datasets

    voc = str(tmp_path / "myvoc")
    shutil.copytree(os.path.join(synthetic_root, "VOC2007"), voc)
    entries = [["myvoc_train", "voc", voc, "trainval"], ["myvoc_test", "voc", voc, "test"]]
    opts = ["DATASETS.REGISTER", repr(entries)]
    opts += ["DATASETS.TRAIN", "('myvoc_train',)", "DATASETS.TEST", "('myvoc_test',)"]
    cfg = load_cfg(VOC_CFG, opts + ["MODEL.ROI_HEADS.NUM_CLASSES", "4"])
    with pytest.raises(ValueError, match="myvoc_train has 10 classes; set .* 10"):
        prepare_datasets(cfg)
    prepare_datasets(load_cfg(VOC_CFG, opts))  # again in this process: the same files, kept
    meta = MetadataCatalog.get("myvoc_test")
    assert meta.thing_classes == sorted(CLASS_NAMES) and meta.evaluator_type == "pascal_voc"
    dicts = DatasetCatalog.get("myvoc_test")  # the checked loader, boxes as Detectron2 loads them
    assert len(dicts) == 12 and all(d["annotations"] for d in dicts)
    assert DatasetCatalog["myvoc_test"].func.__name__ == "load_voc_checked"


def test_bad_register_entries_are_one_line_naming_the_entry(synthetic_root, tmp_path, capsys):
    main = load_tool("train_net").main
    cases = [
        ("[['a', 'yolo', 'x.json', 'img']]", "DATASETS.REGISTER[0]", "not 'yolo'"),
        ("[['a', 'coco', 'nope.json', '.']]", "DATASETS.REGISTER[0]", "nope.json not found"),
        ("[['a', 'coco']]", "DATASETS.REGISTER[0]", "expected [name, 'coco'"),
        (f"[['a', 'voc', '{tmp_path}', 'train']]", "DATASETS.REGISTER[0]", "train.txt not found"),
        (
            f"[['synthetic_voc_test', 'voc', '{synthetic_root}/VOC2007', 'train']]",
            "DATASETS.REGISTER[0]",
            "train.txt not found",
        ),
    ]
    for value, where, message in cases:
        argv = ["--config-file", VOC_CFG, "DATASETS.REGISTER", value]
        assert main(argv + ["OUTPUT_DIR", str(tmp_path / "o")]) == 2, value
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and where in err and message in err, err
    # a name Detectron2 already holds for other files is refused, not silently replaced
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    value = repr([["voc_2007_test", "coco", *sets["test"]]])
    assert main(["--config-file", VOC_CFG, "DATASETS.REGISTER", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "'voc_2007_test' is already a registered dataset" in err, err


def test_a_registered_coco_set_fine_tunes_and_is_scored(synthetic_root, tmp_path):
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    out = str(tmp_path / "run")
    argv = ["--config-file", VOC_CFG, *TINY, *register_opts(sets, "tuned")]
    argv += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out]
    assert load_tool("train_net").main(argv) == 0
    with open(os.path.join(out, "final_metrics.json")) as f:
        data = json.load(f)
    assert (data["task"], data["dataset"]) == ("coco", "tuned_test")
    assert {"AP", "AP50", "AP75"} <= set(data["metrics"]["bbox"])
    # COCOEvaluator scored the 3 classes under their own ids (no "class=8" failure)
    assert {f"AP-{n}" for n in NAMES} <= set(data["metrics"]["bbox"])

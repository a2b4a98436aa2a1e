"""Detection start-up at scale (issue 27): DATALOADER.SCAN_IMAGES (always, never, auto) and a scan
cache per image folder, as image folders have (moco.data.checks), so a warm start decodes nothing."""

import os
import shutil

import pytest


@pytest.fixture
def voc_dicts(synthetic_root, tmp_path):
    """A copy of the embedded VOC2007 with image 000003.jpg cut short; (its dicts, JPEGImages)."""
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    from moco.data.synthetic.spec import CLASS_NAMES

    voc = str(tmp_path / "VOC2007")
    # without the scan cache an earlier test may have left in the shared set: a cold start here
    no_cache = shutil.ignore_patterns(".moco_det_scan*")
    shutil.copytree(os.path.join(synthetic_root, "VOC2007"), voc, ignore=no_cache)
    images = os.path.join(voc, "JPEGImages")
    with open(os.path.join(images, "000003.jpg"), "r+b") as f:
        f.truncate(300)
    return load_voc_instances(voc, "trainval", CLASS_NAMES), images


def _drop(dicts, scan, tmp_path, caplog):
    from detection.data.checks import drop_unreadable_images

    caplog.clear()
    with caplog.at_level("INFO", logger="moco.data.checks"):
        kept, dropped = drop_unreadable_images(list(dicts), "DATASETS.TRAIN t", 0.5, scan, tmp_path)
    return kept, dropped, caplog.text


def test_always_scans_once_then_reads_the_cache(voc_dicts, tmp_path, caplog):
    dicts, images = voc_dicts
    kept, dropped, log = _drop(dicts, "always", tmp_path, caplog)
    cache = os.path.join(images, ".moco_det_scan.json")
    assert (len(kept), dropped) == (11, 1) and os.path.isfile(cache)
    assert "decoded 12 of 12 files" in log
    assert all(not d["file_name"].endswith("000003.jpg") for d in kept)
    # warm: nothing decoded, the broken file still dropped from the cache's entry
    kept, dropped, log = _drop(dicts, "always", tmp_path, caplog)
    assert (len(kept), dropped) == (11, 1) and "decoded 0 of 12 files" in log
    # a changed file is decoded again: the repaired image is kept
    shutil.copy(os.path.join(images, "000001.jpg"), os.path.join(images, "000003.jpg"))
    kept, dropped, log = _drop(dicts, "always", tmp_path, caplog)
    assert (len(kept), dropped) == (12, 0) and "decoded 1 of 12 files" in log


def test_never_and_auto_above_its_bound_skip_the_scan(voc_dicts, tmp_path, caplog, monkeypatch):
    from moco import config

    dicts, images = voc_dicts
    kept, dropped, log = _drop(dicts, "never", tmp_path, caplog)
    assert (len(kept), dropped) == (12, 0) and "decoded" not in log
    assert not os.path.exists(os.path.join(images, ".moco_det_scan.json"))
    monkeypatch.setattr(config, "SCAN_AUTO_MAX_FILES", 11)
    assert _drop(dicts, "auto", tmp_path, caplog)[:2] == (dicts, 0)
    monkeypatch.setattr(config, "SCAN_AUTO_MAX_FILES", 12)
    kept, dropped, log = _drop(dicts, "auto", tmp_path, caplog)
    assert (len(kept), dropped) == (11, 1) and "decoded 12 of 12 files" in log


def test_the_scan_mode_is_a_config_key_checked_at_load(tmp_path):
    from test_train_net import VOC_CFG

    from detection.config import load_cfg
    from detection.data.checks import scan_mode

    assert scan_mode(load_cfg(VOC_CFG)) == "auto"
    assert scan_mode(load_cfg(VOC_CFG, ["DATALOADER.SCAN_IMAGES", "never"])) == "never"
    with pytest.raises(ValueError) as err:
        load_cfg(VOC_CFG, ["DATALOADER.SCAN_IMAGES", "sometimes"])
    assert str(err.value) == (
        "DATALOADER.SCAN_IMAGES must be one of auto, always, never, got 'sometimes'"
    )

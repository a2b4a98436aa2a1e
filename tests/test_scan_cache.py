"""DATA.SCAN_IMAGES and the scan cache: a later start decodes only new or changed files, a corrupt
or hostile cache is ignored with one warning (never run), ``never`` and ``auto`` above the threshold
leave broken files to the load-time path, bad values are one line. Decodes are counted by
replacing moco.data.checks.check_image; nothing is timed."""

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import REPO, folder_with_bad_files, load_tool
from torch.utils.data import DataLoader

import moco.data.checks as dc
from moco import config
from moco.data.augment import eval_transform
from moco.data.datasets import build_pretrain_dataset, image_folder

# tests/conftest.py's folder: 30 readable images in train/ + 3 unreadable ones
FILES, BAD = 33, 3
PRETRAIN_CFG = os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml")


@pytest.fixture
def folder(synthetic_root, tmp_path):
    """(train folder, its unreadable files), without a scan cache copied from the fixture."""
    bad = folder_with_bad_files(synthetic_root, tmp_path / "f")
    train = str(tmp_path / "f" / "train")
    if os.path.exists(os.path.join(train, dc.SCAN_CACHE_NAME)):
        os.remove(os.path.join(train, dc.SCAN_CACHE_NAME))
    return train, bad


@pytest.fixture
def decodes(monkeypatch):
    """The paths check_image decodes, in a list."""
    seen, check = [], dc.check_image

    def counting(path, max_pixels=None):
        seen.append(path)
        return check(path, max_pixels)

    monkeypatch.setattr(dc, "check_image", counting)
    return seen


def _folder(train, scan="always", **kwargs):
    return dc.CheckedImageFolder(train, what="DATA.ROOT", max_bad_fraction=0.1, scan=scan, **kwargs)


def _cache(train):
    with open(os.path.join(train, dc.SCAN_CACHE_NAME)) as f:
        return json.load(f)


def test_the_cache_is_reused_and_a_changed_file_is_scanned_again(folder, decodes, caplog):
    train, bad = folder
    first = _folder(train)
    assert len(decodes) == FILES and first.scan_skipped == BAD
    files = _cache(train)["files"]
    assert len(files) == FILES and "truncated" in files[os.path.relpath(bad[0], train)][2]

    decodes.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="moco.data.checks"):
        second = _folder(train)  # a later run or a resume
    assert decodes == []  # nothing decoded again ...
    assert second.samples == first.samples and second.scan_skipped == BAD  # ... bad files stay bad
    for path in bad:  # with their reason, one warning each, as at the first start
        assert sum(path in r.getMessage() for r in caplog.records) == 1, path
    assert "truncated" in caplog.text

    good = first.samples[4][0]
    st = os.stat(good)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same size, new mtime
    shutil.copyfile(first.samples[0][0], bad[0])  # a broken file replaced by a readable one
    decodes.clear()
    third = _folder(train)
    assert sorted(decodes) == sorted([good, bad[0]])
    assert third.scan_skipped == BAD - 1 and bad[0] in [p for p, _ in third.samples]
    assert _cache(train)["files"][os.path.relpath(bad[0], train)][2] is None


class _RunsCode:
    """Unpickling this runs ``open(<marker>, "w")``: a cache must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _entries(files):
    return {"format": "moco-det image scan", "version": 1, "max_pixels": 89478485, "files": files}


@pytest.mark.parametrize(
    "content",
    [
        "pickle",
        b"\x80\x04 not json",
        b'{"format": "moco-det image scan", "version": 1, "files": {"a.jpg": [1, 2',  # cut short
        b"[" * 100_000 + b"]" * 100_000,  # nesting: a RecursionError in the parser
        json.dumps(["a list"]).encode(),
        json.dumps(_entries({"disk/disk_0000.jpg": ["1174", 5, None]})).encode(),
        json.dumps(_entries({"disk/disk_0000.jpg": [1174, 5, {"reason": 1}]})).encode(),
        json.dumps(_entries([])).encode(),
        json.dumps({**_entries({}), "version": 2}).encode(),
        json.dumps({**_entries({}), "max_pixels": "many"}).encode(),
        b" " * (4096 * FILES + 65537),  # larger than a cache of the folder can be: not parsed
    ],
    ids=[
        "pickle",
        "binary",
        "truncated",
        "deep",
        "list",
        "str-size",
        "dict-reason",
        "files-list",
        "version",
        "max-pixels-type",
        "too-large",
    ],
)
def test_a_corrupt_or_hostile_cache_is_ignored_with_one_warning_and_never_run(
    folder, decodes, caplog, tmp_path, content
):
    train, _ = folder
    marker = tmp_path / "ran"
    if content == "pickle":
        content = pickle.dumps(_RunsCode(str(marker)))
    cache = os.path.join(train, dc.SCAN_CACHE_NAME)
    with open(cache, "wb") as f:
        f.write(content)
    with caplog.at_level("WARNING", logger="moco.data.checks"):
        ds = _folder(train)
    warnings = [r.getMessage() for r in caplog.records if "scan cache" in r.getMessage()]
    assert len(warnings) == 1 and f"ignoring the scan cache {cache}" in warnings[0], warnings
    assert "\n" not in warnings[0] and len(warnings[0]) < 600
    assert len(decodes) == FILES and ds.scan_skipped == BAD  # scanned again, same result
    assert len(_cache(train)["files"]) == FILES  # and a valid cache written in its place
    assert not marker.exists()


def test_a_cache_of_another_pixel_limit_is_not_used(folder, decodes):
    train, _ = folder
    _folder(train)
    decodes.clear()
    _folder(train, max_pixels=5000)  # the fixture's images are 64 x 64 = 4096 pixels
    assert len(decodes) == FILES and _cache(train)["max_pixels"] == 5000


def test_a_folder_that_is_not_writable_keeps_its_cache_in_the_output_dir(
    folder, decodes, tmp_path, monkeypatch
):
    train, _ = folder
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == train else writable(p, mode))
    out = tmp_path / "out"
    _folder(train, cache_dir=str(out))
    assert not os.path.exists(os.path.join(train, dc.SCAN_CACHE_NAME))
    (cache,) = os.listdir(out / "scan_cache")
    assert cache.startswith("train-") and cache.endswith(".json")
    decodes.clear()
    _folder(train, cache_dir=str(out))  # the run's resume
    assert decodes == []
    decodes.clear()
    _folder(train)  # no OUTPUT_DIR either: no cache, a full scan
    assert len(decodes) == FILES


def test_ranks_scan_their_share_once_and_rank_0_writes_the_union(folder, decodes, monkeypatch):
    """Two ranks simulated in turn: each decodes only its 1/2 of the files; rank 1 sends its new
    entries to rank 0 (comm.gather), which writes the one cache every later start reads."""
    from detectron2.utils import comm

    train, _ = folder
    sent = {}

    def gather(data, dst=0, group=None):  # rank 1 runs first: rank 0 receives what it sent
        if comm.get_rank() == 1:
            sent[1] = data
            return []
        return [data, sent[1]]

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda data, group=None: [data, data])
    monkeypatch.setattr(comm, "gather", gather)
    for rank in (1, 0):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        decodes.clear()
        _folder(train)
        assert len(decodes) == (FILES + 1 - rank) // 2  # its share: files rank, rank + 2, ...
        assert os.path.exists(os.path.join(train, dc.SCAN_CACHE_NAME)) == (rank == 0)
    assert len(_cache(train)["files"]) == FILES
    decodes.clear()
    _folder(train)  # rank 0 again: nothing left to decode
    assert decodes == []


def test_never_skips_the_scan_and_the_load_replaces_and_counts_a_broken_file(
    folder, decodes, caplog
):
    from PIL import Image

    train, bad = folder
    big = os.path.join(train, "heart", "zz_big.png")  # each broken file is its class's last
    Image.new("RGB", (80, 80)).save(big)  # 6400 pixels, above the limit below
    ds = _folder(train, scan="never", transform=eval_transform(crop=32), max_pixels=5000)
    assert decodes == [] and not ds.scanned and dc.SCAN_CACHE_NAME not in os.listdir(train)
    assert len(ds) == FILES + 1 and ds.scan_skipped == 0
    images = torch.cat([b[0] for b in DataLoader(ds, batch_size=10, num_workers=2)])
    assert images.shape == (FILES + 1, 3, 32, 32)
    broken = [i for i, (p, _) in enumerate(ds.samples) if p in bad or p == big]
    assert len(broken) == BAD + 1 and ds.skipped_images == BAD + 1  # counted across the workers
    for i in broken:
        assert torch.equal(images[i], images[i + 1])  # served by the next image
    with caplog.at_level("WARNING", logger="moco.data.checks"):  # in this process: its warning
        ds[[p for p, _ in ds.samples].index(big)]
    assert (
        f"cannot load {big} (ValueError: 80x80 = 6400 pixels > DATA.MAX_IMAGE_PIXELS 5000)"
        in caplog.text
    )


def test_auto_scans_a_folder_up_to_the_threshold(folder, decodes, monkeypatch):
    train, _ = folder
    monkeypatch.setattr(config, "SCAN_AUTO_MAX_FILES", FILES)
    assert _folder(train, scan="auto").scanned and len(decodes) == FILES
    monkeypatch.setattr(config, "SCAN_AUTO_MAX_FILES", FILES - 1)
    decodes.clear()
    ds = _folder(train, scan="auto")
    assert not ds.scanned and decodes == [] and len(ds) == FILES


def test_the_pretraining_dataset_takes_data_scan_images(folder, decodes):
    train, _ = folder
    cfg = config.get_cfg()
    cfg.merge_from_list(
        ["DATA.ROOT", os.path.dirname(train), "DATA.SCAN_IMAGES", "never", "INPUT.CROP_SIZE", "32"]
    )
    assert not build_pretrain_dataset(cfg).scanned and decodes == []
    cfg.DATA.SCAN_IMAGES, cfg.DATA.MAX_BAD_FRACTION = "always", 0.1
    assert build_pretrain_dataset(cfg).scanned and len(decodes) == FILES


def _one_line_error(err, prog):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-2000:]
    return lines[0]


def test_a_bad_scan_images_value_is_one_line_naming_the_key(folder, tmp_path, capsys, monkeypatch):
    train, _ = folder
    data = os.path.dirname(train)
    with pytest.raises(
        ValueError,
        match=r"^DATA.SCAN_IMAGES must be one of auto, always, never, "
        r"got 'sometimes'$",
    ):
        image_folder(data, "train", None, "DATA.ROOT", scan="sometimes")
    pretrain = load_tool("pretrain").main
    assert (
        pretrain(
            [
                "--config-file",
                PRETRAIN_CFG,
                "--output-dir",
                str(tmp_path / "o"),
                data,
                "DATA.SCAN_IMAGES",
                "sometimes",
                "MODEL.DEVICE",
                "cpu",
            ]
        )
        == 2
    )
    assert (
        "DATA.SCAN_IMAGES must be one of auto, always, never, got 'sometimes'"
        in _one_line_error(capsys.readouterr().err, "pretrain.py")
    )

    lincls = load_tool("lincls")
    assert lincls.main(["--scan-images", "sometimes", data]) == 2
    assert "--scan-images must be one of auto, always, never, got 'sometimes'" in _one_line_error(
        capsys.readouterr().err, "lincls.py"
    )
    launched = []
    monkeypatch.setattr(
        "moco.utils.launch.launch_processes", lambda fn, spec, a, **kw: launched.append(a)
    )
    assert lincls.main(["--scan-images", "never", "--output-dir", str(tmp_path / "l"), data]) == 0
    (opts,) = launched[0]
    assert opts.scan_images == "never" and opts.output_dir == str(tmp_path / "l")

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


def _folder(train, scan="always", max_bad_fraction=0.1, **kwargs):
    return dc.CheckedImageFolder(
        train, what="DATA.ROOT", max_bad_fraction=max_bad_fraction, scan=scan, **kwargs
    )


def _cache(train):
    """The folder's scan cache as {"max_pixels": ..., "files": {key: [size, mtime_ns, reason]}}."""
    with open(os.path.join(train, dc.SCAN_CACHE_NAME)) as f:
        header, *lines = [json.loads(line) for line in f]
    assert header["format"] == "moco-det image scan" and header["version"] == 2
    return {"max_pixels": header["max_pixels"], "files": {k: e for k, *e in lines}}


def _write_cache(train, entries, max_pixels=89478485):
    """A well-formed cache of ``entries`` ({key: [size, mtime_ns, reason]})."""
    header = {"format": "moco-det image scan", "version": 2, "max_pixels": max_pixels}
    compact = {"separators": (",", ":")}  # as ScanCache.save writes: its reader takes only that
    lines = [json.dumps(header)] + [json.dumps([k, *e], **compact) for k, e in entries.items()]
    with open(os.path.join(train, dc.SCAN_CACHE_NAME), "w") as f:
        f.write("\n".join(lines) + "\n")


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


_HEADER = {"format": "moco-det image scan", "version": 2, "max_pixels": 89478485}


def _lines(*items, header=_HEADER):
    lines = [json.dumps(header)] + [json.dumps(x, separators=(",", ":")) for x in items]
    return "\n".join(lines).encode() + b"\n"


@pytest.mark.parametrize(
    "content",
    [
        "pickle",
        b"\x80\x04 not json",
        _lines()[:30],  # cut short
        _lines()[:-1] + b"\n" + b"[" * 5_000 + b"]" * 5_000,  # nesting
        b"[" * 100_000 + b"]" * 100_000,  # a line longer than any entry
        json.dumps(["a list"]).encode(),
        _lines(["disk/disk_0000.jpg", "1174", 5, None]),
        _lines(["disk/disk_0000.jpg", 1174, 5, {"reason": 1}]),
        _lines({"disk/disk_0000.jpg": [1174, 5, None]}),  # version 1's entry shape
        _lines({}),
        json.dumps({**_HEADER, "version": 1, "files": {}}).encode(),  # an earlier version's
        _lines(header={**_HEADER, "max_pixels": "many"}),
        _lines(*(["x", 1, 1, None] for _ in range(2 * FILES + 1001))),  # more lines than files
        b" " * (4096 * FILES + 65537),  # larger than a cache of the folder can be: not parsed
        b"",
    ],
    ids=[
        "pickle",
        "binary",
        "truncated",
        "deep",
        "long-line",
        "list",
        "str-size",
        "dict-reason",
        "dict-entry",
        "empty-dict-entry",
        "version",
        "max-pixels-type",
        "too-many-lines",
        "too-large",
        "empty",
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


_CACHE_PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
import moco.data.checks as dc
pages = int(open("/proc/self/statm").read().split()[0])
vm = pages * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # +1 GiB at most
ds = dc.CheckedImageFolder(sys.argv[1], what="DATA.ROOT", max_bad_fraction=0.1, scan="always")
print(len(ds), ds.scan_skipped)
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_cache_that_is_no_regular_file_is_ignored_without_reading_it(folder, tmp_path, kind):
    """A FIFO blocked the start forever and a link to /dev/zero read until memory ran out (the size
    cap read getsize, 0 for both); in a fresh process with 1 GiB of address space to spare."""
    import subprocess
    import sys

    train, _ = folder
    cache = os.path.join(train, dc.SCAN_CACHE_NAME)
    {"fifo": os.mkfifo, "dev-zero": lambda p: os.symlink("/dev/zero", p), "folder": os.mkdir}[kind](
        cache
    )
    script = tmp_path / "probe.py"
    script.write_text(_CACHE_PROBE.format(repo=REPO))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # the timeout only ends a hang of the old behaviour; nothing is timed
    r = subprocess.run(
        [sys.executable, str(script), train], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(FILES - BAD), str(BAD)]
    assert f"ignoring the scan cache {cache} (not a regular file)" in r.stderr
    if kind == "fifo":  # the scan's results were not written into the FIFO (it was replaced)
        assert os.path.isfile(cache) and len(_cache(train)["files"]) == FILES


def test_cache_entries_held_are_only_the_folders_files(folder, decodes):
    """Memory holds what the folder has: entries of other paths are read and dropped."""
    train, _ = folder
    first = _folder(train)
    entries = _cache(train)["files"]
    others = {f"gone/{i:05d}.jpg": [1, 1, None] for i in range(FILES + 900)}
    _write_cache(train, {**others, **entries})  # files removed since: within the lines allowed
    decodes.clear()
    paths = [os.path.join(train, k) for k in entries]
    cache = dc.ScanCache(dc.scan_cache_path(train), train, 89478485, FILES, "DATA.ROOT", paths)
    assert cache.entries == entries
    second = _folder(train)
    assert decodes == [] and second.samples == first.samples  # the folder's entries still used


def test_a_cache_calling_a_large_image_good_does_not_bypass_the_pixel_limit(
    folder, decodes, caplog
):
    """A well-formed cache that lies (right size and mtime, no reason) was trusted: a scanned folder
    had no pixel check at load. The load checks the header of every image."""
    from PIL import Image

    train, _ = folder
    big = os.path.join(train, "heart", "zz_big.png")  # its class's last file
    Image.new("RGB", (80, 80)).save(big)  # 6400 pixels > 5000
    _folder(train, max_pixels=5000, max_bad_fraction=0.2)  # a true cache: the big file is bad
    key = os.path.relpath(big, train)
    entries = _cache(train)["files"]
    assert "6400 pixels > DATA.MAX_IMAGE_PIXELS 5000" in entries[key][2]
    entries[key][2] = None  # the lie
    _write_cache(train, entries, max_pixels=5000)
    decodes.clear()
    ds = _folder(train, max_pixels=5000, transform=eval_transform(crop=32))
    assert decodes == [] and big in [p for p, _ in ds.samples]  # the cache was believed ...
    i = [p for p, _ in ds.samples].index(big)
    with caplog.at_level("WARNING", logger="moco.data.checks"):
        image, label = ds[i]  # ... but the image is not loaded: the next one is served
    assert torch.equal(image, ds[i + 1][0]) and ds.skipped_images == BAD + 1
    assert f"cannot load {big} (ValueError: 80x80 = 6400 pixels > DATA.MAX_IMAGE_PIXELS 5000)" in (
        caplog.text
    )


def test_reasons_from_the_cache_are_escaped_before_they_are_logged(folder, caplog):
    """A reason is text from an untrusted file: a newline forged a log line, ANSI escapes reached
    the terminal."""
    train, bad = folder
    _folder(train)
    entries = _cache(train)["files"]
    forged = "fine\n2026-12-05 00:00:00 INFO all images are readable\x1b[2J\x1b[31m"
    entries[os.path.relpath(bad[0], train)][2] = forged
    _write_cache(train, entries)
    caplog.clear()
    with caplog.at_level("WARNING", logger="moco.data.checks"):
        ds = _folder(train)
    assert ds.scan_skipped == BAD
    (line,) = [r.getMessage() for r in caplog.records if bad[0] in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line
    assert "fine\\n2026-12-05 00:00:00 INFO all images are readable\\x1b[2J\\x1b[31m" in line
    with pytest.raises(ValueError) as e:  # the too-many-bad error quotes a reason too
        _folder(train, max_bad_fraction=0.0)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "fine\\n2026" in str(e.value)


def test_names_that_need_json_escapes_are_cached_and_reused(folder, decodes):
    """The reader takes the lines the writer writes: quotes, backslashes and non-ASCII in a path."""
    train, _ = folder
    src = sorted(os.listdir(os.path.join(train, "disk")))[0]
    odd = os.path.join(train, "disk", 'zz "q" \\ \u00fc\u6f22.jpg')
    shutil.copyfile(os.path.join(train, "disk", src), odd)
    first = _folder(train)
    assert odd in [p for p, _ in first.samples] and len(decodes) == FILES + 1
    assert _cache(train)["files"][os.path.relpath(odd, train)][2] is None
    decodes.clear()
    assert _folder(train).samples == first.samples and decodes == []


def test_the_pixel_check_at_load_gives_the_loaders_image_and_refuses_a_large_one(folder, tmp_path):
    """Every load reads the header once and hands the open image on (the default RGB loader and
    the fast path's JpegDraftLoader): the same pixels as the loader alone, or a ValueError."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets.folder import pil_loader

    from moco.data.augment import JpegDraftLoader

    train, _ = folder
    small = os.path.join(train, "disk", sorted(os.listdir(os.path.join(train, "disk")))[0])
    big = str(tmp_path / "big.jpg")
    Image.new("RGB", (80, 80), (200, 10, 10)).save(big)
    for inner, alone in ((None, pil_loader), (JpegDraftLoader(16), JpegDraftLoader(16))):
        checked = dc.PixelLimitLoader(inner, 5000)
        assert np.array_equal(np.asarray(checked(small)), np.asarray(alone(small)))
        with pytest.raises(ValueError, match=r"80x80 = 6400 pixels > DATA.MAX_IMAGE_PIXELS 5000"):
            checked(big)

"""Unreadable images in an image folder: found at start, skipped with a warning, counted, bounded.

:func:`check_image` decodes a file (JPEG at 1/8 scale through PIL's ``draft``: the whole
entropy-coded stream is still read, so a truncated file fails, at a fraction of the full cost).
``Image.verify()`` alone is not enough: it passes a JPEG cut in half.

:class:`CheckedImageFolder` is torchvision's ``ImageFolder`` that

* at construction decodes every file once (:func:`scan_images`; threads, and with several processes
  each rank scans 1/world of the files and the results are all-gathered, so every rank keeps the
  same list and ``DistributedSampler`` shards stay consistent), drops the unreadable ones with one
  warning per file, and raises a one-line ValueError when more than ``max_bad_fraction`` of the
  files (``DATA.MAX_BAD_FRACTION``) or all of them are unreadable;
* at load time replaces a file that became unreadable after the scan by the next sample
  (deterministic, so a resumed run stays reproducible), with a warning naming the file, and counts
  it in a counter shared by the data-loading workers.

``skipped_images`` (scan + load time) is what the trainers report. The scan runs in every process
that builds the dataset, so build it in all processes of a run (as the trainers do). An image with
more than ``DATA.MAX_IMAGE_PIXELS`` pixels is skipped and counted the same way.

Listing the folder (:func:`walk_inside`) follows a directory symlink only to a folder inside the
root that was not listed yet: a symlink loop multiplied a class 41x, and one to ``/`` never ended.
"""

import functools
import logging
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

from detectron2.utils import comm
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

logger = logging.getLogger(__name__)

# what PIL raises for a file it cannot read as an image (UnidentifiedImageError is an OSError;
# DecompressionBombError is not)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def default_max_bad_fraction():
    from moco.config import get_cfg  # the one place defaults live

    return get_cfg().DATA.MAX_BAD_FRACTION


def default_max_image_pixels():
    from moco.config import get_cfg

    return get_cfg().DATA.MAX_IMAGE_PIXELS


def check_image(path, max_pixels=None):
    """None if ``path`` decodes as an image of at most ``max_pixels`` pixels, else the reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            pixels = im.size[0] * im.size[1]
            if max_pixels and pixels > max_pixels:  # from the header: nothing decoded yet
                return (f"{im.size[0]}x{im.size[1]} = {pixels} pixels > DATA.MAX_IMAGE_PIXELS "
                        f"{max_pixels}")  # fmt: skip
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))  # smallest DCT scale: decodes every block, skips most IDCT
            im.load()
    except UNREADABLE as e:
        return f"{type(e).__name__}: {e}"
    return None


def _map_in_chunks(fn, items, threads, chunk=256):
    """``[fn(x) for x in items]`` on ``threads`` threads (PIL releases the GIL while decoding), a
    task per ``chunk`` items: ``ThreadPoolExecutor.map`` ignores its ``chunksize``, and a future per
    file cost ~45 us, 4.5 s per 100,000 files."""
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(threads) as pool:
        return [y for part in pool.map(lambda xs: [fn(x) for x in xs], chunks) for y in part]


def scan_images(paths, threads=None, max_pixels=None):
    """{path: reason} of the unreadable (or too large) files among ``paths``, all ranks' shares
    gathered."""
    world, rank = comm.get_world_size(), comm.get_rank()
    mine = list(paths)[rank::world]
    threads = threads or min(8, max(1, (os.cpu_count() or 1) // max(1, comm.get_local_size())))
    reasons = _map_in_chunks(functools.partial(check_image, max_pixels=max_pixels), mine, threads)
    bad = {p: r for p, r in zip(mine, reasons) if r is not None}
    if world > 1:
        merged = {}
        for part in comm.all_gather(bad):
            merged.update(part)
        bad = merged
    return bad


def bad_fraction_error(what, bad, total, max_bad_fraction):
    """The one-line error for too many unreadable files, or None when within the bound."""
    if total and len(bad) < total and len(bad) <= max_bad_fraction * total:
        return None
    path, reason = sorted(bad.items())[0]
    if len(bad) == total:
        return (f"{what}: none of the {total} image files is readable (e.g. {path}: {reason}); "
                "check the folder")  # fmt: skip
    return (f"{what}: {len(bad)} of {total} image files are unreadable ({len(bad) / total:.2%} > "
            f"DATA.MAX_BAD_FRACTION {max_bad_fraction:.2%}), e.g. {path}: {reason}; remove or "
            "replace them, or raise DATA.MAX_BAD_FRACTION")  # fmt: skip


def walk_inside(top, root, seen):
    """``os.walk(top, followlinks=True)`` that enters a directory (a symlink's target included)
    only when it lies inside ``root`` and its real path is not in ``seen`` (updated): no cycles,
    nothing outside the root, no folder listed twice. Skipped links get one warning each."""
    real_root = os.path.realpath(root)

    def allowed(path):
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            logger.warning("%s: not following %s, it leads out of the folder (to %s)", root, path, real)
            return False
        if real in seen:
            logger.warning("%s: not following %s, its folder %s is listed already", root, path, real)
            return False
        seen.add(real)
        return True

    if not allowed(top):
        return
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in dirnames if allowed(os.path.join(dirpath, d))]
        yield dirpath, dirnames, filenames


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` without unreadable or too large files, listed without following directory
    symlinks out of the root or into cycles (see the module docstring).

    ``what`` names the folder's config key / flag in messages.
    """

    def __init__(self, root, transform=None, loader=None, what=None, max_bad_fraction=None,
                 max_pixels=None):  # fmt: skip
        kwargs = {} if loader is None else {"loader": loader}
        super().__init__(root, transform=transform, **kwargs)
        what = what or root
        if max_bad_fraction is None:
            max_bad_fraction = default_max_bad_fraction()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"DATA.MAX_BAD_FRACTION must be in [0, 1], got {max_bad_fraction}")
        if max_pixels is None:
            max_pixels = default_max_image_pixels()
        total = len(self.samples)
        bad = scan_images([p for p, _ in self.samples], max_pixels=max_pixels)
        error = bad_fraction_error(what, bad, total, max_bad_fraction) if bad else None
        if error:
            raise ValueError(error)
        for path in sorted(bad):
            logger.warning("%s: skipping unreadable image %s (%s)", what, path, bad[path])
        if bad:
            self.samples = [s for s in self.samples if s[0] not in bad]
            self.imgs, self.targets = self.samples, [t for _, t in self.samples]
            logger.warning("%s: skipped %d of %d images (unreadable)", what, len(bad), total)
        self.what, self.scan_skipped = what, len(bad)
        # shared with the data-loading workers (inherited at their start)
        self._load_skipped = multiprocessing.get_context().Value("q", 0)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's ``make_dataset`` (same order: classes sorted, then paths), listed with
        :func:`walk_inside`."""
        if is_valid_file is None:
            is_valid_file = functools.partial(has_file_allowed_extension, extensions=extensions)
        samples, seen = [], {os.path.realpath(directory)}  # the root itself: a link back is a cycle
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(directory, target_class)
            for dirpath, _, fnames in sorted(walk_inside(target_dir, directory, seen)):
                samples += [(os.path.join(dirpath, f), class_to_idx[target_class])
                            for f in sorted(fnames) if is_valid_file(os.path.join(dirpath, f))]  # fmt: skip
        found = {c for _, c in samples}
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return samples

    @property
    def skipped_images(self):
        """Unreadable files: left out at the start scan + replaced at load time (this process's
        data-loading workers)."""
        return self.scan_skipped + self._load_skipped.value

    def __getitem__(self, index):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return super().__getitem__(i)
            except UNREADABLE as e:
                with self._load_skipped.get_lock():
                    self._load_skipped.value += 1
                logger.warning("%s: %s became unreadable (%s: %s); using the next image instead",
                               self.what, self.samples[i][0], type(e).__name__, e)  # fmt: skip
        raise ValueError(f"{self.what}: no image of {self.root} is readable any more")

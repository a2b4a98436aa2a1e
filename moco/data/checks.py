"""Unreadable images in an image folder: found at start, skipped with a warning, counted, bounded.

:func:`check_image` decodes a file (JPEG at 1/8 scale through PIL's ``draft``: the whole
entropy-coded stream is still read, so a truncated file fails, at a fraction of the full cost).
``Image.verify()`` alone is not enough: it passes a JPEG cut in half.

:class:`CheckedImageFolder` is torchvision's ``ImageFolder`` that

* at construction decodes every file once (:func:`scan_images`; threads, and with several processes
  each rank scans 1/world of the files and the results are all-gathered, so every rank keeps the
  same list and ``DistributedSampler`` shards stay consistent), drops the unreadable ones with one
  warning per file, and raises a one-line ValueError when more than ``max_bad_fraction`` of the
  files (``DATA.MAX_BAD_FRACTION``) or all of them are unreadable. ``DATA.SCAN_IMAGES``: always,
  never, or auto (a folder of up to ``moco.config.SCAN_AUTO_MAX_FILES`` files); the results are
  cached (:class:`ScanCache`), so a later run or resume decodes only new or changed files;
* at load time replaces a file that cannot be loaded (broken after the scan, or never scanned) by
  the next sample (deterministic, so a resumed run stays reproducible), with a warning naming the
  file, and counts it in a counter shared by the data-loading workers. The load also refuses
  images above the pixel limit (:class:`PixelLimitLoader`): without the scan it is the only check,
  with it the cache's word is not taken for it.

``skipped_images`` (scan + load time) is what the trainers report. The scan runs in every process
that builds the dataset, so build it in all processes of a run (as the trainers do). An image with
more than ``DATA.MAX_IMAGE_PIXELS`` pixels is skipped and counted the same way.

Listing the folder (:func:`walk_inside`) follows a directory symlink only to a folder inside the
root that was not listed yet: a symlink loop multiplied a class 41x, and one to ``/`` never ended.
"""

import contextlib
import functools
import gc
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor

from detectron2.utils import comm
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from moco.utils import file_io

logger = logging.getLogger(__name__)

SCAN_MODES = ("auto", "always", "never")  # DATA.SCAN_IMAGES
# The scan cache of a folder is this file in it: every run that reads the folder reuses it, and
# ImageFolder takes only sub-folders there as classes. See ScanCache.
SCAN_CACHE_NAME = ".moco_det_scan.json"
_CACHE_FORMAT, _CACHE_VERSION = "moco-det image scan", 2  # 2: a JSON line per file
# an entry is a path and three values (~100 bytes); a cache far larger than its folder needs is
# not one this module wrote, and is not parsed
_CACHE_MAX_BYTES_PER_FILE = 4096
_CACHE_MAX_LINE = 16384  # the header's bound

# what PIL raises for a file it cannot read as an image (UnidentifiedImageError is an OSError;
# DecompressionBombError is not)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _data_default(key):
    from moco.config import get_cfg  # the one place defaults live

    return get_cfg().DATA[key]


def default_max_bad_fraction():
    return _data_default("MAX_BAD_FRACTION")


def default_max_image_pixels():
    return _data_default("MAX_IMAGE_PIXELS")


def check_scan_mode(mode, what="DATA.SCAN_IMAGES"):
    """``mode`` if it is one of SCAN_MODES, else a one-line ValueError naming ``what``."""
    if mode not in SCAN_MODES:
        raise ValueError(f"{what} must be one of {', '.join(SCAN_MODES)}, got {mode!r}")
    return mode


def scan_wanted(mode, files):
    """Whether a folder of ``files`` files gets the start-up scan under DATA.SCAN_IMAGES ``mode``."""
    from moco import config  # SCAN_AUTO_MAX_FILES read at call time (tests lower it)

    check_scan_mode(mode)
    return mode == "always" or (mode == "auto" and files <= config.SCAN_AUTO_MAX_FILES)


def pixel_limit_reason(width, height, max_pixels):
    """Why an image of ``width`` x ``height`` is refused, or None within ``max_pixels`` (0: none)."""
    pixels = width * height
    if max_pixels and pixels > max_pixels:
        return f"{width}x{height} = {pixels} pixels > DATA.MAX_IMAGE_PIXELS {max_pixels}"
    return None


def check_image(path, max_pixels=None):
    """None if ``path`` decodes as an image of at most ``max_pixels`` pixels, else the reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            too_large = pixel_limit_reason(*im.size, max_pixels)  # the header's: nothing decoded
            if too_large:
                return too_large
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))  # smallest DCT scale: decodes every block, skips most IDCT
            im.load()
    except UNREADABLE as e:
        return f"{type(e).__name__}: {e}"
    return None


def scan_cache_path(folder, fallback_dir=None, in_folder=True):
    """Where the scan cache of ``folder`` lives: in it when it is writable (shared by every run
    that reads the folder) and ``in_folder``, else in ``fallback_dir``/scan_cache/ (the run's
    OUTPUT_DIR: its resumes reuse it) under a name of the folder's real path, else None (no
    cache). ``in_folder`` False: for folders whose every file a loader takes for an image."""
    if in_folder and os.access(folder, os.W_OK):
        return os.path.join(folder, SCAN_CACHE_NAME)
    if not fallback_dir:
        return None
    real = os.path.realpath(folder)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:12]
    return os.path.join(fallback_dir, "scan_cache", f"{os.path.basename(real)}-{digest}.json")


def printable(text, limit=300):
    """``text`` with control characters escaped (``\\n``, ``\\x1b``) and cut to ``limit``: a
    reason read from a cache or an error is logged without forging lines or reaching the
    terminal as escape sequences."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cache_header(line):
    """``max_pixels`` of a scan cache's first line; ValueError says what is off."""
    data = json.loads(line)
    if (
        not isinstance(data, dict)
        or data.get("format") != _CACHE_FORMAT
        or data.get("version") != _CACHE_VERSION
    ):
        raise ValueError(f"not a {_CACHE_FORMAT} file of version {_CACHE_VERSION}")
    limit = data.get("max_pixels")
    if not (limit is None or type(limit) is int):
        raise ValueError("max_pixels of the wrong type")
    return limit


_JSON_STRING = rb'"[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*"'
_JSON_INT = rb"(-?(?:0|[1-9][0-9]{0,18}))"
# an entry line as ScanCache.save writes it: [path, size, mtime_ns, reason or null]
_CACHE_ENTRY = re.compile(
    rb"\[("
    + _JSON_STRING
    + rb"),"
    + _JSON_INT
    + rb","
    + _JSON_INT
    + rb",(null|"
    + _JSON_STRING
    + rb")\]\n"
)


def _json_string(quoted):
    """A JSON string literal matched by _JSON_STRING as str (escapes through the json module)."""
    if b"\\" in quoted:
        return json.loads(quoted)
    return quoted[1:-1].decode("utf-8")  # a UnicodeDecodeError is a ValueError


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off while acyclic entries are built: the collections that
    100,000 new tuples and lists set off took twice as long as the parse (50,000 files)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ScanCache:
    """Earlier scan results of the files under ``folder``, read from the file ``path``: a JSON
    header line (format, version, the pixel limit the results were made with), then one JSON line
    ``[path relative to the folder, size, mtime_ns, reason or null]`` per file. A file whose size
    and mtime_ns match its entry is not decoded again (bad files stay bad, with their reason); any
    other is.

    The file is untrusted. It is opened only when it is a regular file (a FIFO would block the
    start, ``/dev/zero`` never ends), its size is read after opening and at most that much is
    read, the header is parsed as JSON (nothing is ever unpickled) and every other line must be
    the entry the writer writes, a JSON string, two integers and a string or null (one regular
    expression; string escapes decoded by the json module), and only entries of the folder's files
    (``paths``) are kept: memory is bounded by the folder, not by the file. One that does not parse as this class writes it (or is too large for the folder)
    is ignored with one warning, one made with another pixel limit with an info line: the files
    are then scanned again. Images it calls good are still checked against the pixel limit when
    loaded (:class:`PixelLimitLoader`). :meth:`save` rewrites it atomically; a failed write is a
    warning only.
    """

    def __init__(self, path, folder, max_pixels, files, what, paths=None):
        self.path, self.max_pixels, self.what = path, max_pixels, what
        self.prefix = os.path.join(folder, "")
        keys = None if paths is None else {self.key(p) for p in paths}
        self.entries = self._load(files, keys)

    def _load(self, files, keys):
        try:
            return self._read(files, keys)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
            reason = printable(" ".join(str(e).split()), 200) or type(e).__name__
            logger.warning(
                "%s: ignoring the scan cache %s (%s); scanning the files again",
                self.what,
                self.path,
                reason,
            )
            return {}

    def _read(self, files, keys):
        # O_NONBLOCK: opening a FIFO without a writer returns at once (then refused below)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(self.path, flags), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            size = st.st_size
            if size > _CACHE_MAX_BYTES_PER_FILE * files + 65536:
                raise ValueError(f"{size} bytes, more than a cache of {files} files needs")
            header = f.readline(_CACHE_MAX_LINE)
            body = f.read(max(0, size - len(header)) + 1)  # at most what it had, and a byte
        if len(header) + len(body) > size:  # growing, or a special file that reports no size
            raise ValueError(f"more than the {size} bytes it had when opened")
        if not header.endswith(b"\n"):
            raise ValueError(f"not a {_CACHE_FORMAT} file of version {_CACHE_VERSION}")
        limit = _cache_header(header)
        if limit != self.max_pixels:
            logger.info(
                "%s: the scan cache %s was made with DATA.MAX_IMAGE_PIXELS %s; scanning the "
                "files again",
                self.what,
                self.path,
                limit,
            )
            return {}
        # a folder's cache has a line per file; files removed since leave a few more
        lines, max_lines = body.count(b"\n"), 2 * files + 1000
        if lines > max_lines:
            raise ValueError(f"{lines} entries for a folder of {files} files")
        # one regular expression over the lines, not a JSON parse per line (7x the time): each
        # match is one entry of four values, so what is built is bounded by the lines
        with _gc_paused():
            return self._entries(body, lines, files, keys)

    @staticmethod
    def _entries(body, lines, files, keys):
        found = _CACHE_ENTRY.findall(body)
        # matches in order that add up to the body's length tile it: every line is an entry
        if sum(map(len, itertools.chain.from_iterable(found))) + 6 * len(found) != len(body):
            number = next(
                (
                    i + 2
                    for i, line in enumerate(body.split(b"\n"))
                    if not _CACHE_ENTRY.fullmatch(line + b"\n")
                ),
                lines + 2,
            )
            raise ValueError(f"line {number} is not [path, size, mtime_ns, reason]")
        entries = {}
        for quoted, size_, mtime, reason in found:
            key = _json_string(quoted)
            if keys is None or key in keys:
                reason = None if reason == b"null" else _json_string(reason)
                entries[key] = [int(size_), int(mtime), reason]
        if len(entries) > files:
            raise ValueError(f"{len(entries)} entries for {files} files")
        return entries

    def key(self, path):
        return path.removeprefix(self.prefix)

    def check(self, path):
        """(reason or None, the file's new entry or None when its cached one still holds). The
        file is stat'ed before it is read, so a change during the scan shows at the next start."""
        try:
            st = os.stat(path)
        except OSError as e:
            return f"{type(e).__name__}: {e}", None
        entry = self.entries.get(self.key(path))
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2], None
        reason = check_image(path, self.max_pixels)
        return reason, [st.st_size, st.st_mtime_ns, reason]

    def save(self, paths, fresh):
        """Write the entries of ``paths``, ``fresh`` ({key: entry}) over the loaded ones, if that
        changes the file. Files no longer listed drop out."""
        files = {}
        for path in paths:
            key = self.key(path)
            entry = fresh.get(key) or self.entries.get(key)
            if entry is not None:
                files[key] = entry
        logger.info(
            "%s: decoded %d of %d files (the others unchanged since the scan cache %s)",
            self.what,
            len(fresh),
            len(paths),
            self.path,
        )
        if files == self.entries:
            return
        header = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "max_pixels": self.max_pixels}
        lines = [json.dumps(header, separators=(",", ":"))]
        lines += [json.dumps([k, *e], separators=(",", ":")) for k, e in files.items()]
        try:
            file_io.atomic_write_text(self.path, "\n".join(lines) + "\n")
        except OSError as e:
            logger.warning(
                "%s: scan cache not written (%s); the next start scans again", self.what, e
            )


def _map_in_chunks(fn, items, threads, chunk=256):
    """``[fn(x) for x in items]`` on ``threads`` threads (PIL releases the GIL while decoding), a
    task per ``chunk`` items: ``ThreadPoolExecutor.map`` ignores its ``chunksize``, and a future per
    file cost ~45 us, 4.5 s per 100,000 files."""
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(threads) as pool:
        return [y for part in pool.map(lambda xs: [fn(x) for x in xs], chunks) for y in part]


def scan_images(paths, threads=None, max_pixels=None, cache=None):
    """{path: reason} of the unreadable (or too large) files among ``paths``, all ranks' shares
    gathered. With ``cache`` (a :class:`ScanCache` made with the same ``max_pixels``), files it
    holds unchanged are not decoded, and rank 0 writes it back with every rank's new entries."""
    world, rank = comm.get_world_size(), comm.get_rank()
    paths = list(paths)
    mine = paths[rank::world]
    threads = threads or min(8, max(1, (os.cpu_count() or 1) // max(1, comm.get_local_size())))
    check = cache.check if cache else functools.partial(check_image, max_pixels=max_pixels)
    results = _map_in_chunks(check, mine, threads)
    if not cache:
        results = [(reason, None) for reason in results]
    # reasons come from the cache (untrusted) or exception texts: escaped for logs and errors
    bad = {p: printable(r) for p, (r, _) in zip(mine, results) if r is not None}
    fresh = {cache.key(p): e for p, (_, e) in zip(mine, results) if e is not None} if cache else {}
    if world > 1:  # every rank joins both, with or without a cache
        merged = {}
        for part in comm.all_gather(bad):
            merged.update(part)
        bad = merged
        fresh = {k: e for part in comm.gather(fresh) for k, e in part.items()}
    if cache and rank == 0:
        cache.save(paths, fresh)
    return bad


def bad_fraction_error(what, bad, total, max_bad_fraction):
    """The one-line error for too many unreadable files, or None when within the bound."""
    if total and len(bad) < total and len(bad) <= max_bad_fraction * total:
        return None
    path, reason = sorted(bad.items())[0]
    path, reason = printable(path), printable(reason)
    if len(bad) == total:
        return (
            f"{what}: none of the {total} image files is readable (e.g. {path}: {reason}); "
            "check the folder"
        )
    return (
        f"{what}: {len(bad)} of {total} image files are unreadable ({len(bad) / total:.2%} > "
        f"DATA.MAX_BAD_FRACTION {max_bad_fraction:.2%}), e.g. {path}: {reason}; remove or "
        "replace them, or raise DATA.MAX_BAD_FRACTION"
    )


def walk_inside(top, root, seen):
    """``os.walk(top, followlinks=True)`` that enters a directory (a symlink's target included)
    only when it lies inside ``root`` and its real path is not in ``seen`` (updated): no cycles,
    nothing outside the root, no folder listed twice. Skipped links get one warning each."""
    real_root = os.path.realpath(root)

    def allowed(path):
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            logger.warning(
                "%s: not following %s, it leads out of the folder (to %s)", root, path, real
            )
            return False
        if real in seen:
            logger.warning(
                "%s: not following %s, its folder %s is listed already", root, path, real
            )
            return False
        seen.add(real)
        return True

    if not allowed(top):
        return
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in dirnames if allowed(os.path.join(dirpath, d))]
        yield dirpath, dirnames, filenames


class PixelLimitLoader:
    """``loader`` that first reads the image's header and refuses (ValueError) an image above
    ``max_pixels``. Every load of a checked folder goes through it: without the start-up scan it
    is the only check of the size, and with it a cache that calls a file good is not proof (it
    may lie, or the file may have changed). ``loader`` None: RGB through PIL (torchvision's
    ``pil_loader``) from the same open file, so the check costs no second open; a loader with a
    ``from_image(image)`` method is handed the opened image the same way (a second open cost
    40 us of a 160 us load of a 48-px JPEG)."""

    def __init__(self, loader, max_pixels):
        self.loader, self.max_pixels = loader, max_pixels

    def __call__(self, path):
        with open(path, "rb") as f:
            im = Image.open(f)  # reads the header only
            too_large = pixel_limit_reason(*im.size, self.max_pixels)
            if too_large:
                raise ValueError(too_large)
            if self.loader is None:
                return im.convert("RGB")
            if hasattr(self.loader, "from_image"):  # moco.data.augment.JpegDraftLoader
                return self.loader.from_image(im)
        return self.loader(path)


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` without unreadable or too large files, listed without following directory
    symlinks out of the root or into cycles (see the module docstring).

    ``what`` names the folder's config key / flag in messages. ``scan``: DATA.SCAN_IMAGES;
    ``cache_dir``: where the scan cache goes when ``root`` is not writable (:func:`scan_cache_path`).
    """

    def __init__(
        self,
        root,
        transform=None,
        loader=None,
        what=None,
        max_bad_fraction=None,
        max_pixels=None,
        scan=None,
        cache_dir=None,
    ):
        kwargs = {} if loader is None else {"loader": loader}
        super().__init__(root, transform=transform, **kwargs)
        what = what or root
        if max_bad_fraction is None:
            max_bad_fraction = default_max_bad_fraction()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"DATA.MAX_BAD_FRACTION must be in [0, 1], got {max_bad_fraction}")
        if max_pixels is None:
            max_pixels = default_max_image_pixels()
        if scan is None:
            scan = _data_default("SCAN_IMAGES")
        total = len(self.samples)
        self.scanned, bad = scan_wanted(scan, total), {}
        if self.scanned:
            path = scan_cache_path(self.root, cache_dir)
            paths = [p for p, _ in self.samples]
            cache = ScanCache(path, self.root, max_pixels, total, what, paths) if path else None
            bad = scan_images(paths, max_pixels=max_pixels, cache=cache)
        else:
            logger.info(
                "%s: %d files, not decoded at start (DATA.SCAN_IMAGES %s); one that cannot "
                "be loaded is replaced by the next image and counted",
                what,
                total,
                scan,
            )
        if max_pixels:  # a scanned folder too: its cache may call an image good that is not
            self.loader = PixelLimitLoader(None if loader is None else self.loader, max_pixels)
        error = bad_fraction_error(what, bad, total, max_bad_fraction) if bad else None
        if error:
            raise ValueError(error)
        for path in sorted(bad):
            logger.warning(
                "%s: skipping unreadable image %s (%s)", what, printable(path), bad[path]
            )
        if bad:
            self.samples = [s for s in self.samples if s[0] not in bad]
            self.imgs, self.targets = self.samples, [t for _, t in self.samples]
            logger.warning("%s: skipped %d of %d images (unreadable)", what, len(bad), total)
        self.what, self.scan_skipped = what, len(bad)
        # shared with the data-loading workers (inherited at their start)
        self._load_skipped = multiprocessing.get_context().Value("q", 0)

    @staticmethod
    def make_dataset(
        directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        """torchvision's ``make_dataset`` (same order: classes sorted, then paths), listed with
        :func:`walk_inside`."""
        if is_valid_file is None:
            is_valid_file = functools.partial(has_file_allowed_extension, extensions=extensions)
        samples, seen = [], {os.path.realpath(directory)}  # the root itself: a link back is a cycle
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(directory, target_class)
            for dirpath, _, fnames in sorted(walk_inside(target_dir, directory, seen)):
                samples += [
                    (os.path.join(dirpath, f), class_to_idx[target_class])
                    for f in sorted(fnames)
                    if is_valid_file(os.path.join(dirpath, f))
                ]
        found = {c for _, c in samples}
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return samples

    @property
    def skipped_images(self):
        """Unreadable files: left out at the start scan + replaced at load time (this process's
        data-loading workers, every time one is loaded)."""
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
                logger.warning(
                    "%s: cannot load %s (%s: %s); using the next image instead",
                    self.what,
                    printable(self.samples[i][0]),
                    type(e).__name__,
                    printable(e),
                )
        raise ValueError(f"{self.what}: no image of {self.root} is readable any more")

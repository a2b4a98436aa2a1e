"""Shared pytest fixtures, the repository root and a loader for the command-line tools.

``REPO``: the repository root (tests import it: ``from conftest import REPO, load_tool``).
``load_tool(name)``: ``tools/<name>.py`` as a module (its ``main(argv)`` returns the exit code).
``folder_with_bad_files(synthetic_root, dst)``: a copy of the fixture's image folder with 3
unreadable files in train/.

``synthetic_root``: a small embedded data set (generated once per session, into a temporary
directory) registered under the standard names (``synthetic_voc_trainval`` ...). Tests that read
the registered datasets should request ``synthetic_datasets``, which re-registers that root in case
another test pointed the names elsewhere.
"""

import errno
import os

import pytest
import torch

from experiments.cluster import load_tool  # noqa: F401 (tests import it from here)
from moco.data.synthetic.spec import TASK_FORMATS, SyntheticSpec
from moco.data.synthetic.writers import ensure_generated

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_with_bad_files(synthetic_root, dst):
    """Copy of the fixture's imagefolder (30 train images) plus 3 unreadable files in train/."""
    import shutil

    shutil.copytree(os.path.join(synthetic_root, "imagefolder"), dst)
    train = os.path.join(dst, "train")
    good = os.path.join(train, "disk", sorted(os.listdir(os.path.join(train, "disk")))[0])
    with open(good, "rb") as f:
        data = f.read()
    bad = {
        os.path.join(train, "disk", "zz_truncated.jpg"): data[: len(data) // 2],
        os.path.join(train, "ring", "zz_empty.jpg"): b"",
        os.path.join(train, "star", "zz_notes.jpg"): b"not an image\n" * 20,
    }
    for path, content in bad.items():
        with open(path, "wb") as f:
            f.write(content)
    return sorted(bad)


# Small enough to generate in about a second, large enough that every class occurs in both
# detection splits (the top object of image i has class i % 10) and the VOC loader can read them.
SMALL_SPEC = SyntheticSpec(
    seed=0,
    cls_image_size=64,
    cls_train_per_class=3,
    cls_val_per_class=3,
    det_image_size=128,
    det_trainval_images=12,
    det_test_images=12,
)


@pytest.fixture(scope="session")
def synthetic_spec() -> SyntheticSpec:
    """The spec ``synthetic_root`` was generated from."""
    return SMALL_SPEC


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """Path (str) of a generated small synthetic root; also registered in Detectron2 when available."""
    root = str(tmp_path_factory.mktemp("data") / "moco_det_synthetic")
    ensure_generated(root, SMALL_SPEC)
    try:
        from detection.data.datasets import register_synthetic
    except ImportError:  # pure-MoCo tests need no Detectron2
        return root
    register_synthetic(root)
    return root


@pytest.fixture
def synthetic_datasets(synthetic_root) -> dict:
    """Registers ``synthetic_root`` under the standard names; returns {name: annotation file}."""
    from detection.data.datasets import register_synthetic

    return register_synthetic(synthetic_root)


# The embedded set with every task format (issue 26) at a size that generates in about a second.
TASKS_SPEC = SyntheticSpec(
    cls_image_size=32,
    cls_train_per_class=1,
    cls_val_per_class=1,
    det_image_size=96,
    det_trainval_images=10,
    det_test_images=6,
    tasks=TASK_FORMATS,
)


@pytest.fixture(scope="session")
def tasks_root(tmp_path_factory) -> str:
    """Path (str) of a generated ``TASKS_SPEC`` root (not registered: see ``registered``)."""
    root = str(tmp_path_factory.mktemp("tasks") / "moco_det_synthetic")
    ensure_generated(root, TASKS_SPEC)
    return root


@pytest.fixture
def registered(tasks_root, synthetic_root):
    """The task sets of ``tasks_root`` in Detectron2's catalogs; afterwards the standard names
    point at the session's set again (and the task names are dropped: it has none)."""
    from detection.data.datasets import register_synthetic

    names = register_synthetic(tasks_root)
    yield names
    register_synthetic(synthetic_root)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """A test that runs a tool in this process leaves Detectron2's log handlers on its captured
    (afterwards closed) stdout; they are dropped after every test, as the pipeline does after each
    stage (experiments.runs.fresh_loggers)."""
    from experiments.runs import fresh_loggers

    with fresh_loggers():
        yield


class FullDisk:
    """A file whose writes fail with ENOSPC once the disk's ``room`` is spent: ``room`` is a dict
    {"bytes": N}, shared by every file open on the same full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room["bytes"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room["bytes"] -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

"""Shared fixtures: a tiny CIFAR-10 in the official pickle layout, and the real
set when CIFAR10_ROOT points at it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

# Albumentations looks for updates online at import; there is no network in CI.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Lets the tests run from a bare checkout, without `pip install -e .`.
if importlib.util.find_spec("cifar_resnet") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LABEL_NAMES = (
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
)
TINY_TRAIN_PER_BATCH = 40  # 4 per class per batch, 20 per class over the 5 batches
TINY_TEST = 100  # 10 per class

# One mean colour per class, far enough apart that a small model learns them fast.
_CLASS_COLOURS = np.array(
    [
        (230, 40, 40),
        (40, 230, 40),
        (40, 40, 230),
        (230, 230, 40),
        (230, 40, 230),
        (40, 230, 230),
        (140, 140, 140),
        (240, 150, 60),
        (60, 150, 240),
        (20, 20, 20),
    ]
)


class TinyCifar(NamedTuple):
    root: Path  # holds cifar-10-batches-py/
    md5: dict[str, str]  # of the written files, for verify_cifar10(..., expected_md5=md5)


def known_image() -> np.ndarray:
    """HWC RGB with every channel, row and column distinguishable:
    pixel (y, x) = (8y, 8x, 255 - 4(x + y))."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([8 * y, 8 * x, 255 - 4 * (x + y)], axis=-1).astype(np.uint8)


def _class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 25, size=(len(labels), 32, 32, 3))
    return np.clip(_CLASS_COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    # The official row layout: 1024 R, then 1024 G, then 1024 B values.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": rows,
        b"filenames": [f"tiny_{batch_label[:5]}_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _balanced_labels(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(count) % 10)


def write_tiny_cifar(root: Path, seed: int = 0) -> TinyCifar:
    """Write the tiny set under root/cifar-10-batches-py. Train image 0 (first of
    data_batch_1) is ``known_image()``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, 6):
        labels = _balanced_labels(TINY_TRAIN_PER_BATCH, rng)
        images = _class_images(labels, rng)
        if number == 1:
            images[0] = known_image()
        _write_batch(
            folder / f"data_batch_{number}", images, labels, f"training batch {number} of 5"
        )
    labels = _balanced_labels(TINY_TEST, rng)
    _write_batch(folder / "test_batch", _class_images(labels, rng), labels, "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": TINY_TRAIN_PER_BATCH,
        b"label_names": list(LABEL_NAMES),
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    md5 = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}
    return TinyCifar(root, md5)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> TinyCifar:
    """(root, md5s) of a 200-train / 100-test CIFAR-10 with a class colour per label.
    Read-only: tests that damage files copy it first."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture
def tiny_known_image() -> np.ndarray:
    """What load_cifar10(tiny root, train=True) must return at index 0."""
    return known_image()


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real data root, from $CIFAR10_ROOT only; skips when the batches are absent."""
    root = os.environ.get("CIFAR10_ROOT")
    if not root:
        pytest.skip("CIFAR10_ROOT is not set")
    root_path = Path(root).expanduser()
    if not any(
        (folder / "data_batch_1").is_file()
        for folder in (root_path, root_path / "cifar-10-batches-py")
    ):
        pytest.skip(f"no CIFAR-10 batches under CIFAR10_ROOT={root}")
    return root_path


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (tests/services.py): a fresh cluster in
    a temporary directory, password authentication, stopped and deleted at the end.
    Skips only where no server binary (initdb, pg_ctl) can be found."""
    import services

    bindir = services.postgres_bindir()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server binary (initdb and pg_ctl) in `pg_config --bindir`, on "
            "PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL's server package "
            "(Debian: apt-get install postgresql)"
        )
    server = services.start_postgres(bindir)
    yield server
    server.stop()

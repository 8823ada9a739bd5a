"""The official CIFAR-10 python batches: find them, verify their MD5s, download them
(torchvision) when allowed, and read them into uint8 arrays."""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import pickle

import numpy as np

from ..errors import UserError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# The official python-version files, as torchvision lists them.
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

# The training set's mean pixel (0.4914, 0.4822, 0.4465) * 255, rounded. Cutout
# fills holes with it, which is zero after normalisation, as in the cutout paper.
CIFAR10_MEAN_PIXEL: tuple[int, int, int] = (125, 123, 114)

BATCHES_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
_WHAT_TO_SET = f"set CIFAR10_ROOT or data.root=... to the folder that holds {BATCHES_DIRNAME}"


class DataError(UserError, RuntimeError):
    """The data is missing, corrupted or unreadable; the message says what to do."""


# --------------------------------------------------------------------------- files


def resolve_root(root: str | os.PathLike | None) -> pathlib.Path:
    """The data root: ``root`` if given, else $CIFAR10_ROOT, else ./data (absolute, ~ expanded)."""
    if root is None or str(root) == "":
        root = os.environ.get("CIFAR10_ROOT") or "data"
    # Absolute now, so error messages and later chdirs agree on where we looked.
    return pathlib.Path(root).expanduser().absolute()


def _batches_dir(root: str | os.PathLike | None) -> pathlib.Path:
    """root/cifar-10-batches-py, or root itself when it already is that folder."""
    root = resolve_root(root)
    if root.name == BATCHES_DIRNAME or (root / TRAIN_FILES[0]).is_file():
        return root
    return root / BATCHES_DIRNAME


def _file_md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_md5_file(path: str | os.PathLike) -> dict[str, str]:
    """{filename: md5} from an md5sum-style list ("<md5>  [dir/]<name>" per line),
    to pass as ``expected_md5`` for CIFAR-format data other than the official set."""
    path = pathlib.Path(path).expanduser()
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(f"cannot read md5 list {path} ({error.strerror}); fix data.md5_file") \
            from error
    checksums = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DataError(f"{path}:{number} is not '<md5>  <filename>': {line.strip()!r}")
        # md5sum marks binary mode with a leading "*"; the folder part is not ours to check.
        checksums[pathlib.PurePosixPath(parts[1].strip().lstrip("*")).name] = parts[0].lower()
    if not checksums:
        raise DataError(f"md5 list {path} is empty; fix data.md5_file")
    return checksums


def _missing_files(folder: pathlib.Path, expected_md5: dict[str, str]) -> list[str]:
    return [name for name in expected_md5 if not (folder / name).is_file()]


def _not_found_message(folder: pathlib.Path, missing: list[str]) -> str:
    if not folder.is_dir():
        return f"CIFAR-10 not found: no folder {folder}; {_WHAT_TO_SET}"
    return f"CIFAR-10 incomplete: {folder} lacks {', '.join(missing)}; {_WHAT_TO_SET}"


def _check_md5s(folder: pathlib.Path, expected_md5: dict[str, str]) -> dict[str, str]:
    """md5 of every expected file that is present; DataError on the first mismatch."""
    found = {}
    for name, expected in expected_md5.items():
        path = folder / name
        if not path.is_file():
            continue
        actual = _file_md5(path)
        if actual != expected:
            raise DataError(
                f"{path} is truncated or corrupted: md5 {actual}, expected {expected}; "
                "delete it and download CIFAR-10 again")
        found[name] = actual
    return found


def verify_cifar10(
    root: str | os.PathLike | None,
    expected_md5: dict[str, str] | None = None,
) -> dict[str, str]:
    """Check that every file exists and has its md5; return {filename: md5}.

    ``root`` may be the folder holding cifar-10-batches-py or that folder itself.
    ``expected_md5`` defaults to the official ``CIFAR10_MD5``; tests pass the md5s
    of their own tiny files.
    """
    expected_md5 = CIFAR10_MD5 if expected_md5 is None else expected_md5
    folder = _batches_dir(root)
    missing = _missing_files(folder, expected_md5)
    if missing:
        raise DataError(_not_found_message(folder, missing))
    return _check_md5s(folder, expected_md5)


def ensure_cifar10(
    root: str | os.PathLike | None,
    download: bool = True,
    expected_md5: dict[str, str] | None = None,
) -> dict[str, str]:
    """``verify_cifar10``, downloading the set with torchvision first if it is absent.

    A file that is present but corrupted is an error, never silently downloaded over.
    """
    expected_md5 = CIFAR10_MD5 if expected_md5 is None else expected_md5
    folder = _batches_dir(root)
    missing = _missing_files(folder, expected_md5)
    if not missing:
        return _check_md5s(folder, expected_md5)
    # Corrupted files among the present ones must surface before a download
    # would overwrite them.
    _check_md5s(folder, expected_md5)
    if not download:
        raise DataError(_not_found_message(folder, missing) + " (download is off)")
    before = _what_exists(folder.parent)
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(folder.parent), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - any failure means "no data", reported below
        _remove_leftovers(folder.parent, before)
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DataError(
            f"CIFAR-10 not found in {folder} and the download failed "
            f"({type(error).__name__}: {detail}); {_WHAT_TO_SET}") from error
    return verify_cifar10(folder, expected_md5)


def _what_exists(root: pathlib.Path) -> tuple[list[pathlib.Path], set[str]]:
    """The folders on the way to ``root`` that do not exist yet, and the names already in
    ``root``: what a failed download must leave as it found it."""
    absent = [p for p in (root, *root.parents) if not p.exists()]
    return absent, {p.name for p in root.iterdir()} if root.is_dir() else set()


def _remove_leftovers(root: pathlib.Path, before: tuple[list[pathlib.Path], set[str]]) -> None:
    """Undo what a failed torchvision download left under ``root``: its partial archive
    (any file that was not there before) and the folders it created, so the next try
    starts clean and a mistyped root leaves no empty folder behind."""
    absent, names = before
    if root.is_dir():
        for path in root.iterdir():
            if path.name not in names and path.is_file():
                path.unlink(missing_ok=True)
    for folder in absent:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there) or already gone
            break


def _unpickle(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}; {_WHAT_TO_SET}")
    try:
        with open(path, "rb") as f:
            # The batches were pickled by Python 2; "bytes" keeps keys as b"data" etc.
            return pickle.load(f, encoding="bytes")
    except Exception as error:  # noqa: BLE001 - truncation shows up as many exception types
        raise DataError(
            f"{path} cannot be unpickled ({type(error).__name__}: {error}); it is truncated "
            "or corrupted: delete it and download CIFAR-10 again") from error


def _field(batch: dict, key: str):
    return batch[key.encode()] if key.encode() in batch else batch[key]


def load_cifar10(root: str | os.PathLike | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3) HWC RGB, labels int64 (N,)) read straight from the pickles."""
    folder = _batches_dir(root)
    rows, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = folder / name
        batch = _unpickle(path)
        try:
            data = np.asarray(_field(batch, "data"), dtype=np.uint8)
            batch_labels = _field(batch, "labels")
        except (KeyError, TypeError) as error:
            raise DataError(f"{path} is not a CIFAR-10 batch (no {error}); check CIFAR10_ROOT") \
                from error
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise DataError(f"{path} has data of shape {data.shape} and {len(batch_labels)} "
                            "labels, expected (N, 3072) and N; check CIFAR10_ROOT")
        rows.append(data)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    # Each row is 1024 R, then 1024 G, then 1024 B values: planes to HWC in one copy.
    images = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.concatenate(labels)

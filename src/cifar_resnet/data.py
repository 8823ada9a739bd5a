"""CIFAR-10 on disk and in memory: find and verify the official batches, read
them into uint8 arrays, split them, and batch them for training.

Both loaders yield the same thing, uint8 NCHW images and int64 labels;
normalisation happens inside the model wrapper, not here.

- ``make_loader``: per-sample Albumentations transforms in worker processes.
- ``TensorLoader``: the whole set lives on the device and each batch is
  augmented at once (see ``gpu_augment``).

Every random choice is derived from ``(seed, epoch)``, so an epoch can be
replayed exactly (for a given ``num_workers``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import pathlib
import pickle
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

if TYPE_CHECKING:
    from .gpu_augment import BatchAugment

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


class DataError(RuntimeError):
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
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(folder.parent), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - any failure means "no data", reported below
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DataError(
            f"CIFAR-10 not found in {folder} and the download failed "
            f"({type(error).__name__}: {detail}); {_WHAT_TO_SET}") from error
    return verify_cifar10(folder, expected_md5)


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


# --------------------------------------------------------------------------- splits


def _class_quotas(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder,
    ties broken at random so no class is always favoured)."""
    exact = total * counts / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    remainder = total - int(quotas.sum())
    order = np.lexsort((rng.random(len(counts)), -(exact - quotas)))
    quotas[order[:remainder]] += 1
    return quotas


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): disjoint, together all indices, sorted; every class
    is represented in val in proportion to its frequency."""
    labels = np.asarray(labels)
    if not 0 <= val_size <= len(labels):
        raise ValueError(f"val_size must be in [0, {len(labels)}], got {val_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _class_quotas(counts, val_size, rng)
    val_parts = [
        rng.permutation(np.flatnonzero(labels == cls))[:quota]
        for cls, quota in zip(classes, quotas)
    ]
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx.astype(np.int64)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples with classes in proportion (balanced data ->
    balanced subset); ``n=0`` means all of them."""
    if n == 0:
        return np.arange(len(labels))
    return stratified_split(labels, n, seed)[1]


def channel_mean_std(
    images: np.ndarray, chunk: int = 4096,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale."""
    if len(images) == 0:
        raise ValueError("channel_mean_std needs at least one image")
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        # float64 per chunk keeps both memory and rounding error small.
        block = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
    count = images.size // images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m / 255) for m in mean), tuple(float(s / 255) for s in std)


@dataclass(frozen=True)
class CifarSplits:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    md5: dict[str, str]
    mean: tuple[float, float, float]  # of the train split actually used, [0, 1] scale
    std: tuple[float, float, float]


def load_splits(
    root: str | os.PathLike | None,
    val_size: int = 5000,
    train_subset: int = 0,
    seed: int = 0,
    download: bool = True,
    expected_md5: dict[str, str] | None = None,
) -> CifarSplits:
    """Verified train/val/test arrays: a stratified val split held out of the
    50,000 training images, then (``train_subset`` > 0) a stratified subset of the
    rest. The val split does not depend on ``train_subset``."""
    md5 = ensure_cifar10(root, download=download, expected_md5=expected_md5)
    images, labels = load_cifar10(root, train=True)
    test_images, test_labels = load_cifar10(root, train=False)
    train_idx, val_idx = stratified_split(labels, val_size, seed)
    if train_subset:
        train_idx = train_idx[stratified_subset(labels[train_idx], train_subset, seed)]
    train_images = images[train_idx]
    mean, std = channel_mean_std(train_images)
    return CifarSplits(
        train_images=train_images, train_labels=labels[train_idx],
        val_images=images[val_idx], val_labels=labels[val_idx],
        test_images=test_images, test_labels=test_labels,
        md5=md5, mean=mean, std=std,
    )


# --------------------------------------------------------------------------- seeding

_SHUFFLE, _AUGMENT, _LOADER = 0, 1, 2  # independent random streams per (seed, epoch)


def derive_seed(seed: int, epoch: int, stream: int, worker: int = 0) -> int:
    """A 63-bit seed for one random stream of one epoch (and worker)."""
    state = np.random.SeedSequence([seed, epoch, stream, worker]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def reseed_transform(transform: object, seed: int) -> None:
    """Restart a transform's own random state, if it has one.

    Understood: a ``reseed(seed)`` method (``augment``'s pipelines) or
    Albumentations' ``set_random_state`` (a bare ``A.Compose``). Plain functions
    are left alone; their randomness is their own business.
    """
    if hasattr(transform, "reseed"):
        transform.reseed(seed)
    elif hasattr(transform, "set_random_state"):
        # One shared stream: Compose(seed=...) would give every child an identically
        # seeded RNG of its own, which makes their choices correlated.
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


# --------------------------------------------------------------------------- per-sample path


def _check_images_and_labels(images, labels, repeats: int) -> None:
    """The argument checks both training data paths share (numpy or torch images)."""
    if images.ndim != 4 or images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


class AugmentedDataset(Dataset):
    """uint8 NHWC images seen ``repeats`` times an epoch, each time freshly transformed.

    ``transform`` takes and returns one uint8 HWC image. Items are
    (uint8 CHW tensor, int label) of image ``i % N``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        repeats: int = 1,
    ):
        _check_images_and_labels(images, labels, repeats)
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.repeats = repeats

    def __len__(self) -> int:
        return self.repeats * len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image = self.images[index % len(self.images)]
        if self.transform is not None:
            image = self.transform(image)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        return torch.from_numpy(chw), int(self.labels[index % len(self.images)])


class _EpochShuffleSampler(Sampler[int]):
    """The same permutation on every pass: it is a function of the seed alone."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _seed_worker(worker_id: int, seed: int, epoch: int) -> None:
    # Each worker is one of several processes on the cores: OpenCV's own thread pool
    # per worker would oversubscribe them (torch already sets 1 thread in workers).
    import cv2

    cv2.setNumThreads(1)
    dataset = torch.utils.data.get_worker_info().dataset
    reseed_transform(dataset.transform, derive_seed(seed, epoch, _AUGMENT, worker_id))


class _EpochLoader(DataLoader):
    """A DataLoader whose every pass replays the same (seed, epoch) augmentations,
    also without worker processes (where no worker_init_fn runs)."""

    def __init__(self, dataset: AugmentedDataset, *, seed: int, epoch: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.seed, self.epoch = seed, epoch

    def __iter__(self):
        if self.num_workers == 0:
            reseed_transform(self.dataset.transform, derive_seed(self.seed, self.epoch, _AUGMENT))
        return super().__iter__()


def make_loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    repeats: int = 1,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """One epoch's batches of (uint8 NCHW tensor, int64 labels).

    Order and augmentations are a function of (seed, epoch, num_workers): each
    worker reseeds its copy of ``transform`` from (seed, epoch, worker id), and
    iterating the loader again replays the same epoch. The caller's
    ``transform`` is copied, never reseeded in place. ``pin_memory`` only pays off
    when the batches go on to a CUDA device.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    dataset = AugmentedDataset(images, labels, copy.deepcopy(transform), repeats)
    sampler = (_EpochShuffleSampler(len(dataset), derive_seed(seed, epoch, _SHUFFLE))
               if shuffle else SequentialSampler(dataset))
    return _EpochLoader(
        dataset,
        seed=seed,
        epoch=epoch,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, seed=seed, epoch=epoch)
        if num_workers > 0 else None,
        # Worker base seeds come from here rather than from torch's global RNG,
        # which a loader should neither consume nor depend on.
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, _LOADER)),
        pin_memory=pin_memory,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------- device-resident path


class TensorLoader:
    """The whole uint8 set on ``device``, batched and augmented there.

    ``images`` are uint8 NHWC (numpy or tensor); they are moved once and kept as
    NCHW with channels_last memory. Epoch ``e`` (``set_epoch`` or
    ``iter_epoch(e)``) draws its permutation and augmentations from one generator
    on the device seeded with (seed, e); ``augment`` sees whole batches with
    their dataset indices. Yields (x uint8 NCHW, y int64), both on ``device``.
    Same device type + same seed -> the same batches (CPU and CUDA streams differ).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: BatchAugment | None = None,
        seed: int = 0,
        repeats: int = 1,
    ):
        images = torch.as_tensor(images)
        _check_images_and_labels(images, labels, repeats)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        # NHWC memory viewed as NCHW is exactly the channels_last layout.
        self.images = images.to(self.device).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.repeats = repeats
        self.epoch = 0

    @property
    def num_images(self) -> int:
        """Images an epoch shows: every image ``repeats`` times, each with fresh augmentation."""
        return len(self.labels) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_images // self.batch_size
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.images.device)
        generator.manual_seed(derive_seed(self.seed, epoch, _SHUFFLE))
        size = self.num_images
        order = (torch.randperm(size, generator=generator, device=self.images.device)
                 if self.shuffle else torch.arange(size, device=self.images.device))
        order = order % len(self.labels)
        for batch in range(len(self)):
            indices = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            x = self.images[indices]
            if self.augment is not None:
                x = self.augment(x, indices, epoch, generator, seed=self.seed)
            yield x, self.labels[indices]

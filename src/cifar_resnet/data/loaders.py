"""Training batches, from one of two paths that yield the same thing: uint8 NCHW
images and int64 labels (normalisation happens inside the model wrapper).

- ``make_loader``: per-sample Albumentations transforms in worker processes.
- ``TensorLoader``: the whole set lives on the training device (CPU or GPU) and
  each batch is augmented at once (see ``batch_augment``). With a ``mix`` (CutMix),
  which mixes labels too, its targets are float class probabilities (N, classes)
  instead.

Every random choice is derived from ``(seed, epoch)``, so an epoch can be replayed
exactly (for a given ``num_workers``), which is what resume relies on.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

# What TensorLoader calls on each batch: (uint8 NCHW images, their dataset indices, epoch,
# generator, seed=...) -> augmented images; batch_augment.BatchAugment is one. A protocol
# here, not an import, so that data stays below augmentation in the stack.
BatchTransform = Callable[..., torch.Tensor]
# And after it, one that mixes images and labels: (images, int64 labels, generator) ->
# (images, float targets (N, classes)); e.g. BatchAugment.mix with its num_classes bound.
BatchMix = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]

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


def _seed_worker(worker_id: int, seed: int, epoch: int, first_worker: int = 0) -> None:
    # Each worker is one of several processes on the cores: OpenCV's own thread pool
    # per worker would oversubscribe them (torch already sets 1 thread in workers).
    import cv2

    cv2.setNumThreads(1)
    dataset = torch.utils.data.get_worker_info().dataset
    reseed_transform(
        dataset.transform, derive_seed(seed, epoch, _AUGMENT, first_worker + worker_id)
    )


class _EpochLoader(DataLoader):
    """A DataLoader whose every pass replays the same (seed, epoch) augmentations,
    also without worker processes (where no worker_init_fn runs)."""

    def __init__(
        self, dataset: AugmentedDataset, *, seed: int, epoch: int, first_worker: int, **kwargs
    ):
        super().__init__(dataset, **kwargs)
        self.seed, self.epoch, self.first_worker = seed, epoch, first_worker

    def __iter__(self):
        if self.num_workers == 0:
            reseed_transform(
                self.dataset.transform,
                derive_seed(self.seed, self.epoch, _AUGMENT, self.first_worker),
            )
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
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """One epoch's batches of (uint8 NCHW tensor, int64 labels).

    Order and augmentations are a function of (seed, epoch, num_workers): each
    worker reseeds its copy of ``transform`` from (seed, epoch, worker id), and
    iterating the loader again replays the same epoch. The caller's
    ``transform`` is copied, never reseeded in place. ``pin_memory`` only pays off
    when the batches go on to a CUDA device.

    Data-parallel (``world_size`` > 1): this is process ``rank``'s share, from torch's
    DistributedSampler (shuffled from ``seed``, ``set_epoch(epoch)``, the tail that does
    not divide evenly dropped, so every process takes the same number of steps);
    ``batch_size`` is then the per-process batch, and the processes' workers draw
    augmentation streams of their own. Raises ValueError for a rank outside
    0 .. world_size - 1.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    dataset = AugmentedDataset(images, labels, copy.deepcopy(transform), repeats)
    if world_size > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=derive_seed(seed, 0, _SHUFFLE),
            drop_last=True,
        )
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = _EpochShuffleSampler(len(dataset), derive_seed(seed, epoch, _SHUFFLE))
    else:
        sampler = SequentialSampler(dataset)
    first_worker = rank * max(num_workers, 1)  # 0 for one process: its streams are unchanged
    return _EpochLoader(
        dataset,
        seed=seed,
        epoch=epoch,
        first_worker=first_worker,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        worker_init_fn=functools.partial(
            _seed_worker, seed=seed, epoch=epoch, first_worker=first_worker
        )
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
    their dataset indices, then ``mix`` (if any) sees the augmented batch with its
    labels. Yields (x uint8 NCHW, y), both on ``device``: y int64 (N,) labels, or with
    ``mix`` float targets (N, classes). Same device type + same seed -> the same
    batches (CPU and CUDA streams differ).

    Data-parallel (``world_size`` > 1): ``batch_size`` stays the global batch, and
    process ``rank`` yields its contiguous slice of each global batch (``batch_size /
    world_size`` images; the ragged last one split as evenly as it goes), so the
    processes together see exactly the batches, in the order, that one process with
    the same seed sees. To keep that true of the augmentations too, each process
    augments the whole global batch and keeps its slice (the random draws depend on
    the batch's size); augmentation is a few gathers, small next to the network.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: BatchTransform | None = None,
        seed: int = 0,
        repeats: int = 1,
        rank: int = 0,
        world_size: int = 1,
        mix: BatchMix | None = None,
    ):
        images = torch.as_tensor(images)
        _check_images_and_labels(images, labels, repeats)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        # NHWC memory viewed as NCHW is exactly the channels_last layout.
        self.images = images.to(self.device).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.mix = mix
        self.seed = seed
        self.repeats = repeats
        self.epoch = 0

    @property
    def num_images(self) -> int:
        """Images an epoch shows (all processes together): every image ``repeats``
        times, each with fresh augmentation."""
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
            if self.augment is None and self.mix is None:
                mine = self._share(indices)
                yield self.images[mine], self.labels[mine]
                continue
            x, y = self.images[indices], self.labels[indices]
            if self.augment is not None:
                x = self.augment(x, indices, epoch, generator, seed=self.seed)
            if self.mix is not None:  # on the global batch too: partners cross the slices
                x, y = self.mix(x, y, generator)
            yield self._share(x), self._share(y)

    def _share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a global batch (all of it for one process)."""
        if self.world_size == 1:
            return batch
        return batch.tensor_split(self.world_size)[self.rank]

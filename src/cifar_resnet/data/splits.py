"""Splits of the training batches: a stratified validation split held out, an
optional stratified subset of the rest, and the per-channel statistics of what is
trained on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .cifar10 import ensure_cifar10, load_cifar10



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

"""CIFAR-10 on disk and in memory, by concept: the official files (``cifar10``), the
splits (``splits``) and the two training-batch paths (``loaders``). Knows nothing of
MLflow, Optuna or Hydra. The names below are the package's public interface.
"""

from .cifar10 import (BATCHES_DIRNAME, CIFAR10_CLASSES, CIFAR10_MD5, CIFAR10_MEAN_PIXEL,
                      TEST_FILES, TRAIN_FILES, DataError, ensure_cifar10, load_cifar10,
                      read_md5_file, resolve_root, verify_cifar10)
from .loaders import (AugmentedDataset, TensorLoader, derive_seed, make_loader,
                      reseed_transform)
from .splits import (CifarSplits, channel_mean_std, load_splits, stratified_split,
                     stratified_subset)

__all__ = [
    "AugmentedDataset", "BATCHES_DIRNAME", "CIFAR10_CLASSES", "CIFAR10_MD5",
    "CIFAR10_MEAN_PIXEL", "CifarSplits", "DataError", "TEST_FILES", "TRAIN_FILES",
    "TensorLoader", "channel_mean_std", "derive_seed", "ensure_cifar10", "load_cifar10",
    "load_splits", "make_loader", "read_md5_file", "reseed_transform", "resolve_root",
    "stratified_split", "stratified_subset", "verify_cifar10",
]

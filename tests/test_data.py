import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_resnet import data
from cifar_resnet.augment import build_train_transform
from cifar_resnet.batch_augment import BatchAugment


@pytest.fixture
def tiny_copy(tiny_cifar, tmp_path):
    """A private copy of the tiny set that a test may damage."""
    shutil.copytree(tiny_cifar.root / data.BATCHES_DIRNAME, tmp_path / data.BATCHES_DIRNAME)
    return tmp_path


# --------------------------------------------------------------------------- files


def test_verify_accepts_root_or_batches_folder(tiny_cifar):
    assert data.verify_cifar10(tiny_cifar.root, expected_md5=tiny_cifar.md5) == tiny_cifar.md5
    batches = tiny_cifar.root / data.BATCHES_DIRNAME
    assert data.verify_cifar10(batches, expected_md5=tiny_cifar.md5) == tiny_cifar.md5


def test_official_md5_list():
    assert set(data.CIFAR10_MD5) == {*data.TRAIN_FILES, "test_batch", "batches.meta"}
    assert data.CIFAR10_MD5["test_batch"] == "40351d587109b95175f43aff81a1287e"


def test_read_md5_file(tmp_path):
    path = tmp_path / "MD5SUMS"
    path.write_text(
        "# checksums\n"
        "c99cafc152244af753f735de768cd75f  cifar-10-batches-py/data_batch_1\n"
        "40351D587109B95175F43AFF81A1287E *test_batch\n\n"
    )
    assert data.read_md5_file(path) == {
        "data_batch_1": data.CIFAR10_MD5["data_batch_1"],
        "test_batch": data.CIFAR10_MD5["test_batch"],
    }
    path.write_text("not a checksum line\n")
    with pytest.raises(data.DataError, match="MD5SUMS:1"):
        data.read_md5_file(path)
    with pytest.raises(data.DataError, match="md5_file"):
        data.read_md5_file(tmp_path / "absent")


def test_truncated_batch_is_named_with_both_md5s(tiny_copy, tiny_cifar):
    path = tiny_copy / data.BATCHES_DIRNAME / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError) as error:
        data.verify_cifar10(tiny_copy, expected_md5=tiny_cifar.md5)
    message = str(error.value)
    assert "data_batch_3" in message and "\n" not in message
    assert tiny_cifar.md5["data_batch_3"] in message
    # A present but corrupted file is an error, never downloaded over.
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.ensure_cifar10(tiny_copy, download=True, expected_md5=tiny_cifar.md5)
    with pytest.raises(data.DataError, match="data_batch_3.*unpickled"):
        data.load_cifar10(tiny_copy, train=True)


def test_missing_dir_says_where_and_what_to_set(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError) as error:
        data.verify_cifar10(missing)
    message = str(error.value)
    assert "CIFAR10_ROOT" in message and str(missing) in message and "\n" not in message


def test_ensure_without_download_on_missing_dir(tmp_path):
    with pytest.raises(data.DataError, match="CIFAR10_ROOT"):
        data.ensure_cifar10(tmp_path / "nowhere", download=False)


def test_ensure_reports_a_failed_download(tmp_path, monkeypatch):
    import torchvision

    def offline(root, **kwargs):
        # As torchvision does: the root is made and the archive started before the
        # connection fails.
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError) as error:
        data.ensure_cifar10(tmp_path / "nowhere" / "deeper", download=True)
    message = str(error.value)
    assert "Network is unreachable" in message and "CIFAR10_ROOT" in message
    assert str(tmp_path / "nowhere" / "deeper") in message
    # Nothing is left behind: no empty folders, no partial archive.
    assert list(tmp_path.iterdir()) == []

    # A root that existed keeps what it held.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(data.DataError):
        data.ensure_cifar10(kept, download=True)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    assert data.resolve_root(None) == tmp_path
    assert data.resolve_root("") == tmp_path
    monkeypatch.delenv("CIFAR10_ROOT")
    assert data.resolve_root(None) == Path.cwd() / "data"
    assert data.resolve_root("~/x") == Path.home() / "x"


def test_load_shapes_and_known_pixel(tiny_cifar, tiny_known_image):
    images, labels = data.load_cifar10(tiny_cifar.root, train=True)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [20] * 10
    assert images.flags.c_contiguous
    np.testing.assert_array_equal(images[0], tiny_known_image)
    # HWC RGB: (y, x) = (1, 2) holds R = 8y, G = 8x, B = 255 - 4(x + y).
    assert images[0, 1, 2].tolist() == [8, 16, 243]
    test_images, test_labels = data.load_cifar10(tiny_cifar.root, train=False)
    assert test_images.shape == (100, 32, 32, 3) and np.bincount(test_labels).tolist() == [10] * 10


# --------------------------------------------------------------------------- splits


def test_stratified_split_disjoint_complete_balanced_deterministic():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)
    train, val = data.stratified_split(labels, 155, seed=3)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    counts = np.bincount(labels[val], minlength=10)
    assert counts.sum() == 155 and counts.min() >= 15 and counts.max() <= 16
    again = data.stratified_split(labels, 155, seed=3)
    assert np.array_equal(again[1], val) and np.array_equal(again[0], train)
    assert not np.array_equal(data.stratified_split(labels, 155, seed=4)[1], val)
    train_all, val_none = data.stratified_split(labels, 0, seed=3)
    assert len(val_none) == 0 and len(train_all) == 1000


def test_stratified_split_is_proportional_for_unbalanced_labels():
    labels = np.array([0] * 800 + [1] * 200)
    _, val = data.stratified_split(labels, 100, seed=0)
    assert np.bincount(labels[val]).tolist() == [80, 20]


def test_stratified_subset():
    labels = np.repeat(np.arange(10), 50)
    subset = data.stratified_subset(labels, 40, seed=0)
    assert len(np.unique(subset)) == 40 and np.bincount(labels[subset]).tolist() == [4] * 10
    assert np.array_equal(data.stratified_subset(labels, 0, seed=0), np.arange(500))


def test_channel_mean_std_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    mean, std = data.channel_mean_std(images, chunk=5)
    np.testing.assert_allclose(mean, images.mean((0, 1, 2)) / 255, rtol=1e-10)
    np.testing.assert_allclose(std, images.std((0, 1, 2)) / 255, rtol=1e-8)


def test_load_splits_sizes(tiny_cifar):
    splits = data.load_splits(
        tiny_cifar.root,
        val_size=50,
        train_subset=100,
        seed=0,
        download=False,
        expected_md5=tiny_cifar.md5,
    )
    assert splits.train_images.shape == (100, 32, 32, 3) and len(splits.train_labels) == 100
    assert splits.val_images.shape == (50, 32, 32, 3)
    assert splits.test_images.shape == (100, 32, 32, 3)
    assert np.bincount(splits.train_labels).tolist() == [10] * 10
    assert np.bincount(splits.val_labels).tolist() == [5] * 10
    assert splits.md5 == tiny_cifar.md5
    assert splits.mean == data.channel_mean_std(splits.train_images)[0]
    # Val is held out of train, and fixed whatever the train subset.
    train_rows = {image.tobytes() for image in splits.train_images}
    assert not any(image.tobytes() in train_rows for image in splits.val_images)
    full = data.load_splits(
        tiny_cifar.root, val_size=50, seed=0, download=False, expected_md5=tiny_cifar.md5
    )
    assert len(full.train_labels) == 150
    np.testing.assert_array_equal(full.val_images, splits.val_images)


# --------------------------------------------------------------------------- per-sample path


def _indexed_images(count: int) -> np.ndarray:
    """Images whose pixel (0, 0, 0) is their index (mod 256)."""
    images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    return images


def test_augmented_dataset_repeats():
    images = _indexed_images(5)
    dataset = data.AugmentedDataset(images, np.arange(5), repeats=3)
    assert len(dataset) == 15
    image, label = dataset[12]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert label == 2 and image[0, 0, 0] == 2
    with pytest.raises(IndexError):
        dataset[15]


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_make_loader_is_deterministic_in_seed_and_epoch(tiny_cifar, num_workers):
    images, labels = data.load_cifar10(tiny_cifar.root, train=True)
    images, labels = images[:96], labels[:96]

    def loader(seed, epoch):
        # A fresh transform each time: its own random state must not matter.
        transform = build_train_transform("standard")
        return data.make_loader(
            images,
            labels,
            16,
            transform=transform,
            repeats=2,
            shuffle=True,
            num_workers=num_workers,
            seed=seed,
            epoch=epoch,
        )

    first = loader(seed=0, epoch=0)
    batches = _collect(first)
    assert len(batches) == 12
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert _same(batches, _collect(loader(seed=0, epoch=0)))
    assert _same(batches, _collect(first))  # a second pass replays the epoch
    assert not _same(batches, _collect(loader(seed=0, epoch=1)))
    assert not _same(batches, _collect(loader(seed=1, epoch=0)))
    # Every image twice (repeats=2), and augmented.
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(
        torch.bincount(seen, minlength=10),
        2 * torch.bincount(torch.as_tensor(labels), minlength=10),
    )
    unaugmented = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert not any(torch.equal(x[0], image) for image in unaugmented for x, _ in batches[:2])


def test_make_loader_without_shuffle_keeps_order():
    images = _indexed_images(10)
    batches = _collect(data.make_loader(images, np.arange(10), 4))
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0][0][:, 0, 0, 0].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- device-resident path


def test_tensor_loader_covers_every_sample_once_and_is_deterministic():
    images = _indexed_images(103)
    loader = data.TensorLoader(images, np.arange(103), 10, "cpu", shuffle=True, seed=5)
    assert len(loader) == 11
    epoch0 = _collect(loader)
    x, y = epoch0[0]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    seen = torch.cat([y for _, y in epoch0])
    assert sorted(seen.tolist()) == list(range(103))
    # Images travel with their labels.
    assert torch.equal(torch.cat([x[:, 0, 0, 0] for x, _ in epoch0]), seen.to(torch.uint8))
    assert _same(epoch0, _collect(loader))
    assert _same(
        epoch0, _collect(data.TensorLoader(images, np.arange(103), 10, "cpu", shuffle=True, seed=5))
    )
    loader.set_epoch(1)
    assert not _same(epoch0, _collect(loader))
    assert _same(epoch0, _collect(loader.iter_epoch(0)))

    dropping = data.TensorLoader(images, np.arange(103), 10, "cpu", shuffle=True, drop_last=True)
    assert len(dropping) == 10 and len(_collect(dropping)) == 10


def test_tensor_loader_repeats_show_every_image_k_times():
    loader = data.TensorLoader(_indexed_images(7), np.arange(7), 4, "cpu", shuffle=True, repeats=3)
    assert loader.num_images == 21 and len(loader) == 6
    seen = torch.cat([y for _, y in _collect(loader)])
    assert sorted(seen.tolist()) == sorted(list(range(7)) * 3)


def test_tensor_loader_augments_deterministically():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    augment = BatchAugment(crop_pad=4, flip="alternating", cutout=8, cutout_p=1.0)

    def run(seed):
        return _collect(
            data.TensorLoader(
                images, np.arange(40), 16, "cpu", shuffle=True, augment=augment, seed=seed
            )
        )

    batches = run(0)
    assert _same(batches, run(0)) and not _same(batches, run(1))
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8
    raw = torch.from_numpy(images).permute(0, 3, 1, 2)[y]
    assert not torch.equal(x, raw)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_train(cifar_root):
    return data.load_cifar10(cifar_root, train=True)


@pytest.mark.cifar
def test_real_md5s_verify(cifar_root):
    assert data.verify_cifar10(cifar_root) == data.CIFAR10_MD5


@pytest.mark.cifar
def test_real_counts(cifar_root, real_train):
    images, labels = real_train
    test_images, test_labels = data.load_cifar10(cifar_root, train=False)
    assert images.shape == (50_000, 32, 32, 3) and test_images.shape == (10_000, 32, 32, 3)
    assert np.bincount(labels).tolist() == [5000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10


@pytest.mark.cifar
def test_real_channel_mean(real_train):
    mean, std = data.channel_mean_std(real_train[0])
    np.testing.assert_allclose(mean, (0.4914, 0.4822, 0.4465), atol=5e-4)
    np.testing.assert_allclose(std, (0.2470, 0.2435, 0.2616), atol=5e-4)

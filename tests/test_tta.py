"""The test-time view sets: what each view does, and that the module stays small
enough (torch only) for the served model to import."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cifar_resnet import tta
from cifar_resnet.batch_augment import translate


@pytest.mark.parametrize(
    "name, count", [("identity", 1), ("flip", 2), ("flip_shift", 6), ("seed", 5)]
)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tta_view_sets(name, count, dtype):
    batch = torch.randint(0, 256, (4, 3, 32, 32)).to(dtype)
    views = tta.tta_views(name)
    assert len(views) == count == len(tta.TTA_VIEWS[name])
    for view in views:
        out = view(batch)
        assert out.shape == batch.shape and out.dtype == dtype
    assert torch.equal(views[0](batch), batch)
    if count > 1:
        assert torch.equal(
            views[1 if name != "flip_shift" else 3](batch), torch.flip(batch, dims=[3])
        )
    # No view of a set repeats another: each one adds a different look at the images.
    outputs = [view(batch) for view in views]
    assert all(
        not torch.equal(outputs[i], outputs[j]) for i in range(count) for j in range(i + 1, count)
    )


def test_none_is_identity():
    assert tta.TTA_VIEWS["none"] == tta.TTA_VIEWS["identity"] == ("identity",)


def test_tta_views_do_what_they_say():
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    views = dict(zip(tta.TTA_VIEWS["flip_shift"], tta.tta_views("flip_shift")))
    # shift_dr moves the content one pixel down and right.
    assert torch.equal(views["shift_dr"](batch)[:, :, 1:, 1:], batch[:, :, :-1, :-1])
    assert torch.equal(views["shift_ul"](batch)[:, :, :-1, :-1], batch[:, :, 1:, 1:])
    assert torch.equal(
        views["hflip_shift_dr"](batch), translate(batch.flip(3), torch.tensor([[-1, -1]]))
    )
    assert torch.equal(
        views["hflip_shift_ul"](batch), translate(batch.flip(3), torch.tensor([[1, 1]]))
    )
    identity, hflip, blur, brighter, contrast = tta.tta_views("seed")
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(blur(flat), flat)  # a blur keeps a flat image
    assert brighter(flat).unique().tolist() == [110]
    assert brighter(torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)).unique().tolist() == [255]
    two_tone = torch.tensor([0.4, 0.6]).repeat(1, 3, 2, 1)
    np.testing.assert_allclose(contrast(two_tone).unique().tolist(), [0.39, 0.61], atol=1e-6)


@pytest.mark.parametrize("dy, dx", [(-1, -1), (1, 1), (0, 3), (-4, 2)])
def test_shift_is_the_training_translation_applied_to_every_image(dy, dx):
    batch = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    batch = batch.contiguous(memory_format=torch.channels_last)
    shifted = tta.shift(batch, dy, dx)
    assert torch.equal(shifted, translate(batch, torch.tensor([[dy, dx]])))
    assert shifted.is_contiguous(memory_format=torch.channels_last)


def test_reflect_index_is_reflect_101():
    positions = torch.arange(-4, 12)
    expected = np.pad(np.arange(8), 4, mode="reflect")
    assert tta.reflect_index(positions, 8).tolist() == expected.tolist()
    assert tta.reflect_index(positions, 1).tolist() == [0] * len(positions)


def test_unknown_tta_set():
    with pytest.raises(ValueError, match="flip_shift"):
        tta.tta_views("ten_crop")
    with pytest.raises(ValueError, match="ten_crop"):
        tta.metric_name("ten_crop")


def test_metric_names_carry_the_view_set():
    assert tta.metric_name("flip") == "test_acc_tta_flip"
    assert tta.metric_name("flip_shift", "test_loss") == "test_loss_tta_flip_shift"


def test_importing_tta_loads_no_other_project_module_and_only_torch():
    code = (
        "import sys; before = set(sys.modules); import cifar_resnet.tta; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    assert "cifar_resnet.tta" in loaded and "torch" in loaded
    project = [m for m in loaded if m.startswith("cifar_resnet")]
    assert project == ["cifar_resnet", "cifar_resnet.tta"]
    for heavy in ("albumentations", "cv2", "mlflow", "hydra", "optuna", "torchvision", "PIL"):
        assert heavy not in loaded

"""The batched TrivialAugmentWide against torchvision's per-image ops: every op at every
magnitude bin and sign gives, image by image, exactly what
``torchvision.transforms.v2.functional`` gives for that op and magnitude."""

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from conftest import known_image
from torchvision.transforms import InterpolationMode

from cifar_resnet.policy_augment import (
    NUM_MAGNITUDE_BINS,
    TRIVIAL_AUGMENT_WIDE_OPS,
    PolicyDraw,
    TrivialAugmentWide,
    magnitude_table,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEAREST = InterpolationMode.NEAREST


def torchvision_op(image, name: str, magnitude: float):
    """One op on one image, called as torchvision's TrivialAugmentWide calls it
    (v2 ``_AutoAugmentBase._apply_image_or_video_transform``, fill None)."""
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(
            image,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
            interpolation=NEAREST,
            center=[0, 0],
        )
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(
            image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST
        )
    if name == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=NEAREST)
    return {
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
    }[name]()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference runs op by op on 32 x 32 images, where forking a thread pool per
    call costs far more than the op (35 ms against 0.2 ms for a sharpness on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    """Three 32 x 32 uint8 CHW images that reach the ops' corner cases: noise (every
    value, ties at Solarize's thresholds), CIFAR's known image (smooth ramps), and a
    grey one whose channels are equal (saturation's blend lands on whole numbers) with a
    flat top half (Equalize's and AutoContrast's degenerate histograms)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 32, 32), generator=generator, dtype=torch.uint8)
    ramps = torch.from_numpy(known_image()).permute(2, 0, 1)
    grey = noise[:1].expand(3, -1, -1).clone()
    grey[:, :16] = 77
    return torch.stack([noise, ramps, grey])


def test_the_magnitude_table_is_torchvisions():
    magnitudes, signed = magnitude_table()
    # torchvision keeps the space in a class attribute; its key order is the op order.
    space = T.TrivialAugmentWide._AUGMENTATION_SPACE
    assert tuple(space) == TRIVIAL_AUGMENT_WIDE_OPS
    for row, (name, (bins_of, is_signed)) in enumerate(space.items()):
        expected = bins_of(NUM_MAGNITUDE_BINS, 32, 32)
        if expected is None:
            assert not magnitudes[row].any()
        else:
            assert torch.equal(magnitudes[row], expected.float()), name
        assert bool(signed[row]) == is_signed, name


@pytest.mark.parametrize("name", TRIVIAL_AUGMENT_WIDE_OPS)
def test_each_op_at_every_bin_and_sign_is_torchvisions_exactly(images, name):
    op = TRIVIAL_AUGMENT_WIDE_OPS.index(name)
    bins = torch.arange(NUM_MAGNITUDE_BINS).repeat_interleave(2 * len(images))
    negate = torch.tensor([False, True]).repeat_interleave(len(images)).repeat(NUM_MAGNITUDE_BINS)
    draw = PolicyDraw(torch.full_like(bins, op), bins, negate)
    batch = images.repeat(2 * NUM_MAGNITUDE_BINS, 1, 1, 1)
    policy = TrivialAugmentWide()
    out = policy.apply(batch, draw)
    magnitudes = policy.magnitudes(draw).tolist()
    # Signed ops see both signs; the others the same magnitude twice.
    assert sorted(set(magnitudes))[0] < 0 or not magnitude_table()[1][op]
    for image, result, magnitude in zip(batch, out, magnitudes):
        assert torch.equal(result, torchvision_op(image, name, magnitude)), f"{name} {magnitude}"


@pytest.mark.parametrize("device", DEVICES)
def test_a_drawn_batch_is_torchvisions_op_by_op_and_keeps_dtype_shape_and_layout(images, device):
    batch = images.repeat(16, 1, 1, 1).contiguous(memory_format=torch.channels_last).to(device)
    policy = TrivialAugmentWide()
    draw = policy.sample(len(batch), torch.Generator(device=device).manual_seed(1))
    out = policy.apply(batch, draw)
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device == batch.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    names = [TRIVIAL_AUGMENT_WIDE_OPS[i] for i in draw.ops.tolist()]
    for image, result, name, magnitude in zip(
        batch.cpu(), out.cpu(), names, policy.magnitudes(draw).tolist()
    ):
        assert torch.equal(result, torchvision_op(image, name, magnitude)), f"{name} {magnitude}"


def test_every_op_bin_and_sign_is_drawn_uniformly():
    draw = TrivialAugmentWide().sample(14_000, torch.Generator().manual_seed(0))
    ops = torch.bincount(draw.ops, minlength=len(TRIVIAL_AUGMENT_WIDE_OPS))
    assert len(ops) == len(TRIVIAL_AUGMENT_WIDE_OPS) and ops.min() > 850 and ops.max() < 1150
    assert set(draw.bins.tolist()) == set(range(NUM_MAGNITUDE_BINS))
    assert 6_700 < int(draw.negate.sum()) < 7_300


def test_identity_and_each_ops_zero_bin_leave_images_unchanged(images):
    policy = TrivialAugmentWide()
    zero_is_identity = [
        TRIVIAL_AUGMENT_WIDE_OPS.index(name)
        for name in ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                     "Brightness", "Color", "Contrast", "Sharpness", "Posterize")
    ]  # fmt: skip
    ops = torch.tensor(zero_is_identity).repeat_interleave(len(images))
    batch = images.repeat(len(zero_is_identity), 1, 1, 1)
    for negate in (False, True):
        draw = PolicyDraw(
            ops, torch.zeros_like(ops), torch.full_like(ops, negate, dtype=torch.bool)
        )
        assert torch.equal(policy.apply(batch, draw), batch)


@pytest.mark.parametrize("device", DEVICES)
def test_the_generator_alone_decides(images, device):
    policy = TrivialAugmentWide()
    batch = images.repeat(8, 1, 1, 1).to(device)
    global_state = torch.get_rng_state()

    def run(seed):
        return policy(batch, torch.Generator(device=device).manual_seed(seed))

    first = run(0)
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_applies_a_draw_as_the_cpu_does(images):
    policy = TrivialAugmentWide()
    batch = images.repeat(64, 1, 1, 1)
    draw = policy.sample(len(batch), torch.Generator().manual_seed(2))
    on_cuda = policy.apply(batch.cuda(), PolicyDraw(*(v.cuda() for v in draw)))
    assert torch.equal(on_cuda.cpu(), policy.apply(batch, draw))


def test_other_dtypes_and_channel_counts_are_refused(images):
    policy = TrivialAugmentWide()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="uint8"):
        policy(images.float(), generator)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        policy(images[:, :1], generator)
    assert policy(images[:0], generator).shape == (0, 3, 32, 32)

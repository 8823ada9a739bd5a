"""The parts of one training, from typed settings: the machine (device, threads,
precision), the network, the data and its batches, the optimiser and its company,
the fit and the test read. ``training`` puts them in their one order. Knows nothing
of Hydra or MLflow.

Over 300 lines on purpose: each builder is short, and they read as one list.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data, distributed, engine, hardware
from .batch_augment import BatchAugment
from .config import ConfigError, DataSettings, ModelSettings, TrainSettings
from .models import ImageClassifier, build_model, count_parameters
from .optim import (
    SAM,
    Lookahead,
    ModelEMA,
    build_optimizer,
    build_scheduler,
    norm_group_options,
    param_groups,
)


def build_network(settings: ModelSettings, num_classes: int = 10) -> nn.Module:
    """``settings``' network; ConfigError for a parameter count over ``settings.max_params``."""
    net = build_model(settings.name, num_classes=num_classes, **settings.kwargs)
    params = count_parameters(net)
    if params > settings.max_params:
        raise ConfigError(
            f"model {settings.name} has {params:,} parameters, over the limit "
            f"model.max_params={settings.max_params:,}"
        )
    return net


def load_data(settings: DataSettings) -> data.CifarSplits:
    """The verified splits that ``settings`` describe (train, validation, test)."""
    return data.load_splits(
        settings.root,
        val_size=settings.val_size,
        train_subset=settings.train_subset,
        seed=settings.split_seed,
        download=settings.download,
        expected_md5=_expected_md5(settings),
    )


def load_test_set(settings: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 verified test images and labels, without reading the training batches."""
    data.ensure_cifar10(
        settings.root, download=settings.download, expected_md5=_expected_md5(settings)
    )
    return data.load_cifar10(settings.root, train=False)


def _expected_md5(settings: DataSettings) -> dict[str, str] | None:
    return data.read_md5_file(settings.md5_file) if settings.md5_file else None


def train_batches(
    settings: TrainSettings,
    splits: data.CifarSplits,
    device: torch.device,
    world: distributed.World = distributed.SINGLE,
) -> Callable[[int], Iterable]:
    """epoch -> that epoch's training batches, reproducible from (seed, epoch).

    Under torchrun, this process's share of them: ``train.batch_size`` is the global
    batch (ConfigError when it does not divide over ``world.size`` processes); the
    tensor path slices each global batch, the Albumentations path uses torch's
    DistributedSampler. The number of steps an epoch is the same as for one process.
    """
    images, labels = splits.train_images, splits.train_labels
    batch_size = settings.train.batch_size
    rank_batch = distributed.per_rank_batch(batch_size, world)
    # Dropping the ragged last batch keeps BN statistics sane, unless the set is tiny.
    drop_last = len(labels) * settings.data.repeats > batch_size
    if settings.data.loader == "tensor":
        aug = BatchAugment(**settings.augment.tensor) if settings.augment.tensor else None
        mix = None
        if aug is not None and aug.cutmix > 0:
            mix = functools.partial(aug.mix, num_classes=len(data.CIFAR10_CLASSES))
        loader = data.TensorLoader(
            images,
            labels,
            batch_size,
            device,
            shuffle=True,
            drop_last=drop_last,
            augment=aug,
            seed=settings.seed,
            repeats=settings.data.repeats,
            rank=world.rank,
            world_size=world.size,
            mix=mix,
        )

        def tensor_epoch(epoch: int):
            loader.set_epoch(epoch)
            return loader

        return tensor_epoch
    from .augment import build_train_transform  # Albumentations: only on this path

    transform = build_train_transform(settings.augment.name, **settings.augment.params)

    def loader_epoch(epoch: int):
        return data.make_loader(
            images,
            labels,
            rank_batch,
            transform=transform,
            repeats=settings.data.repeats,
            shuffle=True,
            drop_last=drop_last,
            num_workers=settings.data.num_workers,
            seed=settings.seed,
            epoch=epoch,
            pin_memory=device.type == "cuda",
            rank=world.rank,
            world_size=world.size,
        )

    return loader_epoch


def prepare_machine(
    settings: TrainSettings, world: distributed.World = distributed.SINGLE
) -> tuple[TrainSettings, torch.device]:
    """Decide device, threads and precision once, for everything the run does next.

    Returns ``settings`` with ``train.precision`` resolved (fp32, bf16 or fp16) and the
    device. Where the hardware checks cannot tell, ``precision: auto`` times both
    precisions on the run's network (see ``hardware.resolve_precision``); that leaves
    the random state alone. Under torchrun (``world``, its process group joined):
    CUDA means ``cuda:LOCAL_RANK``, ``train.threads: 0`` shares the usable cores among
    the machine's processes, and every process takes rank 0's precision. Raises
    ConfigError for ``train.sync_bn`` off CUDA and for a global batch that does not
    divide over the processes.
    """
    t = settings.train
    device = distributed.training_device(hardware.resolve_device(t.device), world)
    distributed.check_sync_bn(t.sync_bn, device)
    distributed.per_rank_batch(t.batch_size, world)
    if world.distributed and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the CUDA RNG use this process's GPU
    threads = t.threads
    if not threads and world.local_size > 1 and not os.environ.get("OMP_NUM_THREADS"):
        # OMP_NUM_THREADS is per process already (torchrun sets 1); cores are not.
        threads = max(1, hardware.usable_cores() // world.local_size)
    hardware.configure_threads(threads)

    @functools.cache
    def probe() -> nn.Module:  # built once, only if a measurement is needed
        with torch.random.fork_rng(devices=[]):
            return ImageClassifier(build_network(settings.model), (0.5,) * 3, (0.25,) * 3)

    def measure(dtype: torch.dtype | None) -> float:
        # measure_images_per_second times a copy, so both precisions start from one net.
        return measure_images_per_second(probe(), min(t.batch_size, 128), device, dtype)

    precision = hardware.resolve_precision(t.precision, device, measure=measure)
    precision = distributed.from_main(precision, world)  # a measurement may differ by rank
    configure_backend(device, t.deterministic)
    return dataclasses.replace(settings, train=dataclasses.replace(t, precision=precision)), device


def machine_params(settings: TrainSettings, device: torch.device) -> dict[str, str | int]:
    """What a run logs of the machine beside its config (which keeps the *requested*
    precision): the resolved precision, the hardware and the threads."""
    return {
        "resolved_precision": settings.train.precision,
        "device": str(device),
        "hardware": hardware.describe(device),
        "cpu_class": hardware.cpu_class(),
        "cpu_threads": torch.get_num_threads(),
    }


def configure_backend(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning and TF32 on CUDA; with ``deterministic``, PyTorch's deterministic
    algorithms instead (an op without one raises), cuDNN autotuning off and the cuBLAS
    workspace that deterministic matmuls need."""
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Fixed input shapes: let cuDNN pick the fastest kernels once.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def model_optimizer(
    settings: TrainSettings, model: nn.Module, steps_per_epoch: int
) -> torch.optim.Optimizer:
    """``settings.optim``'s optimiser over ``model``'s parameter groups (see
    ``optim.param_groups``); Muon's iteration runs in the resolved precision."""
    o = settings.optim
    groups = param_groups(
        model,
        o.weight_decay,
        o.norm_lr_scale,
        o.norm_decay,
        orthogonal_filters=o.name == "muon",
        separate=stem_bias_groups(settings, model, steps_per_epoch),
    )
    return build_optimizer(
        groups,
        o.name,
        lr=o.lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        nesterov=o.nesterov,
        betas=o.betas,
        muon_lr=o.muon_lr,
        muon_momentum=o.muon_momentum,
        muon_dtype=hardware.autocast_dtype(settings.train.precision) or torch.float32,
    )


def check_network(settings: TrainSettings) -> None:
    """Build ``settings.model``'s network once, so that what it cannot honour is refused
    before any data is read or the machine measured: a parameter count over
    ``model.max_params``, or ``optim.stem_bias_schedule=anneal`` on a net whose stem
    bias never freezes. Raises ConfigError (one line)."""
    net = build_network(settings.model)
    if settings.optim.stem_bias_schedule == "anneal":
        _freezing_stem_bias(settings, net)


def stem_bias_groups(settings: TrainSettings, model: nn.Module, steps_per_epoch: int) -> list[dict]:
    """``optim.stem_bias_schedule=anneal``: the whitening stem's bias in a group of its
    own that trains like the BN parameters (``norm_lr_scale``, ``norm_decay``) and whose
    rate falls to zero by the step its net freezes it (airbench94_muon, Jordan 2024).
    ``freeze`` (or a stem bias that never trains): no group, the bias stays with the
    other biases. ConfigError for a net without a stem bias that freezes."""
    o = settings.optim
    if o.stem_bias_schedule == "freeze":
        return []
    bias, epochs = _freezing_stem_bias(settings, model)
    if epochs == 0:
        return []
    return [
        {
            "params": [bias],
            **norm_group_options(o.weight_decay, o.norm_lr_scale, o.norm_decay),
            "anneal_steps": epochs * steps_per_epoch,
        }
    ]


def _freezing_stem_bias(settings: TrainSettings, model: nn.Module) -> tuple[nn.Parameter, int]:
    """The stem's bias and the epochs it trains for, or ConfigError naming the model."""
    net = getattr(model, "net", model)
    stem, epochs = getattr(net, "stem", None), getattr(net, "stem_bias_epochs", None)
    if getattr(stem, "bias", None) is None or epochs is None:
        raise ConfigError(
            "optim.stem_bias_schedule=anneal needs a whitening stem whose bias freezes "
            f"after model.kwargs.stem_bias_epochs epochs (model=airbench_net); "
            f"model={settings.model.name} with {settings.model.kwargs} has none"
        )
    return stem.bias, epochs


def build_parts(
    settings: TrainSettings,
    net: nn.Module,
    splits: data.CifarSplits,
    steps_per_epoch: int,
    device: torch.device,
) -> engine.TrainingParts:
    model = ImageClassifier(net, splits.mean, splits.std).to(device)
    # A data-dependent init (whitened_resnet's stem) sees unaugmented training images;
    # airbench fits its whitening on 5,000 of them.
    model.init_from_images(torch.as_tensor(splits.train_images[:5000]).permute(0, 3, 1, 2))
    if settings.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = settings.optim
    optimizer = model_optimizer(settings, model, steps_per_epoch)
    s = settings.schedule
    total_steps = settings.train.epochs * steps_per_epoch
    scheduler = build_scheduler(
        optimizer,
        s.name,
        total_steps=total_steps,
        pct_start=s.pct_start,
        anneal_strategy=s.anneal_strategy,
        div_factor=s.div_factor,
        final_div_factor=s.final_div_factor,
    )
    scaler = (
        torch.amp.GradScaler(device.type)
        if hardware.needs_grad_scaler(settings.train.precision)
        else None
    )
    lookahead = (
        Lookahead(
            model.parameters(),
            o.lookahead_k,
            o.lookahead_alpha,
            ramp_steps=total_steps if o.lookahead_ramp else 0,
            buffers=model.buffers() if o.lookahead_buffers else (),
        )
        if o.lookahead_k > 0
        else None
    )
    ema = (
        ModelEMA(model, settings.train.ema_decay, warmup_steps=steps_per_epoch)
        if settings.train.ema_decay > 0
        else None
    )
    sam = SAM(model.parameters(), o.sam_rho, adaptive=o.sam_adaptive) if o.sam_rho > 0 else None
    return engine.TrainingParts(model, optimizer, scheduler, scaler, lookahead, ema, sam)


def steps_per_epoch(batches: Callable[[int], Iterable]) -> int:
    return len(batches(1))


def run_fit(
    settings: TrainSettings,
    splits: data.CifarSplits,
    parts: engine.TrainingParts,
    batches: Callable[[int], Iterable],
    device: torch.device,
    *,
    state: engine.TrainState | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_extra: dict | None = None,
    logger=None,
    world: distributed.World = distributed.SINGLE,
) -> engine.TrainState:
    t = settings.train
    return engine.fit(
        parts,
        batches,
        splits.val_images,
        splits.val_labels,
        device,
        epochs=t.epochs,
        state=state,
        label_smoothing=t.label_smoothing,
        amp_dtype=hardware.autocast_dtype(t.precision),
        grad_clip=t.grad_clip,
        patience=t.patience,
        eval_batch_size=t.eval_batch_size,
        channels_last=t.channels_last,
        compile=t.compile,
        checkpoint_dir=checkpoint_dir,
        checkpoint_extra=checkpoint_extra,
        logger=logger,
        progress=t.progress,
        world=world,
    )


def load_chosen_checkpoint(parts: engine.TrainingParts, checkpoint_dir: Path) -> None:
    """Restore ``parts`` from the checkpoint chosen on validation (``best.pt``; the last
    epoch's without a validation split). Raises FileNotFoundError when there is none."""
    parts.load_state_dict(engine.load_checkpoint(checkpoint_dir / "best.pt")["parts"])


def test_chosen_checkpoint(
    settings: TrainSettings,
    splits: data.CifarSplits,
    parts: engine.TrainingParts,
    checkpoint_dir: Path,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    """Load the checkpoint chosen on validation and read the test set, once.

    Returns the summary metrics and the test logits (for the reports)."""
    load_chosen_checkpoint(parts, checkpoint_dir)
    model = parts.eval_model()
    t = settings.train
    amp = hardware.autocast_dtype(t.precision)

    def test(views=None) -> tuple[float, float, torch.Tensor]:
        return engine.evaluate(
            model,
            splits.test_images,
            splits.test_labels,
            device,
            batch_size=t.eval_batch_size,
            amp_dtype=amp,
            views=views,
        )

    test_loss, test_acc, logits = test()
    summary = {"test_acc": test_acc, "test_loss": test_loss}
    if t.tta != "none":
        from .tta import metric_name, tta_views

        # The view set is part of the name: flip and flip_shift are different measurements.
        _, summary[metric_name(t.tta)], _ = test(tta_views(t.tta))
    return summary, logits


def measure_images_per_second(
    model: nn.Module,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    steps: int = 2,
) -> float:
    """Forward+backward images per second of a throw-away copy of ``model`` on random
    pixels (uint8 NCHW, ``batch_size`` a step), under autocast to ``amp_dtype``.

    Leaves every random number generator as it found it, so probing the machine does
    not change what the run's seed gives."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).to(device).train()
        x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch_size,), device=device)

        def step() -> None:
            with engine.autocast(device, amp_dtype):
                loss = F.cross_entropy(probe(x), y)
            loss.backward()

        step()  # warm-up: allocator, kernel choice
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
        return steps * batch_size / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def long_run_warning(
    settings: TrainSettings,
    train_images: int,
    model: nn.Module,
    device: torch.device,
    hours_limit: float = 1.0,
) -> str | None:
    """A warning with an estimate when the training would take hours here.

    ``model`` is the run's ImageClassifier (a copy is timed). Only runs the probe for
    big jobs, so smoke runs and tests start at once."""
    t = settings.train
    planned = t.epochs * train_images * settings.data.repeats
    if planned < 1_000_000:
        return None
    rate = measure_images_per_second(
        model, t.batch_size, device, hardware.autocast_dtype(t.precision)
    )
    hours = planned / rate / 3600
    if hours < hours_limit:
        return None
    advice = (
        "for a shorter run use recipe=fast (mlflow run . -e train -P overrides=recipe=fast)"
        if settings.recipe != "fast"
        else "fewer epochs (train.epochs=N) shorten it"
    )
    return (
        f"warning: {t.epochs} epochs of {settings.model.name} on {device} will take about "
        f"{hours:.1f} hours ({rate:.0f} images/s measured here); {advice}"
    )

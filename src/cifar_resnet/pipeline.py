"""One training, from typed settings to trained weights: the piece that the
train, tune and finetune stages share. Knows nothing of Hydra or MLflow; the
stage hands in a logger and a checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import augment, data, engine
from .config import ConfigError, ModelSettings, TrainSettings
from .gpu_augment import BatchAugment
from .models import ImageClassifier, build_model, count_parameters
from .optim import Lookahead, ModelEMA, build_optimizer, build_scheduler, param_groups


def build_network(settings: ModelSettings, num_classes: int = 10) -> nn.Module:
    """Build the network and enforce the parameter budget before any data is read."""
    net = build_model(settings.name, num_classes=num_classes, **settings.kwargs)
    params = count_parameters(net)
    if params > settings.max_params:
        raise ConfigError(f"model {settings.name} has {params:,} parameters, over the limit "
                          f"model.max_params={settings.max_params:,}")
    return net


def train_batches(settings: TrainSettings, splits: data.CifarSplits,
                  device: torch.device) -> Callable[[int], Iterable]:
    """epoch -> that epoch's training batches, reproducible from (seed, epoch)."""
    images, labels = splits.train_images, splits.train_labels
    batch_size = settings.train.batch_size
    # Dropping the ragged last batch keeps BN statistics sane, unless the set is tiny.
    drop_last = len(labels) * settings.data.repeats > batch_size
    if settings.data.loader == "tensor":
        aug = BatchAugment(**settings.augment.tensor) if settings.augment.tensor else None
        loader = data.TensorLoader(images, labels, batch_size, device, shuffle=True,
                                   drop_last=drop_last, augment=aug, seed=settings.seed)

        def tensor_epoch(epoch: int):
            loader.set_epoch(epoch)
            return loader

        return tensor_epoch
    transform = augment.build_train_transform(settings.augment.name, **settings.augment.params)

    def loader_epoch(epoch: int):
        return data.make_loader(images, labels, batch_size, transform=transform,
                                repeats=settings.data.repeats, shuffle=True, drop_last=drop_last,
                                num_workers=settings.data.num_workers, seed=settings.seed,
                                epoch=epoch)

    return loader_epoch


def build_parts(settings: TrainSettings, net: nn.Module, mean, std, steps_per_epoch: int,
                device: torch.device) -> engine.TrainingParts:
    model = ImageClassifier(net, mean, std).to(device)
    if settings.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = settings.optim
    optimizer = build_optimizer(param_groups(model, o.weight_decay), o.name, lr=o.lr,
                                weight_decay=o.weight_decay, momentum=o.momentum,
                                nesterov=o.nesterov, betas=o.betas)
    s = settings.schedule
    scheduler = build_scheduler(optimizer, s.name, max_lr=o.lr,
                                total_steps=settings.train.epochs * steps_per_epoch,
                                pct_start=s.pct_start, anneal_strategy=s.anneal_strategy,
                                div_factor=s.div_factor, final_div_factor=s.final_div_factor)
    amp = engine.autocast_dtype(settings.train.precision, device)
    # fp16 needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    lookahead = Lookahead(model.parameters(), o.lookahead_k, o.lookahead_alpha) \
        if o.lookahead_k > 0 else None
    ema = ModelEMA(model, settings.train.ema_decay, warmup_steps=steps_per_epoch) \
        if settings.train.ema_decay > 0 else None
    return engine.TrainingParts(model, optimizer, scheduler, scaler, lookahead, ema)


def steps_per_epoch(batches: Callable[[int], Iterable]) -> int:
    return len(batches(1))


def run_fit(settings: TrainSettings, splits: data.CifarSplits, parts: engine.TrainingParts,
            batches: Callable[[int], Iterable], device: torch.device, *,
            state: engine.TrainState | None = None, checkpoint_dir: Path | None = None,
            checkpoint_extra: dict | None = None, logger=None) -> engine.TrainState:
    t = settings.train
    return engine.fit(
        parts, batches, splits.val_images, splits.val_labels, device,
        epochs=t.epochs, state=state, label_smoothing=t.label_smoothing,
        amp_dtype=engine.autocast_dtype(t.precision, device), grad_clip=t.grad_clip,
        patience=t.patience, eval_batch_size=t.eval_batch_size, channels_last=t.channels_last,
        compile=t.compile, checkpoint_dir=checkpoint_dir, checkpoint_extra=checkpoint_extra,
        logger=logger, progress=t.progress)

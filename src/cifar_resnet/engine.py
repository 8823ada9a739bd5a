"""The training loop: ``train_one_epoch``, ``evaluate``, ``fit`` and checkpoints.

Over 300 lines on purpose: what a checkpoint holds is exactly what ``fit`` restores,
and the two stay readable side by side.

Plain functions over plain arguments. The loop keeps its running sums on the
device and reads them once an epoch, so a step never waits for the host.
Everything a run needs to continue after a kill lives in one checkpoint file,
written atomically after each epoch; a logger protocol keeps MLflow out of here.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .optim import SAM, Lookahead, ModelEMA

# In fit's checkpoint_dir: the last finished epoch (what resume reads) and the best one.
LAST_CHECKPOINT = "last.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (learning rate too high, usually)."""


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


# --------------------------------------------------------------------------- device


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; no autocast (fp32) for None.
    ``hardware.autocast_dtype`` turns a resolved precision into the dtype."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and numbers, so that a checkpoint loads with
    ``torch.load(weights_only=True)``."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(
        (
            nps["kind"],
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- steps


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lookahead: Lookahead | None = None,
    ema: ModelEMA | None = None,
    sam: SAM | None = None,
    grad_clip: float = 0.0,
    channels_last: bool = True,
    progress: str | None = None,
    world: distributed.World = distributed.SINGLE,
) -> EpochResult:
    """One pass over ``batches`` of (uint8 NCHW images, labels); returns mean loss and accuracy.

    With ``sam``, each batch is a forward and backward pass at the weights w and one
    at w + e(w) (``_sam_gradient``); the base optimiser steps from w with the second
    gradient, clipped to ``grad_clip``, and the schedule, Lookahead and the EMA advance
    once a batch as without it. Loss and accuracy are the first pass's.

    Labels are int64 class indices (N,) or float class probabilities (N, classes), as
    CutMix yields; cross-entropy takes either (with ``label_smoothing`` on top), and
    accuracy counts a prediction right when it is the probabilities' largest class.

    Under torchrun (``world``), ``model`` is the DistributedDataParallel wrapper and
    ``batches`` this process's share; loss, accuracy and images are summed over all
    processes, so every process returns the whole step's figures."""
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        total=_num_images(batches),
        desc=progress,
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        disable=progress is None,
    )

    def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, amp_dtype):
            logits = model(images)
            return logits, F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    # The layers whose statistics SAM's second pass must leave alone: found once an
    # epoch (the model is in training mode throughout), not walked again every step.
    tracking = _tracking_batch_norms(model) if sam is not None else []
    for images, labels in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        logits, loss = forward(images, labels)
        optimizer.zero_grad(set_to_none=True)
        _backward(loss, scaler)
        if sam is not None:
            _sam_gradient(tracking, sam, optimizer, scaler, forward, images, labels)
        _optimizer_step(model, optimizer, scaler, grad_clip)
        scheduler.step()
        if lookahead is not None:
            lookahead.step()
        if ema is not None:
            ema.update(model)
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        classes = labels.argmax(1) if labels.is_floating_point() else labels
        correct += (logits.detach().argmax(1) == classes).sum()
        seen += n
        bar.update(n)
    bar.close()
    if world.distributed:
        totals = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(seen)])
        loss_sum, correct, seen = distributed.sum_across(totals, world).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_value = float(loss_sum) / max(seen, 1)
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"training loss is {loss_value}; lower the learning rate")
    return EpochResult(loss_value, float(correct) / max(seen, 1), int(seen), seconds)


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> None:
    """The base optimiser's step on the gradients in place, their norm clipped to
    ``grad_clip`` (0 = off). Under a GradScaler they are unscaled first, and a step
    whose gradients hold inf or NaN is skipped and the scale lowered."""
    if scaler is not None:
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()


def _sam_gradient(
    batch_norms: list[nn.Module],
    sam: SAM,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """SAM's second pass: replace the gradients at w (from the first backward) by those
    at w + e(w), and put w back, so that the base optimiser steps from w with them.
    ``batch_norms``: the layers whose running statistics the second pass leaves alone.

    Under a GradScaler (fp16) the first gradients are unscaled for the norm; where they
    hold inf or NaN nothing moves and they stay, so that the scaler's step skips the
    batch and lowers the scale, as it would without SAM. Reading the scale and checking
    the norm wait for the device, so only fp16 does it: its scaler.step waits anyway.
    """
    fp16 = scaler is not None
    if not sam.perturb(scaler.get_scale() if fp16 else 1.0, check_finite=fp16):
        return
    try:
        with _running_statistics_kept(batch_norms):
            _, loss = forward(images, labels)
        optimizer.zero_grad(set_to_none=True)
        _backward(loss, scaler)
    finally:  # whatever happens, the model is never left at w + e
        sam.restore()


@contextlib.contextmanager
def _running_statistics_kept(batch_norms: list[nn.Module]):
    """These BatchNorm layers (``_tracking_batch_norms``) normalise with the batch's
    statistics but leave their running statistics and their batch count alone.

    SAM's second pass sees the batch again at w + e, weights the model never keeps;
    counting it would update the running statistics twice a batch, toward those weights
    (davda54/sam sets the momentum to 0 for the same reason). track_running_stats=False
    rather than momentum 0: the latter still counts the batch in num_batches_tracked,
    which a cumulative average (momentum=None) divides by. Under torch.compile the flip
    costs one more graph, compiled once.
    """
    for layer in batch_norms:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in batch_norms:
            layer.track_running_stats = True


def _tracking_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that update running statistics in a forward pass."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


def _num_images(batches) -> int | None:
    dataset = getattr(batches, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return getattr(batches, "num_images", None)


def image_batches(images: np.ndarray | torch.Tensor, batch_size: int):
    """Yield uint8 NCHW tensors from uint8 NHWC images without copying the whole set."""
    images = torch.as_tensor(images)
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size].permute(0, 3, 1, 2)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
    views: list[Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Float32 logits for uint8 NHWC images, on the CPU. With ``views`` (test-time
    augmentation), each batch is expanded into all views in one forward pass and
    the softmax probabilities are averaged; the result is then log-probabilities."""
    model.eval()
    out = []
    for batch in image_batches(images, batch_size):
        x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            if views is None:
                logits = model(x)
            else:
                stacked = torch.cat([view(x) for view in views])
                probs = model(stacked).float().softmax(1).view(len(views), len(x), -1).mean(0)
                logits = probs.log()
        out.append(logits.float())
    return torch.cat(out).cpu() if out else torch.empty(0, 0)


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    *,
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
    views=None,
) -> tuple[float, float, torch.Tensor]:
    """(cross-entropy loss, accuracy, logits) on a labelled set."""
    logits = predict_logits(
        model, images, device, batch_size=batch_size, amp_dtype=amp_dtype, views=views
    )
    targets = torch.as_tensor(labels, dtype=torch.int64)
    loss = F.cross_entropy(logits, targets).item()
    acc = (logits.argmax(1) == targets).float().mean().item()
    return loss, acc, logits


# --------------------------------------------------------------------------- fit


@dataclass
class TrainState:
    """What the loop knows between epochs; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch


@dataclass
class TrainingParts:
    """The stateful objects of a run: what a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None = None
    lookahead: Lookahead | None = None
    ema: ModelEMA | None = None
    sam: SAM | None = None  # keeps nothing between steps: its state dict is empty

    def eval_model(self) -> nn.Module:
        """The weights the recipe means: the EMA's when it keeps one, else Lookahead's
        slow weights (in a copy, so training goes on from the fast ones), else the model."""
        if self.ema is not None:
            return self.ema.module
        if self.lookahead is not None:
            return self.lookahead.slow_model(self.model)
        return self.model

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in vars(self).items() if part is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, part in vars(self).items():
            if part is not None:
                part.load_state_dict(state[name])


def save_checkpoint(path: Path, parts: TrainingParts, state: TrainState, extra: dict) -> None:
    """Write to a temporary file and rename, so a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"parts": parts.state_dict(), "state": asdict(state), "rng": rng_state(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint written by ``save_checkpoint``. weights_only: checkpoints travel as
    MLflow artifacts, and unpickling someone else's file must not run their code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def restore(parts: TrainingParts, checkpoint: dict) -> TrainState:
    parts.load_state_dict(checkpoint["parts"])
    set_rng_state(checkpoint["rng"])
    return TrainState(**checkpoint["state"])


def fit(
    parts: TrainingParts,
    train_batches: Callable[[int], Iterable],
    val_images: np.ndarray,
    val_labels: np.ndarray,
    device: torch.device,
    *,
    epochs: int,
    state: TrainState | None = None,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 0.0,
    patience: int = 0,
    eval_batch_size: int = 1024,
    channels_last: bool = True,
    compile: bool = False,
    checkpoint_dir: Path | None = None,
    checkpoint_extra: dict | None = None,
    logger: EpochLogger | None = None,
    progress: bool = True,
    world: distributed.World = distributed.SINGLE,
) -> TrainState:
    """Train from ``state.epoch + 1`` to ``epochs``, validating, checkpointing and
    logging after each epoch. ``train_batches(epoch)`` returns that epoch's batches.

    Order after each epoch: checkpoint first, then log. A kill between the two
    leaves an epoch in the checkpoint's history that the logger never saw; the
    caller replays it on resume (see ``unlogged_epochs``), so curves have no gap
    and no repeat.

    Under torchrun (``world``): every process trains ``parts.model`` through
    DistributedDataParallel on its share of ``train_batches``; validation is read on
    rank 0 (the number one process gets) and shared, so every process takes the same
    early-stopping decision; only rank 0 checkpoints, logs and prints.
    """
    state = state or TrainState()
    extra = checkpoint_extra or {}
    if not world.is_main:
        checkpoint_dir, logger = None, None
    train_model, trainable = None, None
    while state.epoch < epochs and not state.stopped_early:
        epoch = state.epoch + 1
        lr = parts.optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch}/{epochs}" if progress else None
        set_epoch = getattr(parts.model, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)  # e.g. airbench_net's stem bias freezes after a few epochs
        now_trainable = [p.requires_grad for p in parts.model.parameters()]
        if now_trainable != trainable:
            # DDP reduces the gradients of the parameters that wanted one when it was
            # built; one frozen since would leave it waiting, so a new wrapper. The
            # wrappers share their parameters with parts.model, which is what gets saved.
            train_model = distributed.data_parallel(parts.model, world, device)
            train_model = torch.compile(train_model) if compile else train_model
            trainable = now_trainable
        result = train_one_epoch(
            train_model,
            train_batches(epoch),
            parts.optimizer,
            parts.scheduler,
            device,
            label_smoothing=label_smoothing,
            amp_dtype=amp_dtype,
            scaler=parts.scaler,
            lookahead=parts.lookahead,
            ema=parts.ema,
            sam=parts.sam,
            grad_clip=grad_clip,
            channels_last=channels_last,
            progress=desc if world.is_main else None,
            world=world,
        )
        metrics = {
            "train_loss": result.loss,
            "train_acc": result.acc,
            "lr": lr,
            "epoch_seconds": result.seconds,
            "images_per_second": result.images_per_second,
        }
        val_acc = -1.0
        if len(val_labels):
            # Read once, on rank 0, then shared: the other ranks hold the same weights.
            val = (
                evaluate(
                    parts.eval_model(),
                    val_images,
                    val_labels,
                    device,
                    batch_size=eval_batch_size,
                    amp_dtype=amp_dtype,
                )[:2]
                if world.is_main
                else None
            )
            val_loss, val_acc = distributed.from_main(val, world)
            metrics.update(val_loss=val_loss, val_acc=val_acc)
        state.epoch = epoch
        state.history.append(metrics)
        # No validation split (a final fit on all the training images): nothing to
        # choose by, so every epoch replaces the last and the last one is taken.
        improved = val_acc > state.best_val_acc if len(val_labels) else True
        if improved:
            state.best_val_acc, state.best_epoch, state.epochs_since_best = val_acc, epoch, 0
        else:
            state.epochs_since_best += 1
        if state.epoch == epochs and parts.lookahead is not None:
            parts.lookahead.sync()  # as airbench ends: the model takes the slow weights
        state.stopped_early = patience > 0 and state.epochs_since_best >= patience
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir / LAST_CHECKPOINT, parts, state, extra)
            if improved:
                save_checkpoint(checkpoint_dir / "best.pt", parts, state, extra)
        if logger is not None:
            logger.log_epoch(epoch, metrics)
        if world.is_main:
            print(_summary_line(epoch, epochs, metrics, improved), flush=True)
    return state


def unlogged_epochs(state: TrainState, last_logged_epoch: int) -> list[tuple[int, dict]]:
    """Epochs in the checkpoint's history that the logger has not seen yet."""
    return [(e, m) for e, m in enumerate(state.history, start=1) if e > last_logged_epoch]


def _summary_line(epoch: int, epochs: int, m: dict, improved: bool) -> str:
    val = (
        f" | val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}{' *' if improved else ''}"
        if "val_acc" in m
        else ""
    )
    return (
        f"epoch {epoch:>3}/{epochs} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
        f"{val} | lr {m['lr']:.3g} | {m['epoch_seconds']:.1f}s {m['images_per_second']:.0f} img/s"
    )

"""Optimisers, weight averaging and learning-rate schedules.

Over 300 lines on purpose: every stateful piece the loop steps (optimiser, Muon,
Lookahead, EMA, SAM, schedule) and how the parameter groups feed them, in one place.

Lookahead and the exponential moving average are written here rather than taken
from torch_optimizer (unmaintained) because each is a dozen lines. Both sit
*beside* the base optimiser instead of wrapping it, so the LR scheduler and the
AMP GradScaler keep talking to a plain torch optimiser. Muon is written here too,
one class and one function, although torch.optim.Muon exists since torch 2.9: that
one runs its iteration in bf16 whatever the run's precision (the Muon docstring says
what that costs), takes 2-D parameters only, and does not hold filters at a fixed norm.
SAM too, beside the base optimiser like Lookahead: PyPI has no maintained one
(sam-pytorch's latest release is 0.0.1, February 2021), and the usual code (davda54/sam)
wraps the base optimiser in a closure-driven step, which GradScaler.step does not take.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn


def build_optimizer(
    params,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    muon_lr: float = 0.24,
    muon_momentum: float = 0.6,
    muon_dtype: torch.dtype = torch.float32,
) -> torch.optim.Optimizer:
    """A torch optimiser; a parameter group's ``lr_scale`` (see ``param_groups``) multiplies ``lr``.

    ``muon`` steps the groups marked ``orthogonal`` with Muon at ``muon_lr`` and
    ``muon_momentum``, its Newton-Schulz iteration in ``muon_dtype`` (the run's
    precision: bf16 where it is native, fp32 where bf16 would be emulated), and the
    others as Nesterov SGD at ``lr`` and ``momentum``.
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**group, "lr": lr * group.get("lr_scale", 1.0)} for group in params]
    if name == "muon":
        if not (
            params
            and isinstance(params[0], dict)
            and any(group.get("orthogonal") for group in params)
        ):
            raise ValueError(
                "optim.name=muon needs parameter groups with the filters marked "
                "orthogonal (param_groups(..., orthogonal_filters=True))"
            )
        # No weight decay to set: Muon holds these filters at a fixed norm instead.
        params = [
            {**group, "lr": muon_lr, "momentum": muon_momentum}
            if group.get("orthogonal")
            else group
            for group in params
        ]
        return Muon(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_dtype=muon_dtype,
        )
    # foreach keeps the parameter update at a handful of kernel launches per step.
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            foreach=True,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True
        )
    if name == "adam":
        return torch.optim.Adam(
            params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of: sgd, muon, adamw, adam")


# Muon's quintic (Jordan, 2024): its slope at zero is made as steep as it can be while
# singular values still end up in about [0.5, 1.5], so three steps are enough.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(
    matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (2-D, any float dtype), by a
    Newton-Schulz iteration computed in ``dtype``; returned in ``matrix``'s dtype.

    Not the exact polar factor: singular values come out between about 0.5 and 1.5,
    which trains as well (Muon's finding) and costs a few small matmuls. Muon runs it
    in bf16 on GPUs; on a CPU without native bf16 that is emulated and slow, so the
    optimiser passes the run's resolved precision.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.to(dtype)
    x = x / (x.norm() + eps)  # every singular value <= 1: inside the iteration's basin
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # X X^T is then the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov SGD whose update of each ``orthogonal`` group's filters is orthogonalised.

    Muon (Jordan et al., 2024; airbench94_muon reaches 94% on CIFAR-10 in 8 epochs with
    it): the momentum of a conv filter bank, seen as an out_channels x (in * k * k)
    matrix, is replaced by its orthogonal factor, so every direction of the update moves
    at the same rate. Those filters are kept at a Frobenius norm of sqrt(out_channels)
    (each filter of norm about 1) before each step, as airbench does; that fixed scale
    takes weight decay's place, so the step size is ``lr`` whatever the loss's scale.

    Why not torch.optim.Muon: it runs Newton-Schulz in bf16, hard-coded, so it cannot
    follow the resolved precision; where bf16 is emulated that is slow. Measured with
    scripts/bench_muon.py on whitened_resnet's filters viewed as 2-D (BENCHMARKS.md,
    2026-12-01, a loaded 2-core AMD EPYC): with PyTorch capped at AVX2 (fp32 resolved)
    its optimiser step took 2.8-3.5x ours at our 3 steps, 4.6-5.6x at its default 5;
    with native bf16, 0.94-1.46x at 3 steps and 1.19-1.87x at 5. Accuracy did not
    decide it: 4 epochs of recipe=fast_muon as it was then (airbench94_muon's recipe
    on whitened_resnet) on 10,000 images (one seed) gave 54.8% validation
    accuracy with ours, 55.2% with torch's plus our norm projection and 3 steps, 56.6%
    with torch's as it ships (5 steps, no projection, no weight decay).

    Groups without ``orthogonal`` take torch.optim.SGD's step (weight decay added to the
    gradient, then momentum, Nesterov if set).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 3,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"Muon needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0 and "
                f"ns_steps >= 1, got {lr}, {momentum}, {weight_decay}, {ns_steps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            orthogonal=False,
            ns_steps=ns_steps,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, orthogonal = group["momentum"], group["orthogonal"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not orthogonal:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad)
                buffer = state["momentum_buffer"]
                update = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                if orthogonal:
                    p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
                    update = orthogonalise(
                        update.reshape(p.size(0), -1), group["ns_steps"], dtype=self.ns_dtype
                    ).view_as(p)
                p.add_(update, alpha=-group["lr"])
        return loss


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_lr_scale: float = 1.0,
    norm_decay: bool = False,
    orthogonal_filters: bool = False,
    separate: Sequence[dict] = (),
) -> list[dict]:
    """Three groups: conv and linear weights (decayed), other biases (never decayed:
    decaying them hurts small nets), and normalisation layers' parameters.

    The last group's learning rate is ``norm_lr_scale`` times the base one: airbench trains
    BatchNorm shifts 64x faster than the weights (its ablation: 94% in 18 epochs instead of
    22). With ``norm_decay`` that group is decayed at the weights' per-step rate (lr * wd), so
    its weight decay is divided by the same scale; without, it is not decayed.

    With ``orthogonal_filters`` the conv filters (4-D weights) leave the first group
    for a fourth, marked ``orthogonal``, for Muon; the linear head stays in the first.

    ``separate``: groups the caller builds (a dict with ``params`` and its own options,
    e.g. ``lr_scale``, ``weight_decay``, ``anneal_steps``); their parameters leave the
    groups above, and they come last.
    """
    taken = {id(p) for group in separate for p in group["params"]}
    weights, biases, norms, filters = [], [], [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in taken:
                continue
            if isinstance(module, NORM_LAYERS):
                norms.append(p)
            elif orthogonal_filters and p.ndim == 4:
                filters.append(p)
            else:
                (weights if p.ndim > 1 else biases).append(p)
    groups = [
        {"params": weights, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": biases, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": norms, **norm_group_options(weight_decay, norm_lr_scale, norm_decay)},
        {"params": filters, "weight_decay": 0.0, "orthogonal": True},
        *separate,
    ]
    return [g for g in groups if g["params"]]


def norm_group_options(weight_decay: float, norm_lr_scale: float, norm_decay: bool) -> dict:
    """``lr_scale`` and ``weight_decay`` of a group that trains like the normalisation
    layers' parameters (``param_groups``): ``norm_lr_scale`` times the base rate, and
    with ``norm_decay`` decayed at the weights' per-step rate (lr * wd), else not."""
    return {
        "lr_scale": norm_lr_scale,
        "weight_decay": weight_decay / norm_lr_scale if norm_decay else 0.0,
    }


class Lookahead:
    """Lookahead (Zhang et al., 2019): every k fast steps, slow += alpha * (fast - slow), fast = slow.

    With ``ramp_steps`` > 0 the pull starts off and grows as airbench's does: at step t,
    alpha_t = 1 - (1 - alpha) * min(t / ramp_steps, 1) ** 3. Early in training (alpha_t ~ 1)
    the fast weights move freely; near the end the slow weights average over more steps.
    Call ``step()`` right after the base optimiser's step.

    ``buffers``: float buffers (BatchNorm's running statistics) to treat the same way,
    as airbench94's Lookahead does (it averages the whole float state dict); integer
    buffers such as ``num_batches_tracked`` are left out. The parameters kept are those
    that require a gradient when this is built; one frozen later stays in.
    """

    def __init__(self, params, k: int = 5, alpha: float = 0.5, ramp_steps: int = 0, buffers=()):
        if k < 1 or not 0.0 < alpha <= 1.0 or ramp_steps < 0:
            raise ValueError(
                f"Lookahead needs k >= 1, 0 < alpha <= 1 and ramp_steps >= 0, "
                f"got k={k}, alpha={alpha}, ramp_steps={ramp_steps}"
            )
        self.params = [p for p in params if p.requires_grad]
        self.params += [b for b in buffers if b.is_floating_point()]
        self.k, self.alpha, self.ramp_steps = k, alpha, ramp_steps
        self.reset()

    def reset(self) -> None:
        """Take the current weights as the slow ones (after loading weights to start from)."""
        self.slow = [p.detach().clone() for p in self.params]
        self.fast_steps = 0

    def current_alpha(self) -> float:
        if not self.ramp_steps:
            return self.alpha
        progress = min(self.fast_steps / self.ramp_steps, 1.0)
        return 1.0 - (1.0 - self.alpha) * progress**3

    @torch.no_grad()
    def step(self) -> None:
        self.fast_steps += 1
        if self.fast_steps % self.k:
            return
        fast = [p.data for p in self.params]
        torch._foreach_lerp_(self.slow, fast, self.current_alpha())
        torch._foreach_copy_(fast, self.slow)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the slow weights into the model (airbench's last step)."""
        torch._foreach_copy_([p.data for p in self.params], self.slow)

    @torch.no_grad()
    def slow_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (whose tensors this Lookahead steps) holding the slow
        weights, and the model's own buffers (BN statistics) unless this Lookahead
        averages them too: what evaluation sees."""
        copy_ = copy.deepcopy(model)
        slow_by_tensor = {id(t): s for t, s in zip(self.params, self.slow)}
        # Matched by identity, not by requires_grad: a parameter frozen since (the
        # stem bias of airbench_net) keeps its slow copy.
        pairs = zip(
            [*model.parameters(), *model.buffers()], [*copy_.parameters(), *copy_.buffers()]
        )
        for tensor, copied in pairs:
            slow = slow_by_tensor.get(id(tensor))
            if slow is not None:
                copied.data.copy_(slow)
        return copy_

    def state_dict(self) -> dict:
        return {
            "slow": [s.clone() for s in self.slow],
            "fast_steps": self.fast_steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.slow, state["slow"]):
            s.copy_(saved)
        self.fast_steps = state["fast_steps"]


class SAM:
    """Sharpness-aware minimisation beside a base optimiser: the gradient the base
    optimiser steps with is taken at w + e(w), the worst point within radius ``rho``
    to first order, instead of at w.

    SAM (Foret et al., 2021, arXiv 2010.01412): e = rho * g / ||g||_2, one norm over
    all the parameters. ASAM (``adaptive``; Kwon et al., 2021, arXiv 2102.11600):
    e = rho * T_w^2 g / ||T_w g||_2 with T_w = |w| + ``eta`` elementwise, so the radius
    is relative to each weight's size and rescaling a layer does not change the step;
    it wants a larger ``rho`` (the authors use 0.5 on CIFAR-10 where SAM uses 0.05).
    Unlike the authors' code, which leaves biases unscaled (T = 1), every parameter
    takes |w| + eta here.

    Per batch: backward at w, ``perturb()``, forward and backward again at w + e,
    ``restore()``, then the base optimiser's step (engine.train_one_epoch does this).
    ``params``: the parameters to perturb, tensors of any shape, float dtype and one
    device (those that do not require a gradient are dropped); e has each one's shape
    and dtype, the norm is accumulated in float32. Parameters without a gradient this
    batch (frozen since, or unused) are left where they are. Nothing is kept from one
    batch to the next, so there is no state to checkpoint.

    Raises ValueError for ``rho`` <= 0 or ``eta`` < 0.
    """

    def __init__(self, params, rho: float, adaptive: bool = False, eta: float = 0.01):
        if not rho > 0 or not eta >= 0:
            raise ValueError(f"SAM needs rho > 0 and eta >= 0, got rho={rho}, eta={eta}")
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        # Between perturb() and restore(): the parameters moved and their weights at w.
        self._moved: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] = []

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0, check_finite: bool = False) -> bool:
        """Move every parameter that has a gradient from w to w + e(w).

        ``grad_scale``: the factor the gradients carry (the GradScaler's scale in fp16);
        it is divided out before the norm. ``check_finite``: first look whether the
        norm is finite (one wait for the device); where it is not (an fp16 step whose
        scale overflowed) nothing moves and the result is False, so the caller can
        leave the step to the GradScaler to skip. Otherwise returns True. A zero
        gradient moves nothing (no division by zero). Raises RuntimeError when the
        weights are already perturbed.
        """
        if self._moved is not None:
            raise RuntimeError("SAM.perturb() twice without restore()")
        params = [p for p in self.params if p.grad is not None]
        if not params:
            self._moved, self._saved = [], []
            return True
        # Unscaled copies, which then become e in place: T_w g (adaptive) or g.
        ascent = torch._foreach_div([p.grad for p in params], grad_scale)
        if self.adaptive:
            t_w = torch._foreach_abs(params)
            torch._foreach_add_(t_w, self.eta)
            torch._foreach_mul_(ascent, t_w)
        norm = torch.linalg.vector_norm(
            torch.stack([n.float() for n in torch._foreach_norm(ascent)])
        )
        if check_finite and not torch.isfinite(norm):
            return False
        if self.adaptive:
            torch._foreach_mul_(ascent, t_w)  # T_w^2 g
        # The tiny floor keeps a zero gradient at e = 0 instead of 0 / 0.
        torch._foreach_mul_(ascent, self.rho / (norm + 1e-12))
        self._saved = [p.detach().clone() for p in params]
        self._moved = params
        torch._foreach_add_(params, ascent)
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights ``perturb()`` moved, exactly (copied, not w + e - e).
        Raises RuntimeError when nothing is perturbed."""
        if self._moved is None:
            raise RuntimeError("SAM.restore() without perturb()")
        if self._moved:
            torch._foreach_copy_(self._moved, self._saved)
        self._moved, self._saved = None, []

    def state_dict(self) -> dict:
        """Empty: the perturbation is undone within each step, so a checkpoint (written
        between steps) has nothing of SAM's to keep."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers, for evaluation.

    ``decay`` is per step; the first ``warmup_steps`` use a smaller decay so the
    average does not remember the random init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0
        # Tensors are updated in place (optimizer steps, BN statistics, load_state_dict),
        # so both sides' lists are built once, not on every step.
        self._averaged = _float_and_other_tensors(self.module)
        self._source: tuple[nn.Module, list, list] | None = None

    def current_decay(self) -> float:
        if self.updates <= self.warmup_steps:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._source is None or self._source[0] is not model:
            self._source = (model, *_float_and_other_tensors(model))
        self.updates += 1
        ema_floats, ema_others = self._averaged
        _, live_floats, live_others = self._source
        torch._foreach_lerp_(ema_floats, live_floats, 1.0 - self.current_decay())
        # Integer buffers (BN's num_batches_tracked) are copied, not averaged.
        for e, m in zip(ema_others, live_others):
            e.copy_(m)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def _float_and_other_tensors(module: nn.Module) -> tuple[list, list]:
    tensors = list(module.state_dict().values())
    return (
        [t for t in tensors if t.dtype.is_floating_point],
        [t for t in tensors if not t.dtype.is_floating_point],
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    pct_start: float = 0.25,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-batch schedules. ``onecycle`` is OneCycleLR; ``constant`` keeps the lr.

    Each group peaks at the lr the optimiser was built with (its scaled lr, Muon's own).
    A group with ``anneal_steps`` leaves the schedule: its lr falls linearly from that
    peak at step 0 to zero at step ``anneal_steps`` and stays there (airbench94_muon's
    whitening bias, Jordan 2024).
    """
    max_lrs = [group["lr"] for group in optimizer.param_groups]
    if name == "onecycle":
        # OneCycleLR divides by the warm-up's length in steps: keep at least one step
        # in each phase, so tiny runs (tests, smoke runs) do not crash.
        if total_steps >= 3:
            pct_start = min(max(pct_start, 1.5 / total_steps), 1 - 1.5 / total_steps)
        # Momentum cycling fights Nesterov-SGD's fixed momentum of the seed recipe
        # and does not exist for Adam's betas in the same form: keep it off.
        return _OneCycleLR(
            optimizer,
            max_lr=max_lrs,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            cycle_momentum=False,
        )
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [
                functools.partial(_anneal, steps=group["anneal_steps"])
                if group.get("anneal_steps")
                else _constant
                for group in optimizer.param_groups
            ],
        )
    raise ValueError(f"unknown schedule {name!r}; choose one of: onecycle, constant")


def _anneal(step: int, steps: int) -> float:
    """Linear from 1 at step 0 to 0 at ``steps``, then 0."""
    return max(0.0, 1.0 - step / steps)


def _constant(step: int) -> float:
    return 1.0


class _OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR, except that groups with ``anneal_steps`` follow ``_anneal`` from
    their peak (a subclass, not a second scheduler: OneCycleLR sets every group's lr
    outright, so two schedulers cannot be chained over it)."""

    def get_lr(self) -> list[float]:
        lrs = super().get_lr()
        return [
            group["max_lr"] * _anneal(self.last_epoch, group["anneal_steps"])
            if group.get("anneal_steps")
            else lr
            for group, lr in zip(self.optimizer.param_groups, lrs)
        ]

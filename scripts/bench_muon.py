"""Our Muon (cifar_resnet.optim) against torch.optim.Muon on whitened_resnet's conv filters.

    python scripts/bench_muon.py                    # step time here and under the AVX2 cap, then training
    python scripts/bench_muon.py --no-train         # step times only
    python scripts/bench_muon.py --no-avx2 --epochs 4 --train-subset 10000

torch.optim.Muon (torch >= 2.9) takes 2-D parameters only and runs Newton-Schulz in
bf16 whatever the run's precision. Here it steps 2-D Parameters that share storage
with each 4-D filter bank, (out, kh, kw, in) flattened (the order a channels_last
weight lies in memory; the order of the columns does not change the orthogonal
factor), their gradients copied from the 4-D ones before each step; every other
parameter takes our SGD step, as in ``optim.Muon``. Nothing in the project changes:
the optimiser is swapped in this script after ``training.prepare``.

1. Step time: ms per optimiser step (the whole step: SGD groups and filters) on real
   gradients of one batch of 2,000 (recipe=airbench94_muon), the optimisers interleaved in
   one process and the median over repeats taken, at the resolved precision; with
   ``--avx2`` (the default) the same again in a child process with PyTorch capped at
   AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``), where ``precision:
   auto`` resolves to fp32 and torch's bf16 iteration is emulated.
2. Accuracy: recipe=airbench94_muon on a stratified subset through the project's training
   path (same seed, so the same starting weights and batches), ours against torch's
   variants; judged on validation accuracy (the 5,000-image split), the test set
   is not read.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch import nn  # noqa: E402

from cifar_resnet import hardware, pipeline, training  # noqa: E402
from cifar_resnet.config import train_settings  # noqa: E402
from cifar_resnet.optim import Muon, build_scheduler  # noqa: E402
from cifar_resnet.stages import CONF_DIR  # noqa: E402

AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# name -> (ns_steps, adjust_lr_fn, hold filters at norm sqrt(out_channels) as ours does)
TORCH_VARIANTS = {
    "torch": (5, "original", False),  # as it ships (weight decay 0, as our filters have)
    "torch_ns3_norm": (3, "original", True),  # like with like: our steps and projection
    "torch_spectral": (5, "spectral_unclamped", False),
}


def flat_view(weight: torch.Tensor) -> torch.Tensor:
    """A 2-D (out, rest) view sharing ``weight``'s storage; never a copy."""
    if weight.is_contiguous():
        return weight.view(weight.size(0), -1)
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).view(weight.size(0), -1)
    raise ValueError(f"filter bank of strides {weight.stride()} has no 2-D view")


def flat_like(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad`` flattened in the column order of ``flat_view(weight)`` (a copy if need be)."""
    if not weight.is_contiguous():  # channels_last
        grad = grad.permute(0, 2, 3, 1)
    return grad.reshape(weight.size(0), -1)


class TorchMuonOnFilters(Muon):
    """Our parameter groups; the ``orthogonal`` ones stepped by torch.optim.Muon on
    2-D views, the rest by our (SGD) step. The schedule drives our groups' lr; each
    step hands it on."""

    def __init__(self, groups, *, ns_steps: int, adjust_lr_fn: str, project: bool, **kw):
        super().__init__(groups, **kw)
        self.project = project
        self.pairs = []  # (our group, [(4-D weight, 2-D view)], torch's group)
        inner = []
        for group in self.param_groups:
            if group["orthogonal"]:
                views = [(p, nn.Parameter(flat_view(p.detach()))) for p in group["params"]]
                inner.append({"params": [v for _, v in views], "momentum": group["momentum"]})
                self.pairs.append((group, views))
        self.inner = torch.optim.Muon(
            inner,
            lr=1.0,
            weight_decay=0.0,
            nesterov=True,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )

    @torch.no_grad()
    def step(self, closure=None):
        held = []
        for (group, views), inner_group in zip(self.pairs, self.inner.param_groups):
            inner_group["lr"] = group["lr"]
            for p, view in views:
                view.grad = None if p.grad is None else flat_like(p.grad, p)
                if self.project and p.grad is not None:
                    p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
                held.append((p, p.grad))
                p.grad = None  # our step leaves the filters alone
        super().step()
        for p, grad in held:
            p.grad = grad
        self.inner.step()


def compose_settings(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "train.progress=false"])
    settings, _ = pipeline.prepare_machine(train_settings(cfg))
    return settings


def make_optimizer(
    variant: str, model: nn.Module, settings, steps_per_epoch: int
) -> torch.optim.Optimizer:
    if settings.optim.name != "muon":
        raise SystemExit(f"bench_muon needs optim=muon settings, got {settings.optim.name}")
    ours = pipeline.model_optimizer(settings, model, steps_per_epoch)
    o = settings.optim
    if variant == "ours":
        return ours
    ns_steps, adjust, project = TORCH_VARIANTS[variant]
    return TorchMuonOnFilters(
        ours.param_groups,
        ns_steps=ns_steps,
        adjust_lr_fn=adjust,
        project=project,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )


def step_times(settings, splits, variants: list[str], repeats: int, steps: int) -> dict:
    """Median ms per optimiser step of each variant, interleaved (order rotated each repeat)."""
    run = training.prepare(settings, splits, torch.device("cpu"))
    model = run.parts.model
    x, y = next(iter(run.batches(1)))
    amp = run.amp_dtype
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
    loss.backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    steps_per_epoch = pipeline.steps_per_epoch(run.batches)
    optimizers = {v: make_optimizer(v, model, settings, steps_per_epoch) for v in variants}
    times = {v: [] for v in variants}
    for r in range(repeats + 1):  # the first round is warm-up
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            for p, g in grads.items():
                p.grad = g
            start = time.perf_counter()
            for _ in range(steps):
                optimizers[v].step()
            if r:
                times[v].append((time.perf_counter() - start) * 1000 / steps)
    return {v: statistics.median(t) for v, t in times.items()}


def print_step_table(label: str, settings, medians: dict) -> None:
    ours = medians["ours"]
    print(
        f"\n# step time | {label} | {hardware.describe(torch.device('cpu'))} | "
        f"precision auto -> {settings.train.precision} | torch {torch.__version__}"
    )
    print("| optimiser | ms / step (median) | / ours |")
    print("|---|---:|---:|")
    for v, ms in medians.items():
        print(f"| {v} | {ms:.1f} | {ms / ours:.2f} |", flush=True)


def train_once(settings, splits, variant: str) -> dict:
    run = training.prepare(settings, splits, torch.device("cpu"))
    steps_per_epoch = pipeline.steps_per_epoch(run.batches)
    optimizer = make_optimizer(variant, run.parts.model, settings, steps_per_epoch)
    s = settings.schedule
    run.parts.optimizer = optimizer
    run.parts.scheduler = build_scheduler(
        optimizer,
        s.name,
        total_steps=settings.train.epochs * steps_per_epoch,
        pct_start=s.pct_start,
        anneal_strategy=s.anneal_strategy,
        div_factor=s.div_factor,
        final_div_factor=s.final_div_factor,
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = training.fit(run, checkpoint_dir=Path(tmp))
    h = state.history
    return {
        "variant": variant,
        "val_acc": [round(m["val_acc"], 4) for m in h],
        "best_val_acc": state.best_val_acc,
        "train_seconds": sum(m["epoch_seconds"] for m in h),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per optimiser")
    parser.add_argument("--avx2-repeats", type=int, default=5, help="the same under the AVX2 cap")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--no-avx2", dest="avx2", action="store_false", help="skip the AVX2 child")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", nargs="+", default=list(TORCH_VARIANTS), choices=list(TORCH_VARIANTS)
    )
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    hardware.configure_threads()
    # The control is on all 50,000 images; accuracy here is judged on the usual 5,000.
    base = ["recipe=airbench94_muon", "data.val_size=5000", f"seed={args.seed}"]

    if not args.timing_only:
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
        )
    settings = compose_settings([*base, "data.train_subset=2000"])
    splits = pipeline.load_data(settings.data)
    cpu = torch.device("cpu")
    label = "AVX2 cap" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else "native"
    print(hardware.machine_line(cpu, "auto", settings.train.precision))
    medians = step_times(
        settings, splits, ["ours", "torch", "torch_ns3_norm"], args.repeats, args.steps
    )
    print_step_table(label, settings, medians)
    if args.timing_only:
        return
    if args.avx2:
        command = [
            sys.executable,
            __file__,
            "--timing-only",
            f"--repeats={args.avx2_repeats}",
            f"--steps={args.steps}",
            f"--seed={args.seed}",
        ]
        subprocess.run(command, env={**os.environ, **AVX2_CAP}, check=True)
    if args.train:
        settings = compose_settings(
            [*base, f"data.train_subset={args.train_subset}", f"train.epochs={args.epochs}"]
        )
        splits = pipeline.load_data(settings.data)
        print(
            f"\n# training | recipe=airbench94_muon, {args.train_subset} training images, "
            f"{args.epochs} epochs, seed {args.seed}, precision {settings.train.precision}; "
            f"val acc on {len(splits.val_labels)} images"
        )
        print("| optimiser | val acc by epoch | best val acc | training s |")
        print("|---|---|---:|---:|")
        for variant in ["ours", *args.variants]:
            r = train_once(settings, splits, variant)
            per_epoch = " ".join(f"{a:.2%}" for a in r["val_acc"])
            print(
                f"| {variant} | {per_epoch} | {r['best_val_acc']:.2%} | {r['train_seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

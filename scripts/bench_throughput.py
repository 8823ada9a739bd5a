"""Training throughput of every zoo model on this machine: the project's loop in fp32
and in bf16 (and which of the two ``precision: auto`` picks here), against a plain
reference loop.

    python scripts/bench_throughput.py --images 2048 --batch-size 256
    python scripts/bench_throughput.py --models whitened_resnet resnet9 --compile

All loops train the same network on the same CIFAR-10 images in this process,
one after the other. ``auto / best`` is the rate of auto's choice over the faster
of fp32 and bf16 (the aim: >= 0.9 on any CPU); ``ratio`` is what the project's
choices buy over the reference at auto's precision:
- project: the whole uint8 set in memory (TensorLoader), batched crop/flip/cutout,
  channels_last, autocast at the given precision, foreach SGD, metrics read once a pass;
- reference: torchvision's CIFAR10 dataset with per-image PIL transforms
  (RandomCrop(32, 4, reflect), RandomHorizontalFlip, ToTensor, Normalize),
  a DataLoader, fp32, default memory format, loss read every step.
The first batches of each pass are warm-up and not timed. ``--compile`` adds a column:
the project loop again under torch.compile (its compilation happens in the warm-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from cifar_resnet import data, engine, hardware  # noqa: E402
from cifar_resnet.batch_augment import BatchAugment  # noqa: E402
from cifar_resnet.models import MODELS, ImageClassifier, build_model, count_parameters  # noqa: E402

WARMUP_BATCHES = 2


def project_images_per_second(
    name: str,
    images,
    labels,
    batch_size: int,
    mean,
    std,
    amp_dtype: torch.dtype | None,
    compile: bool = False,
) -> float:
    model = ImageClassifier(build_model(name), mean, std).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    augment = BatchAugment(crop_pad=4, flip="random", cutout=8)
    loader = data.TensorLoader(
        images, labels, batch_size, "cpu", shuffle=True, drop_last=True, augment=augment
    )
    device = torch.device("cpu")
    warmup = data.TensorLoader(
        images[: batch_size * WARMUP_BATCHES],
        labels[: batch_size * WARMUP_BATCHES],
        batch_size,
        "cpu",
    )
    train_model = torch.compile(model) if compile else model
    for batches in (warmup, loader):
        result = engine.train_one_epoch(
            train_model,
            batches,
            optimizer,
            scheduler,
            device,
            label_smoothing=0.1,
            amp_dtype=amp_dtype,
        )
    return result.images_per_second


def reference_images_per_second(
    name: str, root: Path, count: int, batch_size: int, mean, std, workers: int
) -> float:
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    dataset = torchvision.datasets.CIFAR10(str(root), train=True, transform=transform)
    subset = torch.utils.data.Subset(dataset, range(count + batch_size * WARMUP_BATCHES))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers
    )
    model = build_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == WARMUP_BATCHES:
            seen, start = 0, time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the usual per-step read of the loss
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="timed images per loop")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS))
    parser.add_argument("--root", default=os.environ.get("CIFAR10_ROOT", "./data"))
    parser.add_argument(
        "--compile", action="store_true", help="also time the project loop compiled"
    )
    args = parser.parse_args()

    root = data.resolve_root(args.root)
    images, labels = data.load_cifar10(root, train=True)
    images, labels = images[: args.images], labels[: args.images]
    mean, std = data.channel_mean_std(images)
    cpu = torch.device("cpu")
    hardware.configure_threads()
    auto = hardware.resolve_precision("auto", cpu)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()}, "
        f"{hardware.describe(cpu)}, torch {torch.__version__} | precision auto -> {auto} | "
        f"{args.images} images, batch {args.batch_size}"
    )
    compiled_header = f" {auto} compiled (img/s) |" if args.compile else ""
    print(
        f"| model | parameters | fp32 (img/s) | bf16 (img/s) | auto | auto / best |"
        f"{compiled_header} reference loop (img/s) | ratio |"
    )
    print("|---|---:|---:|---:|---|---:|" + ("---:|" if args.compile else "") + "---:|---:|")
    for name in args.models:
        rates = {
            p: project_images_per_second(
                name, images, labels, args.batch_size, mean, std, hardware.autocast_dtype(p)
            )
            for p in ("fp32", "bf16")
        }
        compiled = ""
        if args.compile:
            rate = project_images_per_second(
                name,
                images,
                labels,
                args.batch_size,
                mean,
                std,
                hardware.autocast_dtype(auto),
                compile=True,
            )
            compiled = f" {rate:.0f} |"
        ref = reference_images_per_second(
            name,
            root,
            args.images - args.batch_size * WARMUP_BATCHES,
            args.batch_size,
            mean,
            std,
            args.workers,
        )
        print(
            f"| {name} | {count_parameters(build_model(name)):,} | {rates['fp32']:.0f} | "
            f"{rates['bf16']:.0f} | {auto} | {rates[auto] / max(rates.values()):.2f} |"
            f"{compiled} {ref:.0f} | {rates[auto] / ref:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Time to accuracy of training recipes, through the project's own pipeline.

    python scripts/bench_recipe.py --seeds 0 1 2 -- "recipe=fast" "recipe=fast train.epochs=8"

Each run composes conf/train.yaml with the given overrides, trains with the same
code as `mlflow run . -e train` (pipeline.run_fit, checkpoints in a temporary
folder), chooses the checkpoint on validation and reads the test set once. It
does not track in MLflow, so it also runs where MLflow is not installed (the
GPU machines); one JSON line per run goes to stdout and to --out.

--time-limit S stops a run after the epoch during which S seconds of fitting have
passed: its line says "partial": true, how many of the planned epochs ran, the time
per epoch and the best validation accuracy so far, and it reads no test set (a
schedule cut short is not the recipe). --dry-run checks the same runs in seconds on
the CPU: a random CIFAR-format set of 100 training and 50 test images written to a
temporary folder (50 of them held out where the run validates), one epoch of batches
of 50, whatever the recipe says.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from cifar_resnet import hardware, pipeline, training  # noqa: E402
from cifar_resnet.config import train_settings  # noqa: E402
from cifar_resnet.stages import CONF_DIR, resolve_recipe  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


class OutOfTime(Exception):
    pass


class Deadline:
    """An epoch logger that keeps each epoch's metrics and, once ``seconds`` have passed
    since it was made, stops the run after the epoch it is told of (None: never)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.history = seconds, time.perf_counter(), []

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        self.history.append(metrics)
        if self.seconds is not None and time.perf_counter() - self.start > self.seconds:
            raise OutOfTime(epoch)


def write_random_cifar(root: Path) -> Path:
    """A CIFAR-10-format set of random images (5 batches of 20 training images, 50 test)
    under ``root``/cifar-10-batches-py, and an md5sum list of it; returns the list's path."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, count: int) -> None:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(count)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", 20)
    batch("test_batch", 50)
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    md5 = root / "md5.txt"
    md5.write_text(
        "".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in folder.iterdir())
    )
    return md5


def dry_run_overrides(root: Path, md5: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"data.md5_file={md5}",
        "data.val_size=50",
        "data.num_workers=0",
        "train.device=cpu",
        "train.epochs=1",
        "train.batch_size=50",
        "train.eval_batch_size=100",
    ]


def run_once(
    overrides: list[str], seed: int, splits_cache: dict, time_limit: float | None = None
) -> dict:
    composed = [*overrides, f"seed={seed}", "train.progress=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=composed)
        cfg, _ = resolve_recipe(
            cfg,
            lambda recipe: compose(config_name="train", overrides=[*composed, f"recipe={recipe}"]),
        )
    settings = train_settings(cfg)
    d = settings.data
    key = (d.root, d.val_size, d.train_subset, d.split_seed)
    if key not in splits_cache:
        splits_cache[key] = pipeline.load_data(d)
    splits = splits_cache[key]
    settings, device = pipeline.prepare_machine(settings)
    start = time.perf_counter()
    deadline = Deadline(time_limit)
    with tempfile.TemporaryDirectory() as tmp:
        run = training.prepare(settings, splits, device)
        try:
            state = training.fit(run, logger=deadline, checkpoint_dir=Path(tmp))
        except OutOfTime:
            return partial_result(overrides, seed, settings, run, device, deadline.history)
        fit_seconds = time.perf_counter() - start
        tested, _ = training.test_once(run, Path(tmp))
    return {
        **run_fields(overrides, seed, settings, run, device, state.history),
        "fit_seconds": round(fit_seconds, 2),  # training + per-epoch validation + data set-up
        # A final fit (data.val_size=0) validates nothing: no figure rather than a sentinel.
        "best_val_acc": round(state.best_val_acc, 4) if state.best_val_acc >= 0 else None,
        "best_epoch": state.best_epoch,
        **{k: round(v, 4) for k, v in tested.items()},
    }


def partial_result(overrides, seed, settings, run, device, history: list[dict]) -> dict:
    """A run stopped by --time-limit: how far it got, and how fast."""
    val = [m["val_acc"] for m in history if "val_acc" in m]
    return {
        **run_fields(overrides, seed, settings, run, device, history),
        "partial": True,
        "epochs_planned": settings.train.epochs,
        "fraction": round(len(history) / settings.train.epochs, 4),
        "best_val_acc_so_far": round(max(val), 4) if val else None,
    }


def run_fields(overrides, seed, settings, run, device, history: list[dict]) -> dict:
    """What every line says: the run, the machine, its epochs and their speed."""
    # The first epoch carries warm-up (allocation, autotuning): left out where there are more.
    timed = history[1:] or history
    return {
        "overrides": " ".join(overrides),
        "seed": seed,
        "recipe": settings.recipe,
        "model": settings.model.name,
        "parameters": run.parameters,
        "device": device_name(device),
        "epochs": len(history),
        "precision": settings.train.precision,
        "cpu_class": hardware.cpu_class(),
        "train_seconds": round(sum(m["epoch_seconds"] for m in history), 2),
        "seconds_per_epoch": round(sum(m["epoch_seconds"] for m in timed) / len(timed), 2),
        "images_per_second": round(sum(m["images_per_second"] for m in timed) / len(timed), 1),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="one quoted string of Hydra overrides per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--dry-run", action="store_true", help="tiny random data, CPU, 1 epoch")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = dry_run_overrides(Path(tmp), write_random_cifar(Path(tmp))) if args.dry_run else []
        for spec in args.runs:
            for seed in args.seeds:
                # The run's own overrides come last, so they win (data.val_size=0 stays).
                result = run_once([*extra, *shlex.split(spec)], seed, cache, args.time_limit)
                if args.dry_run:
                    result["dry_run"] = True  # random data: a check, never a figure
                line = json.dumps(result)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()

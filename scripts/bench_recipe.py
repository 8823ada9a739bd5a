"""Time to accuracy of training recipes, through the project's own pipeline.

    python scripts/bench_recipe.py --seeds 0 1 2 -- "recipe=fast" "recipe=fast train.epochs=8"

Each run composes conf/train.yaml with the given overrides, trains with the same
code as `mlflow run . -e train` (pipeline.run_fit, checkpoints in a temporary
folder), chooses the checkpoint on validation and reads the test set once. It
does not track in MLflow, so it also runs where MLflow is not installed (the
GPU machines); one JSON line per run goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

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


def run_once(overrides: list[str], seed: int, splits_cache: dict) -> dict:
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
    with tempfile.TemporaryDirectory() as tmp:
        run, state = training.train(settings, splits, device, checkpoint_dir=Path(tmp))
        fit_seconds = time.perf_counter() - start
        tested, _ = training.test_once(run, Path(tmp))
    history = state.history
    return {
        "overrides": " ".join(overrides),
        "seed": seed,
        "recipe": settings.recipe,
        "model": settings.model.name,
        "parameters": run.parameters,
        "device": device_name(device),
        "epochs": state.epoch,
        "precision": settings.train.precision,
        "cpu_class": hardware.cpu_class(),
        "train_seconds": round(sum(m["epoch_seconds"] for m in history), 2),
        "fit_seconds": round(fit_seconds, 2),  # training + per-epoch validation + data set-up
        "images_per_second": round(
            sum(m["images_per_second"] for m in history[1:] or history) / max(len(history) - 1, 1),
            1,
        ),
        "best_val_acc": round(state.best_val_acc, 4),
        "best_epoch": state.best_epoch,
        **{k: round(v, 4) for k, v in tested.items()},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="one quoted string of Hydra overrides per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    cache: dict = {}
    for spec in args.runs:
        for seed in args.seeds:
            result = run_once(shlex.split(spec), seed, cache)
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()

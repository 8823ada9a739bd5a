"""Print a Markdown table of the model configs (conf/model/*.yaml): parameters and
forward GFLOPs per 32x32 image.

Usage: python scripts/model_table.py
"""

import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cifar_resnet.models import build_model, count_flops, count_parameters  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    print("| `model=` | network | parameters | GFLOPs / image |")
    print("|---|---|---:|---:|")
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model = build_model(config["name"], **(config.get("kwargs") or {}))
        kwargs = ", ".join(f"{k}={v}" for k, v in (config.get("kwargs") or {}).items())
        print(
            f"| `{path.stem}` | {config['name']}({kwargs}) | {count_parameters(model):,} | "
            f"{count_flops(model) / 1e9:.3f} |"
        )
    print()
    print(
        "GFLOPs = 2 x multiply-accumulates of conv and linear layers for one 3x32x32 image "
        "(`count_flops`)."
    )


if __name__ == "__main__":
    main()

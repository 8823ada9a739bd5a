"""Print a Markdown table of the model zoo: parameters and forward GFLOPs per 32x32 image.

Usage: PYTHONPATH=src python scripts/model_table.py
"""

import torch

from cifar_resnet.models import MODELS, build_model, count_flops, count_parameters


def main() -> None:
    torch.manual_seed(0)
    print("| model | parameters | GFLOPs / image |")
    print("|---|---:|---:|")
    for name in MODELS:
        model = build_model(name)
        print(f"| `{name}` | {count_parameters(model):,} | {count_flops(model) / 1e9:.3f} |")
    print()
    print("GFLOPs = 2 x multiply-accumulates of conv and linear layers for one 3x32x32 image (`count_flops`).")


if __name__ == "__main__":
    main()

"""Figures and tables of a finished run: learning curves, confusion matrix,
per-class accuracy, a grid of misclassified images. Matplotlib's Agg backend:
no display is needed."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    return np.bincount(
        num_classes * np.asarray(labels) + np.asarray(predictions),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)


def per_class_accuracy_csv(matrix: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    buf.write("class,index,correct,total,accuracy\n")
    for i, name in enumerate(class_names):
        total = int(matrix[i].sum())
        correct = int(matrix[i, i])
        buf.write(f"{name},{i},{correct},{total},{correct / max(total, 1):.4f}\n")
    return buf.getvalue()


def learning_curves(history: list[dict]):
    epochs = np.arange(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "val"):
        if f"{split}_loss" in history[0]:
            ax_loss.plot(epochs, [m[f"{split}_loss"] for m in history], label=split)
            ax_acc.plot(epochs, [m[f"{split}_acc"] for m in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str = "test set"):
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({title})")
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > threshold else "black",
        )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def misclassified_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: list[str],
    limit: int = 36,
):
    """The first ``limit`` mistakes, each titled 'true -> predicted'."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predictions))[:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), wrong):
        ax.imshow(images[i])
        ax.set_title(f"{class_names[labels[i]]}\n-> {class_names[predictions[i]]}", fontsize=7)
    fig.tight_layout()
    return fig

"""The results table over registered versions, in the seed report's columns:
model, parameters, epochs, train/val/test accuracy, test accuracy with TTA, run id.

Values come from what the stages write: version tags (train: model, parameters,
epochs, val_acc, test_acc; eval_tta: test_acc_tta) and, where a tag is missing,
the source run's metrics (train_acc is the run's last epoch).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass

from . import registry

# Run metrics to fall back on when a version lacks the tag.
_RUN_FALLBACK = {"val_acc": "best_val_acc", "test_acc": "test_acc", "test_acc_tta": "test_acc_tta"}


@dataclass(frozen=True)
class Row:
    version: str
    aliases: str
    model: str
    parameters: int | None
    epochs: int | None
    train_acc: float | None
    val_acc: float | None
    test_acc: float | None
    test_acc_tta: float | None
    run_id: str


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def rows(name: str) -> list[Row]:
    holders: dict[str, list[str]] = {}
    for alias, number in registry.aliases(name).items():
        holders.setdefault(number, []).append(alias)
    out = []
    for version in registry.versions(name):
        metrics = registry.run_metrics(version.run_id)

        def acc(tag: str) -> float | None:
            value = registry.version_metric(version, tag, {})
            return value if value is not None else metrics.get(_RUN_FALLBACK[tag])

        number = str(version.version)
        out.append(Row(
            version=number, aliases=", ".join(sorted(holders.get(number, []))),
            model=version.tags.get("model", "?"),
            parameters=_int(version.tags.get("parameters")),
            epochs=_int(version.tags.get("epochs", metrics.get("epochs_trained"))),
            train_acc=metrics.get("train_acc"), val_acc=acc("val_acc"),
            test_acc=acc("test_acc"), test_acc_tta=acc("test_acc_tta"), run_id=version.run_id))
    return out


_HEADER = ("version", "aliases", "model", "parameters", "epochs", "train acc", "val acc",
           "test acc", "test acc (TTA)", "run id")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def markdown(table: list[Row]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |",
             "|" + "|".join("---:" if h in ("parameters", "epochs") or "acc" in h else "---"
                            for h in _HEADER) + "|"]
    for r in table:
        cells = (r.version, r.aliases, f"`{r.model}`",
                 "–" if r.parameters is None else f"{r.parameters:,}",
                 "–" if r.epochs is None else str(r.epochs), _pct(r.train_acc), _pct(r.val_acc),
                 _pct(r.test_acc), _pct(r.test_acc_tta), f"`{r.run_id}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(table: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(Row.__dataclass_fields__))
    writer.writeheader()
    for r in table:
        writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    return buffer.getvalue()

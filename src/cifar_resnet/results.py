"""The results table over registered versions, in the seed report's columns:
model, parameters, epochs, train/val/test accuracy, test accuracy with TTA, run id;
and the recipe, which tells apart versions of one network.

Values come from what the stages write: version tags (train: model, parameters,
epochs, val_acc, test_acc, test_acc_tta_<views>; eval_tta: test_acc_tta_<views>) and,
where a tag is missing, the source run's metrics (train_acc is the run's last epoch).

TTA accuracies get one column per view set present (``test acc (TTA flip)``, ...):
different sets are different measurements and never share a column. A val acc that a
final fit borrowed from the run that chose its settings (``settings_from_run``) is
marked, with a note under the table.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from . import registry

# Run metrics to fall back on when a version lacks the tag.
_RUN_FALLBACK = {"val_acc": "best_val_acc", "test_acc": "test_acc"}
_BORROWED = "†"


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
    run_id: str
    test_acc_tta: dict[str, float] = field(default_factory=dict)  # view set -> accuracy
    settings_from_run: str | None = None  # the run val_acc comes from, for a final fit
    recipe: str | None = None  # train's recipe tag; None without one (~recipe, older versions)


def _recipe(tag: str | None) -> str | None:
    """A version's recipe tag; train writes "None" under ``~recipe``."""
    return None if tag in (None, "None") else tag


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def rows(name: str) -> list[Row]:
    """One Row per version of registered model ``name``, oldest first. Raises
    RegistryError for an unknown model."""
    holders: dict[str, list[str]] = {}
    for alias, number in registry.aliases(name).items():
        holders.setdefault(number, []).append(alias)
    out = []
    for version in registry.versions(name):
        metrics = registry.run_metrics(version.run_id)

        # Called within this iteration only: the loop variables it reads are current.
        def acc(tag: str, version=version, metrics=metrics) -> float | None:
            value = registry.version_metric(version, tag, {})
            return value if value is not None else metrics.get(_RUN_FALLBACK[tag])

        number = str(version.version)
        out.append(
            Row(
                version=number,
                aliases=", ".join(sorted(holders.get(number, []))),
                model=version.tags.get("model", "?"),
                parameters=_int(version.tags.get("parameters")),
                epochs=_int(version.tags.get("epochs", metrics.get("epochs_trained"))),
                train_acc=metrics.get("train_acc"),
                val_acc=acc("val_acc"),
                test_acc=acc("test_acc"),
                run_id=version.run_id,
                test_acc_tta=registry.tta_accuracies(version, metrics),
                settings_from_run=version.tags.get("settings_from_run"),
                recipe=_recipe(version.tags.get("recipe")),
            )
        )
    return out


def view_sets(table: list[Row]) -> list[str]:
    """The TTA view sets any row has a figure for, sorted by name."""
    return sorted({views for r in table for views in r.test_acc_tta})


# The table's columns in order, both formats; the TTA columns and the run id follow them.
_COLUMNS = (
    "version",
    "aliases",
    "model",
    "recipe",
    "parameters",
    "epochs",
    "train_acc",
    "val_acc",
    "test_acc",
)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def markdown(table: list[Row]) -> str:
    """The table as Markdown: one line per row, one TTA column per view set present,
    and a note under it when a val acc is borrowed (``settings_from_run``)."""
    sets = view_sets(table)
    header = (
        *(column.replace("_", " ") for column in _COLUMNS),
        *(f"test acc (TTA {views})" for views in sets),
        "run id",
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join("---:" if h in ("parameters", "epochs") or "acc" in h else "---" for h in header)
        + "|",
    ]
    for r in table:
        val = _pct(r.val_acc) + (_BORROWED if r.settings_from_run and r.val_acc is not None else "")
        cells = (
            r.version,
            r.aliases,
            f"`{r.model}`",
            "–" if r.recipe is None else f"`{r.recipe}`",
            "–" if r.parameters is None else f"{r.parameters:,}",
            "–" if r.epochs is None else str(r.epochs),
            _pct(r.train_acc),
            val,
            _pct(r.test_acc),
            *(_pct(r.test_acc_tta.get(views)) for views in sets),
            f"`{r.run_id}`",
        )
        lines.append("| " + " | ".join(cells) + " |")
    borrowed = [r for r in table if r.settings_from_run and r.val_acc is not None]
    if borrowed:
        lines += [
            "",
            f"{_BORROWED} trained on all the training images (no validation split) "
            "with settings chosen on the validation split by another run; the val acc "
            "is that run's: "
            + ", ".join(f"version {r.version} from `{r.settings_from_run}`" for r in borrowed)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def csv_text(table: list[Row]) -> str:
    """The table as CSV, one column per field and one ``test_acc_tta_<views>`` column
    per view set present; empty cells where a value is missing."""
    sets = view_sets(table)
    columns = [
        *_COLUMNS,
        *(registry.TTA_PREFIX + views for views in sets),
        "run_id",
        "settings_from_run",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for r in table:
        values = {**vars(r), **{registry.TTA_PREFIX + v: a for v, a in r.test_acc_tta.items()}}
        writer.writerow({c: "" if values.get(c) is None else values[c] for c in columns})
    return buffer.getvalue()

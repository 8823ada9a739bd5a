"""results: the table keeps each TTA view set in a column of its own and marks a
val acc that a final fit borrowed from the run that chose its settings."""

import csv
import io

from cifar_resnet.results import Row, csv_text, markdown

TABLE = [
    Row("1", "champion", "resnet_small", 272474, 2, 0.5, 0.40, 0.30, "run1", {"flip": 0.35}),
    Row(
        "2",
        "",
        "resnet_small",
        272474,
        2,
        0.5,
        None,
        0.31,
        "run2",
        {"flip_shift": 0.36, "flip": 0.33},
    ),
    Row(
        "3",
        "",
        "wrn22_4",
        4298970,
        100,
        0.99,
        0.95,
        0.954,
        "run3",
        {},
        settings_from_run="run1",
        recipe="best",
    ),
]


def test_markdown_has_one_column_per_view_set_and_marks_a_borrowed_val_acc():
    header, rule, *lines = markdown(TABLE).strip().splitlines()
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "version",
        "aliases",
        "model",
        "recipe",
        "parameters",
        "epochs",
        "train acc",
        "val acc",
        "test acc",
        "test acc (TTA flip)",
        "test acc (TTA flip_shift)",
        "run id",
    ]
    assert rule.count("|") == len(cells) + 1
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if line.startswith("| ")
    }
    assert rows["1"][3] == "–" and rows["3"][3] == "`best`"
    assert rows["1"][9:11] == ["35.00%", "–"]
    assert rows["2"][7] == "–" and rows["2"][9:11] == ["33.00%", "36.00%"]
    assert rows["3"][7] == "95.00%†" and rows["3"][9:11] == ["–", "–"]
    [note] = [line for line in lines if line.startswith("†")]
    assert "version 3 from `run1`" in note and "no validation split" in note


def test_markdown_without_tta_or_borrowed_val_acc_has_neither_column_nor_note():
    text = markdown([Row("1", "", "m", 1, 1, 0.5, 0.4, 0.3, "run1")])
    assert "TTA" not in text and "†" not in text


def test_csv_names_each_view_set_and_the_settings_run():
    rows = list(csv.DictReader(io.StringIO(csv_text(TABLE))))
    assert list(rows[0]) == [
        "version",
        "aliases",
        "model",
        "recipe",
        "parameters",
        "epochs",
        "train_acc",
        "val_acc",
        "test_acc",
        "test_acc_tta_flip",
        "test_acc_tta_flip_shift",
        "run_id",
        "settings_from_run",
    ]
    assert (rows[0]["test_acc_tta_flip"], rows[0]["test_acc_tta_flip_shift"]) == ("0.35", "")
    assert rows[1]["val_acc"] == "" and rows[1]["test_acc_tta_flip_shift"] == "0.36"
    assert rows[2]["settings_from_run"] == "run1" and rows[0]["settings_from_run"] == ""
    assert (rows[0]["recipe"], rows[2]["recipe"]) == ("", "best")

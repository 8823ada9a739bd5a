"""scripts/gpu_bench.sh: the device call is prepared and checked here, on the CPU, because
a GPU is lent to few sessions and its minutes are too few to debug in."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The device has torch but neither MLflow nor Optuna (../shared/device/README.md), and no
# wheels of theirs travel: the dry run makes them unimportable, as they are there.
DEVICE_LACKS = """
import sys

class _NotOnTheDevice:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("mlflow", "optuna"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device)")

sys.meta_path.insert(0, _NotOnTheDevice())
"""


def test_the_dry_run_runs_every_planned_run_and_reports_the_capped_one_as_partial(tmp_path):
    (tmp_path / "device_site").mkdir()
    (tmp_path / "device_site" / "sitecustomize.py").write_text(DEVICE_LACKS)
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path / "device_site"),
    }
    result = subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_recipe = {}
    for run in runs:
        by_recipe.setdefault(run["recipe"], []).append(run)
    assert {r: len(v) for r, v in by_recipe.items()} == {
        "best_airbench96": 1,
        "best_airbench96_sam": 1,
        "seed": 1,
        "fast": 3,
        "fast_muon": 3,
        "airbench94_muon": 3,
    }
    assert all(r["parameters"] < 5_000_000 and r["dry_run"] for r in runs)
    [seed] = by_recipe["seed"]
    # Cut short: the fraction of its schedule is stated and the test set is not read.
    assert seed["partial"] and seed["fraction"] == 1 / seed["epochs_planned"]
    assert "test_acc" not in seed
    finished = [r for r in runs if r["recipe"] != "seed"]
    assert all("test_acc" in r and not r.get("partial") for r in finished)
    # The final fits and the control keep data.val_size=0 over the dry run's 50: no val.
    no_val = by_recipe["fast"] + by_recipe["fast_muon"] + by_recipe["airbench94_muon"]
    assert all(r["best_val_acc"] is None for r in no_val)


def test_an_unknown_argument_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--dryrun"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "usage" in result.stderr
    assert not (tmp_path / "results.jsonl").exists()

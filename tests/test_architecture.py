"""The layout as rules the suite checks: import-linter's contracts (pyproject.toml,
[tool.importlinter]) and ruff's lint and format (pyproject.toml, [tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return str(path)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = run(tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_broken_contract_is_caught(tmp_path):
    # The check can fail: models importing mlflow breaks the first contract.
    config = (REPO / "pyproject.toml").read_text()
    package = tmp_path / "src" / "cifar_resnet"
    shutil.copytree(
        REPO / "src" / "cifar_resnet", package, ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(package / "models" / "layers.py", "a") as f:
        f.write("\nimport mlflow  # noqa: E402,F401\n")
    (tmp_path / "pyproject.toml").write_text(config)
    result = subprocess.run(
        [tool("lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path / "src"), "PATH": str(BIN)},
    )
    assert result.returncode != 0 and "models import only torch" in result.stdout


def test_ruff_lint_passes():
    result = run(tool("ruff"), "check", "src", "tests", "scripts")
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_format_is_kept():
    result = run(tool("ruff"), "format", "--check", "src", "tests", "scripts")
    assert result.returncode == 0, result.stdout[-4000:] + "\nrun: ruff format src tests scripts"

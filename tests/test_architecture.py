"""The package's layers (pyproject's import-linter contracts): data flows harness -> decoding ->
models -> skipping, nothing imports a layer above it and no folder holds an import circle, every
import read (also those inside functions). The contracts are checked on the package as it is, and
shown to break on a copy with a planted back-import and a planted circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm_eval_dlmskip"
MAX_LINES = 500


def lint(root: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under ``root`` (a copy is found before the installed one)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers_and_has_no_circles():
    done = lint(ROOT, ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, planted, broken", [
    ("skipping/flops.py", "from ..harness import base", "lm_eval_dlmskip.skipping.flops -> lm_eval_dlmskip.harness.base"),
    ("models/llada.py", "from ..decoding import generate", "lm_eval_dlmskip.models.llada -> lm_eval_dlmskip.decoding.generate"),
    ("report/leaderboard.py", "from . import compare", "No cycles are allowed in lm_eval_dlmskip.report"),
    ("harness/llada.py", "from ..train import loop", "lm_eval_dlmskip.harness.llada -> lm_eval_dlmskip.train.loop"),
])
def test_a_planted_back_import_or_circle_breaks_a_contract(tmp_path, module, planted, broken):
    """An import inside a function counts as much as one at the top of the module."""
    shutil.copytree(PACKAGE, tmp_path / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / PACKAGE.name / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}  # noqa: F401\n")
    done = lint(tmp_path, tmp_path / "pyproject.toml")
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout


def test_every_module_is_of_a_readable_size():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules longer than {MAX_LINES} lines: {long}"

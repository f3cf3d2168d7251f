"""The README's offline commands for dream_skip and hf_skip run as printed, in a cheap form: the
demo checkpoints trained for a few steps (``--train-steps 3``), lm_eval on a few documents
(``--limit 4``). The commands are read from README.md, not repeated here."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"dlmskip": [sys.executable, "-m", "lm_eval_dlmskip.cli"], "lm_eval": [sys.executable, "-m", "lm_eval"]}


def readme_commands(family: str) -> list[list[str]]:
    """The commands of README.md's passage on the other demo families that concern ``family``."""
    region = re.search(r"<!-- make_docs: families -->\n(.*?)<!-- /make_docs: families -->", (ROOT / "README.md").read_text(), re.S)
    assert region, "README.md has no families passage"
    block = re.search(r"```bash\n(.*?)```", region.group(1), re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in commands if argv and any(f"{family}" in token for token in argv)]


def cheap(argv: list[str]) -> list[str]:
    extra = ["--train-steps", "3"] if argv[:2] == ["dlmskip", "demo"] else ["--limit", "4"]
    return ENTRY[argv[0]] + argv[1:] + extra


@pytest.mark.slow
@pytest.mark.parametrize("family, model", [("dream", "dream_skip"), ("llama", "hf_skip")])
def test_the_readme_commands_of_the_other_demo_families_run(tmp_path, family, model):
    commands = readme_commands(family)
    assert [argv[:2] for argv in commands] == [["dlmskip", "demo"], ["lm_eval", "--model"]]
    assert commands[1][2] == model
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    for argv in commands:
        # a generous limit, against a hang only: on a loaded 2-core machine each lm_eval start takes ~20 s
        done = subprocess.run(cheap(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    output = Path(tmp_path / commands[1][commands[1].index("--output_path") + 1])
    results = json.loads(next(output.glob("**/results_*.json")).read_text())
    assert set(results["results"]) == {"demo_reverse_mc", "demo_reverse_gen"}
    assert results["config"]["model"] == model
    assert results["config"]["dlmskip"]["flops"]["demo_reverse_gen"]["normalized_flops_papers"] == pytest.approx(7 / 8)

"""The README's offline commands for dream_skip and hf_skip run as printed, in a cheap form: the
``dlmskip demo`` line through the real ``dlmskip`` parser, building the checkpoint trained for a few
steps (``--train-steps 3``) without the demo's own two lm_eval runs (tests/test_cli.py runs those);
the ``lm_eval`` line as a process on a few documents (``--limit 4``). The commands are read from
README.md, not repeated here."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_dlmskip import cli, demo

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(family: str) -> list[list[str]]:
    """The commands of README.md's passage on the other demo families that concern ``family``."""
    region = re.search(r"<!-- make_docs: families -->\n(.*?)<!-- /make_docs: families -->", (ROOT / "README.md").read_text(), re.S)
    assert region, "README.md has no families passage"
    block = re.search(r"```bash\n(.*?)```", region.group(1), re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in commands if argv and any(f"{family}" in token for token in argv)]


def build_only(out: str, skip_layers: str, family: str, threads: int | None, train_steps: int) -> int:
    """``run_demo`` without its lm_eval runs: the checkpoint and tasks the README's next line reads."""
    demo.build_demo(out, train_steps, family)
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("family, model", [("dream", "dream_skip"), ("llama", "hf_skip")])
def test_the_readme_commands_of_the_other_demo_families_run(tmp_path, monkeypatch, family, model):
    commands = readme_commands(family)
    assert [argv[:2] for argv in commands] == [["dlmskip", "demo"], ["lm_eval", "--model"]]
    assert commands[1][2] == model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run_demo", build_only)
    assert cli.main(commands[0][1:] + ["--train-steps", "3"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    argv = commands[1]
    # a generous limit, against a hang only: on a loaded 2-core machine each lm_eval start takes ~20 s
    done = subprocess.run([sys.executable, "-m", "lm_eval", *argv[1:], "--limit", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    output = Path(tmp_path / commands[1][commands[1].index("--output_path") + 1])
    results = json.loads(next(output.glob("**/results_*.json")).read_text())
    assert set(results["results"]) == {"demo_reverse_mc", "demo_reverse_gen"}
    assert results["config"]["model"] == model
    assert results["config"]["dlmskip"]["flops"]["demo_reverse_gen"]["normalized_flops_papers"] == pytest.approx(7 / 8)

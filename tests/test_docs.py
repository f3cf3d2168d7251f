"""docs/demo and the README's demo passages are produced by docs/demo/make_docs.py, not typed.

Cheap: nothing here runs a command. The script's own run (an hour on a CPU) writes results.json;
these tests check that the committed documents are the rendering of that file, that every command
they show is one the script runs, and that results.json holds the script's current commands.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "demo"


@pytest.fixture(scope="module")
def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", DOCS / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads((DOCS / "results.json").read_text())


def shown_commands(markdown: str) -> list[list[str]]:
    """Every command of the document's ```bash blocks, as argv (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def outside_regions(text: str) -> str:
    return re.sub(r"<!-- make_docs: ([\w-]+) -->\n.*?<!-- /make_docs: \1 -->", "", text, flags=re.S)


def test_the_documents_are_the_rendering_of_results_json(make_docs, results):
    rendered = make_docs.render(results)
    assert set(rendered) == {DOCS / "README.md", DOCS / "cached.md", DOCS / "leaderboard.md", ROOT / "README.md"}
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is not what make_docs.py renders from results.json"


def test_the_figures_are_those_the_script_made(results):
    committed = {p.name for p in DOCS.glob("*.png")}
    assert committed == set(results["figures"]), "docs/demo holds a figure the script did not make, or lacks one"
    for name, digest in results["figures"].items():
        assert hashlib.sha256((DOCS / name).read_bytes()).hexdigest() == digest, f"{name} differs from the script's"


def test_results_json_was_measured_with_the_scripts_commands(make_docs, results):
    script = {name: shlex.join(argv) for name, argv in make_docs.commands()}
    recorded = {name: record["command"] for name, record in results["commands"].items()}
    assert recorded == script, "the script's commands changed since results.json was made: run make_docs.py"
    assert all(record["returncode"] == 0 for record in results["commands"].values())


def test_every_command_the_documents_show_is_one_the_script_runs(make_docs):
    script = [argv for _, argv in make_docs.commands()]
    for name in ("README.md", "cached.md"):
        shown = shown_commands((DOCS / name).read_text())
        assert shown, name
        for argv in shown:
            assert argv in script, f"docs/demo/{name} shows a command make_docs.py does not run: {shlex.join(argv)}"
    readme = [argv for argv in shown_commands((ROOT / "README.md").read_text())
              if argv[:2] == ["dlmskip", "demo"] or any("dlmskip-demo" in token for token in argv)]
    assert len(readme) >= 7  # train, lm_eval, check, and the two other families' demo and lm_eval
    for argv in readme:
        assert argv in script, f"README.md shows a demo command make_docs.py does not run: {shlex.join(argv)}"


def test_the_readme_quotes_no_demo_figure_outside_the_generated_passages():
    """A paragraph or list item outside make_docs' regions that speaks of the demo model must not
    carry a measured figure (a decimal or a percentage): those come from results.json."""
    for paragraph in re.split(r"\n\n|\n- ", outside_regions((ROOT / "README.md").read_text())):
        if "dlmskip-demo" in paragraph or "demo_reverse" in paragraph or "demo model" in paragraph:
            figures = re.findall(r"(?<![\w.=-])\d+\.\d+(?!\.?\w)|\b\d+(?:\.\d+)?%", paragraph)
            assert not figures, f"README paragraph on the demo quotes {figures} outside make_docs' regions:\n{paragraph}"


def test_commands_print_as_they_parse(make_docs):
    """The wrapped form the documents print is the same argv (quotes, brackets and an option value
    that starts with -- survive)."""
    for _, argv in make_docs.commands():
        printed = make_docs.shell(shlex.join(argv), width=60)
        assert shown_commands(f"```bash\n{printed}\n```") == [argv]


def test_the_check_output_the_readme_shows_is_what_dlmskip_check_prints_now(make_docs, results, tmp_path,
                                                                           monkeypatch, capsys):
    """The one documented output that is cheap to reproduce (no model is loaded): run the README's
    ``dlmskip check`` command on a freshly built demo folder and compare with results.json."""
    from lm_eval_dlmskip import demo
    from lm_eval_dlmskip.cli import main

    monkeypatch.chdir(tmp_path)
    demo.build_demo(make_docs.DEMO, train_steps=1)
    argv = dict(make_docs.commands())["check"]
    assert main(argv[1:]) == 0
    assert capsys.readouterr().out == results["outputs"]["check"]

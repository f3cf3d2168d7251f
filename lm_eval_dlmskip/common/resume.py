"""The command that continues an unfinished router training run, from what its checkpoint saved.

Training records, in ``train_state.json``, the ``dlmskip train`` options that differ from their
defaults (``arguments``); the command is those, the folder the run lies in now, and ``--resume``.
Evaluation names it when a router saved mid-training is used, without importing the trainer.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path


def resume_command(run: Path) -> str:
    """The ``dlmskip train`` command that continues the run in ``run`` (where it lies now)."""
    state = run / "train_state.json"
    arguments = json.loads(state.read_text()).get("arguments") if state.exists() else None
    if arguments is None:
        return f"dlmskip train --output {shlex.quote(str(run))} --resume, with the other arguments it was started with"
    return shlex.join(["dlmskip", "train", *arguments, "--output", str(run), "--resume"])

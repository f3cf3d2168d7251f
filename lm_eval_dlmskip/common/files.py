"""Atomic writes: a reader (or a crash) never sees half a file or half a checkpoint directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def check_output_dir(path: str | Path, option: str) -> None:
    """Refuse, before any work, a folder to write into that a file stands in the way of."""
    blocker = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == Path(path) else f"cannot be created: {blocker} is a file"
        raise ValueError(f"{option} {path} {where}; give a folder path (created if missing) or move the file away")


def check_output_file(path: str | Path, option: str) -> None:
    """Refuse, before any work, a file to write that is a folder or lies under a file."""
    if Path(path).is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path, e.g. {Path(path) / 'leaderboard'}")
    check_output_dir(Path(path).parent, option)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def write_directory_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory beside ``target`` with ``fill(tmp)``, then swap it in: a crash leaves
    either the old complete directory or the new one, never a half-written one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)

"""``--use_cache`` for our models: settings checked, and (llada_skip) FLOPs kept with the answers.

lm-eval keys a cached answer by the request alone and, when it has one, serves it without calling
the model. So a cache written with other settings is refused (``claim``), and llada_skip stores the
FLOPs each answer cost beside it (keys of our own in the same database) and counts them again when
lm-eval serves it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import hash_args
from sqlitedict import SqliteDict

from ..models.loading import tokenizer_fingerprint
from ..skipping.flops import FlopsMeter, FlopsModel, TaskTotals
from ..skipping.router_checkpoints import router_digest

SETTINGS_KEY = "__llada_skip_settings__"
FLOPS_PREFIX = "__llada_skip_flops__|"


class _ServedAnswers(SqliteDict):
    """lm-eval's cache database, remembering the keys read from it: lm-eval's CachingLM reads
    ``db[key]`` for exactly the answers it serves instead of calling the model."""

    served: list[str]

    def __getitem__(self, key: str):
        value = super().__getitem__(key)
        self.served.append(key)
        return value


def claim(db: SqliteDict, identity: dict, model: str) -> _ServedAnswers:
    """Refuse lm-eval's cache database when it was written with other settings, record ours, and
    from here on note the answers lm-eval serves from it (``db.served``)."""
    mine = json.dumps(identity, sort_keys=True)
    theirs = db.get(SETTINGS_KEY)
    if theirs is not None and theirs != mine:
        raise ValueError(
            f"--use_cache: this cache was written by {model} with other settings "
            f"({theirs}); lm-eval's cache keys ignore model_args, so its answers would be reused "
            f"for {mine}. Give each configuration its own --use_cache path."
        )
    db[SETTINGS_KEY] = mine
    db.commit()
    db.__class__ = _ServedAnswers
    db.served = []
    return db


def settings_identity(settings: dict, dtype: torch.dtype, tokenizer) -> dict:
    """Every setting that can change an answer: the settings but the speed switches (the batch
    layout never changes one), the dtype, max_length (truncation), the tokenizer, and the
    router's weights (a router retrained in place keeps its path)."""
    identity = {k: v for k, v in settings.items() if k not in ("compile", "cuda_graphs", "parallelize")}
    identity.update(dtype=str(dtype), tokenizer=tokenizer_fingerprint(tokenizer))
    router = settings["skip"].get("router")
    if router is not None:
        identity["router_weights"] = router_digest(Path(router))
    return identity


class AnswerCache:
    """Our side of lm-eval's answer cache: its settings, and a FLOPs meter per answer."""

    def __init__(self, db: SqliteDict, identity: dict, flops: FlopsModel, device: torch.device, model: str) -> None:
        self.db = claim(db, identity, model)
        self.meter = FlopsMeter(flops, device)  # "tasks" are the answers of one call

    def start(self, answers: list[int]) -> dict[int, int]:
        """Begin a call whose rows belong to the requests ``answers``; their meter indices."""
        return {int(a): i for a, i in self.meter.start([str(a) for a in answers]).items()}

    def store(self, kind: str, requests: list[Instance]) -> None:
        """Write the FLOPs of this call's answers beside them (lm-eval writes the answers)."""
        for answer, totals in self.meter.flush().items():
            request = requests[int(answer)]
            self.db[FLOPS_PREFIX + hash_args(kind, request.args)] = {"task": str(request.task_name), **asdict(totals)}

    def served(self) -> tuple[list[dict[str, TaskTotals]], int]:
        """Per-task FLOPs of the answers lm-eval served since the last look, and how many had none
        stored (written by a run that stopped before storing them)."""
        keys, self.db.served = self.db.served, []
        found, missing = [], 0
        for key in keys:
            try:
                stored = dict(SqliteDict.__getitem__(self.db, FLOPS_PREFIX + key))  # not noted as served
            except KeyError:
                missing += 1
                continue
            task = stored.pop("task")
            found.append({task: TaskTotals(**stored)})
        return found, missing

"""Settings and identity (issue 16, item 5): which source gives each decoding setting; every
model_arg judged before the model loads; the --use_cache key changes with every setting that can
change an answer; a router's or skip profile's identity changes with every config field, the
tokenizer and the adapter. Expected values are written out here, never computed by the code."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from lm_eval_dlmskip.harness.answer_cache import settings_identity
from lm_eval_dlmskip.harness.dream import DreamSkipLM
from lm_eval_dlmskip.harness.gen_kwargs import resolve_generation
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.harness.model_args import COMMON, parse_model_args
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.loading import adapter_fingerprint, load_model, load_tokenizer, tokenizer_fingerprint
from lm_eval_dlmskip.skipping.identity import check_identity, model_identity, with_adapter
from lm_eval_dlmskip.skipping.profiles import FORMAT_VERSION, KIND
from lm_eval_dlmskip.skipping.router_checkpoints import load_routers, save_routers
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers

LLADA_DIR = Path(__file__).parent / "fixtures" / "llada-tiny-reference"
DREAM_DIR = Path(__file__).parent / "fixtures" / "dream-reference"
FAMILIES = {"llada": (LLaDASkipLM, LLADA_DIR), "dream": (DreamSkipLM, DREAM_DIR)}


def all_model_args(family: type) -> set[str]:
    """Every model_arg a family takes, as model_args.py builds the list (pretrained, the common
    ones, the family's decoding keys and its extra ones)."""
    return {"pretrained", *COMMON, *family.decoding.keys, *family.extra_args}


# ---- precedence: model_args > task generation_kwargs > default --------------------------------
# key: (model_args value, task value, {case: (value used, source recorded; None: no source)}).
# Lengths stay valid for every case: gen_length defaults to lm-eval's max_gen_toks default 256,
# steps and block_length to gen_length.
LLADA_TABLE = {
    "gen_length": (16, 8, {"model_args": (16, "16 (model_args)"), "task": (8, "8 (task)"),
                           "both": (16, "16 (model_args, over the task's 8)"), "neither": (256, "256 (default)")}),
    "steps": (4, 8, {"model_args": (4, "4 (model_args)"), "task": (8, "8 (task)"),
                     "both": (4, "4 (model_args, over the task's 8)"), "neither": (256, "256 (default: gen_length)")}),
    "block_length": (64, 128, {"model_args": (64, "64 (model_args)"), "task": (128, "128 (task)"),
                               "both": (64, "64 (model_args, over the task's 128)"),
                               "neither": (256, "256 (default: gen_length)")}),
    "cfg": (0.5, 1.5, {"model_args": (0.5, "0.5 (model_args)"), "task": (1.5, "1.5 (task)"),
                       "both": (0.5, "0.5 (model_args, over the task's 1.5)"), "neither": (0.0, None)}),
    "remasking": ("random", "low_confidence", {
        "model_args": ("random", "random (model_args)"), "task": ("low_confidence", "low_confidence (task)"),
        "both": ("random", "random (model_args, over the task's low_confidence)"), "neither": ("low_confidence", None)}),
    "temperature": (0.5, 0.7, {"model_args": (0.5, "0.5 (model_args)"), "task": (0.7, "0.7 (task)"),
                               "both": (0.5, "0.5 (model_args, over the task's 0.7)"), "neither": (0.0, None)}),
    "cache": ("prefix", "dual", {"model_args": ("prefix", "prefix (model_args)"), "task": ("dual", "dual (task)"),
                                 "both": ("prefix", "prefix (model_args, over the task's dual)"),
                                 "neither": ("none", None)}),
    "threshold": (0.9, 0.5, {"model_args": (0.9, "0.9 (model_args)"), "task": (0.5, "0.5 (task)"),
                             "both": (0.9, "0.9 (model_args, over the task's 0.5)"), "neither": (None, None)}),
    "decide_every": ("step", "block", {"model_args": ("step", "step (model_args)"), "task": ("block", "block (task)"),
                                       "both": ("step", "step (model_args, over the task's block)"),
                                       "neither": ("block", None)}),
}
DREAM_TABLE = {
    "gen_length": (16, 8, {"model_args": (16, "16 (model_args)"), "task": (8, "8 (task)"),
                           "both": (16, "16 (model_args, over the task's 8)"), "neither": (256, "256 (default)")}),
    "steps": (4, 8, {"model_args": (4, "4 (model_args)"), "task": (8, "8 (task)"),
                     "both": (4, "4 (model_args, over the task's 8)"), "neither": (256, "256 (default: gen_length)")}),
    "alg": ("origin", "maskgit_plus", {"model_args": ("origin", "origin (model_args)"),
                                       "task": ("maskgit_plus", "maskgit_plus (task)"),
                                       "both": ("origin", "origin (model_args, over the task's maskgit_plus)"),
                                       "neither": ("entropy", None)}),
    "temperature": (0.5, 0.7, {"model_args": (0.5, "0.5 (model_args)"), "task": (0.7, "0.7 (task)"),
                               "both": (0.5, "0.5 (model_args, over the task's 0.7)"), "neither": (0.0, None)}),
    "top_p": (0.9, 0.95, {"model_args": (0.9, "0.9 (model_args)"), "task": (0.95, "0.95 (task)"),
                          "both": (0.9, "0.9 (model_args, over the task's 0.95)"), "neither": (None, None)}),
    "top_k": (5, 10, {"model_args": (5, "5 (model_args)"), "task": (10, "10 (task)"),
                      "both": (5, "5 (model_args, over the task's 10)"), "neither": (None, None)}),
    "alg_temp": (0.1, 0.2, {"model_args": (0.1, "0.1 (model_args)"), "task": (0.2, "0.2 (task)"),
                            "both": (0.1, "0.1 (model_args, over the task's 0.2)"), "neither": (0.0, None)}),
    "eps": (0.01, 0.02, {"model_args": (0.01, "0.01 (model_args)"), "task": (0.02, "0.02 (task)"),
                         "both": (0.01, "0.01 (model_args, over the task's 0.02)"), "neither": (0.001, None)}),
}
TABLES = {"llada": LLADA_TABLE, "dream": DREAM_TABLE}


def _user(family: str, **given) -> dict:
    """The decoding model_args as the harness holds them (parsed like any model_args)."""
    cls, path = FAMILIES[family]
    return parse_model_args({"pretrained": str(path), **given}, cls).decoding


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_table_covers_every_decoding_key(family):
    assert set(TABLES[family]) == set(FAMILIES[family][0].decoding.keys)


@pytest.mark.parametrize("case", ["model_args", "task", "both", "neither"])
@pytest.mark.parametrize("family, key", [(f, k) for f, table in TABLES.items() for k in table])
def test_each_decoding_setting_comes_from_model_args_then_the_task_then_the_default(family, key, case):
    user_value, task_value, expected = TABLES[family][key]
    user = _user(family, **({key: user_value} if case in ("model_args", "both") else {}))
    task = {"until": [], **({key: task_value} if case in ("task", "both") else {})}
    settings, _, origin = resolve_generation(task, user, FAMILIES[family][0].decoding)
    value, source = expected[case]
    assert getattr(settings, key) == value
    assert origin.get(key) == source


@pytest.mark.parametrize(
    "family, given, task, expected",
    [
        # lm-eval's names for the answer length, and its default
        ("llada", {}, {"max_gen_toks": 8}, {"gen_length": "8 (task)", "steps": "8 (default: gen_length)",
                                            "block_length": "8 (default: gen_length)"}),
        ("llada", {}, {"max_new_tokens": 12}, {"gen_length": "12 (task)", "steps": "12 (default: gen_length)"}),
        ("llada", {}, {"max_tokens": 12}, {"gen_length": "12 (task)"}),
        ("llada", {}, {"max_completion_tokens": 12}, {"gen_length": "12 (task)"}),
        ("llada", {}, {"max_gen_toks": 8, "max_new_tokens": 12}, {"gen_length": "8 (task)"}),  # lm-eval's priority
        ("llada", {}, {}, {"gen_length": "256 (default)", "block_length": "256 (default: gen_length)"}),
        # a task's own gen_length is more specific than its max_gen_toks
        ("llada", {}, {"gen_length": 16, "max_gen_toks": 8}, {"gen_length": "16 (task)", "steps": "16 (default: gen_length)"}),
        # model_args' gen_length over the task's max_gen_toks; steps and blocks follow it
        ("llada", {"gen_length": 16}, {"max_gen_toks": 8}, {"gen_length": "16 (model_args, over the task's 8)",
                                                           "steps": "16 (default: gen_length)",
                                                           "block_length": "16 (default: gen_length)"}),
        ("llada", {"gen_length": 16}, {"max_new_tokens": 8}, {"gen_length": "16 (model_args, over the task's 8)"}),
        # the task's length again: its steps and blocks were set for it and apply
        ("llada", {"gen_length": 8}, {"max_gen_toks": 8, "steps": 4, "block_length": 4},
         {"gen_length": "8 (model_args)", "steps": "4 (task)", "block_length": "4 (task)"}),
        # another length with every dependent setting given too
        ("llada", {"gen_length": 16, "steps": 16, "block_length": 16}, {"max_gen_toks": 8, "steps": 4, "block_length": 4},
         {"gen_length": "16 (model_args, over the task's 8)", "steps": "16 (model_args, over the task's 4)",
          "block_length": "16 (model_args, over the task's 4)"}),
        ("llada", {"steps": 4}, {"max_gen_toks": 8}, {"gen_length": "8 (task)", "steps": "4 (model_args)",
                                                     "block_length": "8 (default: gen_length)"}),
        ("dream", {}, {"max_gen_toks": 8}, {"gen_length": "8 (task)", "steps": "8 (default: gen_length)"}),
        ("dream", {"gen_length": 16}, {"max_gen_toks": 8}, {"gen_length": "16 (model_args, over the task's 8)",
                                                           "steps": "16 (default: gen_length)"}),
        ("dream", {"gen_length": 16, "steps": 2}, {"max_gen_toks": 8, "steps": 4},
         {"gen_length": "16 (model_args, over the task's 8)", "steps": "2 (model_args, over the task's 4)"}),
    ],
)
def test_answer_length_aliases_and_what_defaults_to_it(family, given, task, expected):
    _, _, origin = resolve_generation({"until": [], **task}, _user(family, **given), FAMILIES[family][0].decoding)
    assert {k: origin.get(k) for k in expected} == expected


@pytest.mark.parametrize("gen_length, refused", [(31, False), (32, True), (33, True)])
def test_an_answer_as_long_as_max_length_leaves_no_room_for_a_prompt(gen_length, refused):
    """max_length=32 holds a prompt and the answer: 31 answer tokens leave one for the prompt, 32 none."""
    gen_kwargs = {"until": [], "max_gen_toks": gen_length, "steps": gen_length, "block_length": gen_length}
    if not refused:
        assert resolve_generation(gen_kwargs, {}, max_length=32)[0].gen_length == gen_length
        return
    with pytest.raises(ValueError, match=f"gen_length={gen_length} leaves no room for a prompt within max_length=32"):
        resolve_generation(gen_kwargs, {}, max_length=32)


@pytest.mark.parametrize(
    "family, given, task, message",
    [
        ("llada", {"gen_length": 16}, {"max_gen_toks": 8, "steps": 8},
         r"gen_length=16 \(model_args\) replaces the task's 8, but the task's steps=8 were set for 8 tokens"),
        ("llada", {"gen_length": 16}, {"max_gen_toks": 8, "block_length": 4},
         r"the task's block_length=4 were set for 8 tokens"),
        ("llada", {"gen_length": 16, "steps": 16}, {"gen_length": 8, "steps": 8, "block_length": 4},
         r"the task's block_length=4 were set for 8 tokens"),  # steps given, block_length still the task's
        ("dream", {"gen_length": 16}, {"max_new_tokens": 8, "steps": 4},
         r"gen_length=16 \(model_args\) replaces the task's 8, but the task's steps=4 were set for 8 tokens"),
    ],
)
def test_a_model_args_length_with_the_tasks_steps_is_refused(family, given, task, message):
    with pytest.raises(ValueError, match=message):
        resolve_generation({"until": [], **task}, _user(family, **given), FAMILIES[family][0].decoding)


# ---- every model_arg judged before anything loads --------------------------------------------
# key: a value that is wrong without looking at a model ("<path>" names a path made by _paths).
BAD_COMMON = {
    "pretrained": "<missing>", "revision": "", "tokenizer": "<missing>", "dtype": "int4", "device": "gpu",
    "batch_size": 0, "max_batch_size": 0, "max_length": -5, "mc_num": 0, "mc_batch": 0, "check_greedy": "yes",
    "skip_layers": [-1], "skip_random": -1, "skip_profile": "<missing>", "skip_k": 2, "router": "<missing>",
    "router_tau": 0.2, "allow_mismatch": "yes", "seed": "x", "mc_seed": "x", "compile": "yes", "cuda_graphs": "yes",
    "peft": "<empty>", "trust_remote_code": "yes", "parallelize": "yes", "device_map": "everywhere",
    "max_memory_per_gpu": "lots", "max_cpu_memory": "1GB",  # the last: only with parallelize=True
}
BAD = {
    "llada": {**BAD_COMMON, "gen_length": 0, "steps": 0, "block_length": 0, "cfg": "lots", "remasking": "sideways",
              "temperature": -1.0, "cache": "sideways", "threshold": 2.0, "decide_every": "sometimes"},
    "dream": {**BAD_COMMON, "gen_length": 0, "steps": 0, "alg": "greedy", "temperature": -1.0, "top_p": 2.0, "top_k": 0,
              "alg_temp": -1.0, "eps": 2.0, "sampling_eps": "x", "cache": "prefix"},
}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_model_arg_has_a_bad_value_below(family):
    """A model_arg added later without a bad value here fails this test, so none slips by untested."""
    assert set(BAD[family]) == all_model_args(FAMILIES[family][0])


@pytest.mark.parametrize("family, key", [(f, k) for f, bad in BAD.items() for k in bad])
def test_every_bad_model_arg_is_named_before_anything_loads(tmp_path, monkeypatch, family, key):
    import lm_eval_dlmskip.harness.base as harness

    def never(*_, **__):
        raise AssertionError("the model or tokenizer was loaded before the model_args were checked")

    monkeypatch.setattr(harness, "load_model", never)
    monkeypatch.setattr(harness, "load_tokenizer", never)
    (tmp_path / "empty").mkdir()
    value = BAD[family][key]
    if isinstance(value, str) and value.startswith("<"):
        value = str(tmp_path / value.strip("<>"))
    cls, path = FAMILIES[family]
    with pytest.raises(ValueError, match=rf"(?<![a-z_]){key}\b"):
        cls(**{"pretrained": str(path), "device": "cpu", key: value})


# ---- artifacts for both families: tokenizer, checkpoint copy, routers, profiles, LoRA adapters --
def _other_tokenizer(source: Path, out: Path) -> Path:
    """The same tokenizer with two words' ids swapped: text becomes other ids."""
    out.mkdir()
    shutil.copy(source / "tokenizer_config.json", out)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["t5"], vocab["t6"] = vocab["t6"], vocab["t5"]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out


def _router(path: Path, identity: dict, cfg: LLaDAConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    routers = Routers(RouterConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, hidden=8, init_bias=0.0))
    save_routers(path, routers, identity, {"lambda": 0.3, "alpha_target": 0.5, "mask_scaling": True})
    return path


def _profile(path: Path, identity: dict, order: list[int]) -> Path:
    path.write_text(json.dumps({"kind": KIND, "format": FORMAT_VERSION, "threshold": 0.9, "selection_order": order,
                                "base_model": identity}))
    return path


def _adapter(path: Path, checkpoint: Path, seed: int) -> Path:
    """A nonzero LoRA adapter on q and v, saved as peft saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(str(checkpoint)).model, config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llada", "dream"])
def made(request, tmp_path_factory) -> dict:
    """A family's checkpoint and the artifacts made on it, by name."""
    family = request.param
    cls, checkpoint = FAMILIES[family]
    root = tmp_path_factory.mktemp(family)
    loaded = load_model(str(checkpoint))
    tokenizer = tokenizer_fingerprint(load_tokenizer(checkpoint, loaded.model.cfg.mask_token_id))
    identity = model_identity(loaded.model.cfg, str(checkpoint), loaded.fingerprint, tokenizer)
    shutil.copytree(checkpoint, root / "copy")
    return {
        "family": family, "cls": cls, "checkpoint": checkpoint, "loaded": loaded, "tokenizer": tokenizer,
        "identity": identity, "copy": str(root / "copy"),
        "other_tokenizer": str(_other_tokenizer(checkpoint, root / "other_tokenizer")),
        "router_a": str(_router(root / "router_a", identity, loaded.model.cfg, 0)),
        "router_b": str(_router(root / "router_b", identity, loaded.model.cfg, 1)),
        "profile_a": str(_profile(root / "profile_a.json", identity, [2, 0])),
        "profile_b": str(_profile(root / "profile_b.json", identity, [1])),
        "adapter_a": str(_adapter(root / "adapter_a", checkpoint, 0)),
        "adapter_b": str(_adapter(root / "adapter_b", checkpoint, 1)),
    }


def _lm(made: dict, **args):
    """The family's model with ``args``; "<name>" values are artifacts of ``made``."""
    args = {k: made[v[1:-1]] if isinstance(v, str) and v.startswith("<") else v for k, v in args.items()}
    return made["cls"](**{"pretrained": str(made["checkpoint"]), "device": "cpu", "mc_num": 16, **args})


# ---- the --use_cache key --------------------------------------------------------------------
# Every model_arg that can change an answer: key -> (a value, another value[, companions both need]).
CHANGES_ANSWERS = {
    "pretrained": ("<checkpoint>", "<copy>"), "revision": ("main", "v2"), "tokenizer": (None, "<other_tokenizer>"),
    "dtype": ("float32", "bfloat16"), "max_length": (16, 32), "mc_num": (16, 32), "mc_batch": (16, 8),
    "check_greedy": (False, True), "skip_layers": ([1], [2]), "skip_random": (1, 2),
    "skip_profile": ("<profile_a>", "<profile_b>"), "skip_k": (1, 2, {"skip_profile": "<profile_a>"}),
    "router": ("<router_a>", "<router_b>"), "router_tau": (0.1, 0.2, {"router": "<router_a>"}),
    "seed": (1, 2), "mc_seed": (1, 2), "peft": (None, "<adapter_a>"),
}
DECODING_CHANGES = {
    "llada": {"gen_length": (8, 16), "steps": (8, 16), "block_length": (8, 16), "cfg": (0.0, 0.5),
              "remasking": ("low_confidence", "random"), "temperature": (0.0, 0.5), "cache": ("none", "prefix"),
              "threshold": (0.9, 0.5), "decide_every": ("block", "step")},
    "dream": {"gen_length": (8, 16), "steps": (8, 16), "alg": ("entropy", "origin"), "temperature": (0.0, 0.5),
              "top_p": (0.9, 0.95), "top_k": (5, 10), "alg_temp": (0.0, 0.1), "eps": (0.001, 0.01),
              "sampling_eps": (0.001, 0.01)},
}
# What cannot change an answer, and why:
# - batch_size, max_batch_size: results do not depend on the batch layout (padding is masked, random
#   draws are keyed by the request; tested in test_harness.py and test_dream_harness.py);
# - compile, cuda_graphs: the same computation, compiled or replayed from a graph;
# - device: where the same computation runs (lm-eval's own cache key ignores it too);
# - trust_remote_code: accepted for lm-eval's flag, but no hub code ever runs;
# - allow_mismatch: only decides whether a run starts; two runs that both start compute the same;
# - dream's cache: only "none" (or unset) is accepted, and both mean the same;
# - parallelize and its placement settings: where the blocks run (tests/test_parallel.py).
SPLIT = {"parallelize": True, "max_cpu_memory": "1GB"}
CANNOT_CHANGE = {
    "compile": (False, True), "cuda_graphs": (True, False), "batch_size": (1, 4), "max_batch_size": (64, 8),
    "device": ("cpu", "cpu:0"), "trust_remote_code": (False, True), "allow_mismatch": (False, True),
    "parallelize": (False, True, {"max_cpu_memory": None}, SPLIT), "device_map": ("auto", "sequential", SPLIT),
    "max_memory_per_gpu": ("1GB", "2GB", SPLIT), "max_cpu_memory": ("1GB", "2GB", {"parallelize": True}),
}
CANNOT_CHANGE_FAMILY = {"llada": {}, "dream": {"cache": (None, "none")}}


def _identity(made: dict, args: dict) -> dict:
    lm = _lm(made, **args)
    return settings_identity(lm.settings, lm.model.dtype, lm.tokenizer)


def test_the_use_cache_cases_cover_every_model_arg(made):
    family = made["family"]
    changes, cannot = {**CHANGES_ANSWERS, **DECODING_CHANGES[family]}, {**CANNOT_CHANGE, **CANNOT_CHANGE_FAMILY[family]}
    assert not set(changes) & set(cannot)
    assert set(changes) | set(cannot) == all_model_args(made["cls"])


def test_a_router_retrained_in_place_is_another_use_cache_key(made, tmp_path):
    """The same router path holding other weights (retrained in place) can change every answer: the
    --use_cache key follows the weights, not the path."""
    path = tmp_path / "router"
    shutil.copytree(made["router_a"], path)
    before = _identity(made, {"router": str(path)})
    assert _identity(made, {"router": str(path)}) == before
    shutil.rmtree(path)
    shutil.copytree(made["router_b"], path)
    assert _identity(made, {"router": str(path)}) != before


def test_router_tau_zero_is_a_valid_threshold(made):
    """router_tau is in [0, 1): 0 skips a block as soon as any masked position votes skip; 1 never could."""
    assert _lm(made, router="<router_a>", router_tau=0.0).policy.tau == 0.0
    with pytest.raises(ValueError, match="router_tau=1.0 must be a number in"):
        _lm(made, router="<router_a>", router_tau=1.0)


def test_the_use_cache_key_changes_with_every_setting_that_can_change_an_answer(made):
    """Two models differing in one model_arg only: another --use_cache key exactly when that
    model_arg can change an answer."""
    family = made["family"]
    same, differ = [], []
    for key, (a, b, *companions) in {**CHANGES_ANSWERS, **DECODING_CHANGES[family]}.items():
        extra = companions[0] if companions else {}
        if _identity(made, {**extra, key: a}) == _identity(made, {**extra, key: b}):
            same.append(key)
    for key, (a, b, *companions) in {**CANNOT_CHANGE, **CANNOT_CHANGE_FAMILY[family]}.items():
        with_a, with_b = companions[0] if companions else {}, companions[-1] if companions else {}
        if _identity(made, {**with_a, key: a}) != _identity(made, {**with_b, key: b}):
            differ.append(key)
    assert (same, differ) == ([], [])


# ---- what routers and skip profiles record of the model, and the check -------------------------
ALWAYS_REFUSED = {"family": "made for", "n_layers": "this model has n_layers", "d_model": "this model has n_layers"}


def _other(value):
    """Another value of a config field's type (a new field of another type fails here, on purpose)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if value is None:
        return 7
    raise TypeError(f"no other value for {value!r}: extend _other")


def _as_saved(identity: dict) -> dict:
    return json.loads(json.dumps(identity))


def test_every_config_field_is_part_of_the_identity(made):
    """A checkpoint with the same weights but one config field changed is another model: refused,
    naming the field; allow_mismatch lets it run unless the family or the shapes differ."""
    cfg, fingerprint, tokenizer = made["loaded"].model.cfg, made["loaded"].fingerprint, made["tokenizer"]
    recorded = _as_saved(made["identity"])
    for field in fields(LLaDAConfig):
        other = _other(getattr(cfg, field.name))
        changed = replace(cfg, **{field.name: other})
        assert model_identity(changed, "m", fingerprint, tokenizer) != model_identity(cfg, "m", fingerprint, tokenizer)
        message = ALWAYS_REFUSED.get(field.name, rf"the config of the model evaluated differs in {field.name} "
                                                 rf"\({getattr(cfg, field.name)!r} there, {other!r} here\)")
        with pytest.raises(ValueError, match=message):
            check_identity(recorded, changed, fingerprint, False, "router='r' was trained for", tokenizer)
        if field.name in ALWAYS_REFUSED:
            with pytest.raises(ValueError, match=message):
                check_identity(recorded, changed, fingerprint, True, "router='r' was trained for", tokenizer)
        else:
            check_identity(recorded, changed, fingerprint, True, "router='r' was trained for", tokenizer)
    check_identity(recorded, cfg, fingerprint, False, "router='r' was trained for", tokenizer)  # itself: accepted


def test_the_tokenizer_and_the_adapter_are_part_of_the_identity(made):
    cfg, fingerprint, tokenizer = made["loaded"].model.cfg, made["loaded"].fingerprint, made["tokenizer"]
    recorded = _as_saved(made["identity"])
    with pytest.raises(ValueError, match=rf"made with tokenizer {tokenizer}, the tokenizer in use is 0123456789abcdef"):
        check_identity(recorded, cfg, fingerprint, False, "skip_profile='p' was measured on", "0123456789abcdef")
    check_identity(recorded, cfg, fingerprint, True, "skip_profile='p' was measured on", "0123456789abcdef")
    adapter_a, adapter_b = (adapter_fingerprint(made[k]) for k in ("adapter_a", "adapter_b"))
    on_a = _as_saved(model_identity(cfg, "m", with_adapter(fingerprint, adapter_a), tokenizer))
    check_identity(on_a, cfg, with_adapter(fingerprint, adapter_a), False, "router='r' was trained for", tokenizer)
    for evaluated in (fingerprint, with_adapter(fingerprint, adapter_b)):
        with pytest.raises(ValueError, match=rf"the weights evaluated.* have fingerprint {re.escape(evaluated)}\."):
            check_identity(on_a, cfg, evaluated, False, "router='r' was trained for", tokenizer)


def test_artifacts_written_before_config_and_tokenizer_were_recorded_still_load(made):
    cfg, fingerprint = made["loaded"].model.cfg, made["loaded"].fingerprint
    old = {k: v for k, v in _as_saved(made["identity"]).items() if k not in ("config", "tokenizer")}
    check_identity(old, replace(cfg, rope_theta=1.0, mask_token_id=3), fingerprint, False, "router='r' was trained for",
                   "0123456789abcdef")
    with pytest.raises(ValueError, match="this model has n_layers"):  # what they recorded is still checked
        check_identity(old, replace(cfg, n_layers=cfg.n_layers + 1), fingerprint, True, "router='r' was trained for")


def _with_config(made: dict, out: Path, **changes) -> Path:
    """A copy of the family's checkpoint whose config.json differs in ``changes`` (same weights)."""
    shutil.copytree(made["checkpoint"], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


def test_the_harness_refuses_a_router_or_profile_made_on_another_config_tokenizer_or_adapter(made, tmp_path):
    raw_eps = "rms_norm_eps"  # the same name in LLaDA's and Dream's config.json
    eps = made["loaded"].model.cfg.rms_norm_eps
    other = _with_config(made, tmp_path / "other_eps", **{raw_eps: eps * 10})
    for artifact in ({"router": "<router_a>"}, {"skip_profile": "<profile_a>"}):
        _lm(made, **artifact)  # the model it was made on
        with pytest.raises(ValueError, match=rf"differs in rms_norm_eps \({eps!r} there, {eps * 10!r} here\)"):
            _lm(made, pretrained=str(other), **artifact)
        _lm(made, pretrained=str(other), allow_mismatch=True, **artifact)
        with pytest.raises(ValueError, match=rf"made with tokenizer {made['tokenizer']}, the tokenizer in use is "):
            _lm(made, tokenizer="<other_tokenizer>", **artifact)
        with pytest.raises(ValueError, match=r"the weights evaluated \(base [0-9a-f]{16} \+ peft adapter [0-9a-f]{16}\)"):
            _lm(made, peft="<adapter_a>", **artifact)


def test_train_and_calibrate_record_the_config_and_the_tokenizer(tmp_path):
    """What the writers of routers and profiles record: every config field and the tokenizer used."""
    import argparse

    from lm_eval_dlmskip.report import calibrate
    from lm_eval_dlmskip.train.config import TrainConfig
    from lm_eval_dlmskip.train.loop import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i + 2}", "target": f" t{i + 3} t{i + 4}"}) + "\n"
                            for i in range(8)))
    train(TrainConfig(model=str(LLADA_DIR), output=str(tmp_path / "router"), data=str(data), router_hidden=8,
                      batch_size=4, effective_batch_size=4, max_steps=1, eval_every=100, dtype="float32", device="cpu",
                      val_fraction=0.0))
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    calibrate.run_calibrate(parser.parse_args(["--model", str(LLADA_DIR), "--data", str(data), "--output",
                                               str(tmp_path / "profile.json"), "--dtype", "float32"]))
    cfg = load_model(str(LLADA_DIR)).model.cfg
    expected = {"config": cfg.to_dict(), "tokenizer": tokenizer_fingerprint(load_tokenizer(LLADA_DIR, cfg.mask_token_id))}
    router = json.loads((tmp_path / "router" / "router.json").read_text())["base_model"]
    profile = json.loads((tmp_path / "profile.json").read_text())["base_model"]
    assert {k: router[k] for k in expected} == expected
    assert {k: profile[k] for k in expected} == expected
    load_routers(tmp_path / "router", cfg, router["fingerprint"], tokenizer=expected["tokenizer"])
    with pytest.raises(ValueError, match="the tokenizer in use is 0123456789abcdef"):
        load_routers(tmp_path / "router", cfg, router["fingerprint"], tokenizer="0123456789abcdef")

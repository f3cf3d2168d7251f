"""The FLOPs and NFE in the results against an independent count of what ran.

Reference: torch's own ``FlopCounterMode`` counts the multiply-adds of the matrix products each
forward actually executed (2 M N K per ``mm``/``addmm``/``bmm``, 4 B H_q L_q L_k hd per attention),
and hooks count the rows each block actually ran, the tokens each forward embedded and the
forwards themselves. The harness runs in process on the tiny checkpoints; its figures under
``get_model_info()["dlmskip"]["flops"][task]`` must equal these counts:

    tflops * 1e12          == counted products + EMBEDDING (4 d per embedded token, a lookup)
    tflops_no_skip * 1e12  == the same, for the same forwards replayed with every block running
    mean_executed_blocks, block_execution_ratio, normalized_flops_papers == block rows counted

What the figure leaves out on purpose (every operation that is no matrix product: RMSNorms, the
routers' too, rotary, the attention softmax, SiLU and the gate product, residual adds, bias adds)
is named and bounded at LLaDA-8B's shape in ``test_what_the_figure_leaves_out_is_named_and_bounded``.
The formula itself is checked at LLaDA-8B's and Dream-7B's shapes on the meta device. NFE and the
'vs plain decoding' baseline are checked against a hand count on a 2-block toy.

llada_skip and dream_skip count a row's real tokens only, so their batches here hold requests of
equal length (padding, which the products do compute, would differ by definition); hf_skip
charges its padded positions, which its forwards compute, so its batches are padded.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lm_eval_dlmskip.harness.dream import DreamSkipLM
from lm_eval_dlmskip.harness.hf import HFSkipLM
from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.execution import KVCache
from lm_eval_dlmskip.models.hf_layers import find_layers
from lm_eval_dlmskip.models.llada import LLaDA
from lm_eval_dlmskip.models.loading import load_model
from lm_eval_dlmskip.skipping.flops import FlopsModel
from lm_eval_dlmskip.skipping.identity import model_identity
from lm_eval_dlmskip.skipping.policies import NO_SKIP, SkipTrace, StaticSkip
from lm_eval_dlmskip.skipping.router_checkpoints import save_routers
from lm_eval_dlmskip.skipping.routers import RouterConfig, Routers

DREAM = Path(__file__).parent / "fixtures" / "dream-reference"
aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: one thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # On the CPU attention runs as one fused kernel for which the counter has no entry; torch's
    # own formula for its GPU kernels (scores and values: 4 B H_q L_q L_k hd, GQA included) applies.
    return sdpa_flop_count(query, key, value)


def _grouped_mm(a, b, *args, out_shape=None, **kwargs) -> int:
    # The MoE experts' grouped products (rows of a [N, K] sorted by expert, b [E, K, M]), for which the
    # counter has no entry: each row meets one expert's K x M matrix.
    return 2 * a[0] * b[1] * b[2]


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                                                          aten._grouped_mm: _grouped_mm})


class Ran:
    """What the forwards of ``model`` actually ran, counted from outside: matrix-product FLOPs
    (FlopCounterMode, entered and left around each forward only), rows per forward and per block
    (forward pre-hooks), tokens embedded; and each call's arguments, to replay it without skipping."""

    def __init__(self, model: torch.nn.Module, embedding: torch.nn.Module, blocks) -> None:
        self.model = model
        self.n_blocks = len(blocks)
        self.active = True
        self._mode = None
        self.reset()
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._leave)
        embedding.register_forward_pre_hook(self._embedded)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self._block, i))

    def reset(self) -> None:
        self.flops = 0
        self.calls = 0  # forward passes
        self.rows = 0  # rows of those forward passes (the unit 'forwards' counts)
        self.tokens = 0
        self.block_rows = [0] * self.n_blocks
        self.recorded: list[tuple] = []

    def snapshot(self) -> dict:
        return {"flops": self.flops, "calls": self.calls, "rows": self.rows, "tokens": self.tokens,
                "block_rows": list(self.block_rows), "shapes": [tuple(ids.shape) for ids, *_ in self.recorded]}

    def _enter(self, module, args, kwargs) -> None:
        if not self.active:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.rows += ids.shape[0]
        self.recorded.append((ids.clone(), *args[1:2], {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                        for k, v in kwargs.items()}))
        self._mode = counter().__enter__()

    def _leave(self, module, args, output) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops += self._mode.get_total_flops()
            self._mode = None

    def _embedded(self, module, args) -> None:
        if self.active:
            self.tokens += args[0].numel()

    def _block(self, i: int, module, args) -> None:
        if self.active:
            self.block_rows[i] += args[0].shape[0]

    def replay_without_skipping(self) -> int:
        """Matrix-product FLOPs of the recorded forwards run again with every block for every row
        (a window forward after its cache fill, as recorded)."""
        self.active = False
        caches: dict[int, KVCache] = {}
        total = 0
        try:
            for ids, *rest, kwargs in self.recorded:
                kwargs = dict(kwargs, policy=NO_SKIP)
                if kwargs.get("cache") is not None:
                    original = kwargs["cache"]
                    kwargs["cache"] = caches.setdefault(id(original), KVCache(reuse_decisions=original.reuse_decisions))
                with torch.no_grad(), counter() as mode:
                    self.model(ids, *rest, **kwargs)
                total += mode.get_total_flops()
        finally:
            self.active = True
        return total


def llada_lm(ref_dir, **model_args) -> tuple[LLaDASkipLM, Ran]:
    lm = LLaDASkipLM.create_from_arg_obj({"pretrained": str(ref_dir), "device": "cpu", "dtype": "float32", **model_args})
    return lm, Ran(lm.model, lm.model.wte, lm.model.blocks)


def check_against_count(summary: dict, ran: dict, d_model: int, n_layers: int, no_skip_flops: int,
                        papers_from_blocks: bool = True) -> None:
    """Every figure of one task's summary against the independent count ``ran`` (a snapshot) and
    the counted products of the same forwards without skipping (``papers_from_blocks`` False: the
    blocks ran for rows whose decision skipped them, and the papers' figures are not checked here)."""
    embedding = 4 * d_model * ran["tokens"]  # the figure's embedding term: a lookup, no matrix product
    spent, no_skip = ran["flops"] + embedding, no_skip_flops + embedding
    assert summary["tflops"] == spent / 1e12  # exact: sums of integers below 2^53
    assert summary["tflops_no_skip"] == no_skip / 1e12
    assert summary["normalized_flops_whole_model"] == pytest.approx(spent / no_skip, rel=1e-12)
    rows = ran["rows"]
    assert summary["forwards"] == rows
    assert summary["tokens_per_forward"] == pytest.approx(ran["tokens"] / rows, rel=1e-12)
    if not papers_from_blocks:
        return
    assert summary["block_execution_ratio"] == pytest.approx([r / rows for r in ran["block_rows"]], rel=1e-12)
    assert summary["mean_executed_blocks"] == pytest.approx(sum(ran["block_rows"]) / rows, rel=1e-12)
    assert summary["normalized_flops_papers"] == pytest.approx(sum(ran["block_rows"]) / (rows * n_layers), rel=1e-12)


def check_replayed(summary: dict, ran: Ran, d_model: int, n_layers: int) -> None:
    """llada_skip and dream_skip: the no-skip figure against the recorded forwards replayed without skipping."""
    check_against_count(summary, ran.snapshot(), d_model, n_layers, ran.replay_without_skipping())


def save_router(path: Path, checkpoint_dir, depth: int = 2, init_bias: float = 0.0) -> Path:
    """Routers whose decisions differ by row and block (random last layers, an execute bias of
    ``init_bias``: none on the tiny LLaDA and Dream)."""
    checkpoint = load_model(str(checkpoint_dir), dtype="float32")
    cfg = checkpoint.model.cfg
    torch.manual_seed(4)
    routers = Routers(RouterConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, hidden=16, depth=depth, init_bias=init_bias))
    for r in routers.routers:
        torch.nn.init.normal_(r.net[-1].weight, std=3.0)
    save_routers(path, routers, model_identity(cfg, str(checkpoint_dir), checkpoint.fingerprint),
                 {"lambda": 0.3, "alpha_target": 0.5})
    return path


PROMPTS = ("t5 t6 t7", "t20 t21 t22")  # three tokens each: a batch of two without padding
GEN = {"until": [], "max_gen_toks": 8, "steps": 4, "block_length": 4}  # two blocks of two steps


def gen_requests(task: str = "gen", **kwargs) -> list[Instance]:
    return [Instance("generate_until", {}, (p, {**GEN, **kwargs}), 0, (task, i, 1)) for i, p in enumerate(PROMPTS)]


def ll_requests(task: str = "ll") -> list[Instance]:
    """One request per document (a loglikelihood task: is_greedy is computed, a forward per answer token)."""
    answers = (" t9 t10 t11", " t30 t31 t32")
    return [Instance("loglikelihood", {}, (p, a), 0, (task, i, 1)) for i, (p, a) in enumerate(zip(PROMPTS, answers))]


GENERATION = {
    "plain": {},
    "prefix+static": {"cache": "prefix", "skip_layers": [1, 3]},
    "dual+random": {"cache": "dual", "skip_random": 2, "seed": 3},
    "threshold": {"threshold": 0.2, "skip_layers": [0]},
    "dual+threshold+routed/block": {"cache": "dual", "threshold": 0.2, "router": "router2"},
    "prefix+routed/step": {"cache": "prefix", "decide_every": "step", "router": "router3"},
    "cfg+dual+routed/block": {"cfg": 0.5, "cache": "dual", "router": "router2"},
    "cfg+random": {"cfg": 0.5, "skip_random": 3},
}


@pytest.fixture(scope="module")
def routers(tmp_path_factory, ref_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("routers")
    paths = {f"router{depth}": save_router(root / f"router{depth}", ref_dir, depth) for depth in (2, 3)}
    return {**paths, "dream": save_router(root / "dream", DREAM)}


@pytest.mark.parametrize("mode", list(GENERATION))
def test_generation_flops_are_what_ran(mode, ref_dir, routers):
    args = {k: (str(routers[v]) if k == "router" else v) for k, v in GENERATION[mode].items()}
    lm, ran = llada_lm(ref_dir, batch_size=2, **args)
    lm.generate_until(gen_requests(), disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["gen"]
    check_replayed(summary, ran, 64, 6)
    assert summary["nfe_per_request"] == ran.calls  # both requests share every forward


@pytest.mark.parametrize("mode", ["static", "random", "cfg+routed"])
def test_likelihood_flops_are_what_ran(mode, ref_dir, routers):
    args = {"static": {"skip_layers": [2, 5]}, "random": {"skip_random": 2},
            "cfg+routed": {"cfg": 0.5, "router": str(routers["router2"])}}[mode]
    lm, ran = llada_lm(ref_dir, batch_size=2, mc_num=4, mc_batch=2, **args)
    lm.loglikelihood(ll_requests(), disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["ll"]
    check_replayed(summary, ran, 64, 6)
    assert "nfe_per_request" not in summary


def test_padding_is_not_charged(ref_dir):
    """Requests of different lengths in one padded batch are charged their real tokens and keys:
    the batch reports what the requests cost alone, where nothing is padded, as counted."""
    gen = [Instance("generate_until", {}, (p, GEN), 0, ("gen", i, 1)) for i, p in enumerate(("t5 t6 t7", "t20 t21 t22 t23 t24"))]
    ll = [Instance("loglikelihood", {}, ("t5 t6", a), i, ("ll", 0, 1)) for i, a in enumerate((" t9", " t30 t31 t32"))]
    args = {"cache": "dual", "skip_layers": [1, 3], "mc_num": 4, "mc_batch": 2}  # no greedy check: multiple choice
    together, _ = llada_lm(ref_dir, batch_size=2, **args)
    together.generate_until(gen, disable_tqdm=True)
    together.loglikelihood(ll, disable_tqdm=True)
    flops = together.get_model_info()["dlmskip"]["flops"]
    # alone, a choice keeps idx 1 so that it is still taken for a multiple-choice one (no greedy check)
    ll_alone = [Instance("loglikelihood", {}, r.args, 1, ("ll", 0, 1)) for r in ll]
    for task, call, requests in (("gen", "generate_until", gen), ("ll", "loglikelihood", ll_alone)):
        alone = 0
        for request in requests:
            lm, ran = llada_lm(ref_dir, batch_size=1, **args)
            getattr(lm, call)([request], disable_tqdm=True)
            alone += ran.flops + 4 * 64 * ran.tokens
        assert flops[task]["tflops"] == pytest.approx(alone / 1e12, rel=1e-12)


def test_each_task_is_charged_its_own_rows(ref_dir):
    """Two tasks' likelihood requests in one batch, answers of 1 and 4 tokens: their rows score
    different numbers of masked positions (the LM head runs at those, flat indices into the
    batch), and each task is charged what its request costs alone, as counted (choices keep
    idx 1: no greedy check)."""
    pairs = {"short": ("t5 t6 t7 t8", " t9"), "long": ("t5", " t30 t31 t32 t33")}
    requests = [Instance("loglikelihood", {}, pair, 1, (task, 0, 1)) for task, pair in pairs.items()]
    together, _ = llada_lm(ref_dir, batch_size=2, mc_num=4, mc_batch=2)
    together.loglikelihood(requests, disable_tqdm=True)
    flops = together.get_model_info()["dlmskip"]["flops"]
    for request in requests:
        lm, ran = llada_lm(ref_dir, batch_size=1, mc_num=4, mc_batch=2)
        lm.loglikelihood([request], disable_tqdm=True)
        assert flops[request.task_name]["tflops"] == (ran.flops + 4 * 64 * ran.tokens) / 1e12


DREAM_GEN = {"until": [], "max_gen_toks": 8, "steps": 4}


@pytest.mark.parametrize("mode", ["static", "random", "routed"])
def test_dream_flops_are_what_ran(mode, routers):
    args = {"static": {"skip_layers": [1]}, "random": {"skip_random": 2}, "routed": {"router": str(routers["dream"])}}[mode]
    lm = DreamSkipLM.create_from_arg_obj({"pretrained": str(DREAM), "device": "cpu", "dtype": "float32", "batch_size": 2,
                                          "mc_num": 4, "mc_batch": 2, **args})
    ran = Ran(lm.model, lm.model.wte, lm.model.blocks)
    lm.generate_until([Instance("generate_until", {}, (p, DREAM_GEN), 0, ("gen", i, 1)) for i, p in enumerate(PROMPTS)],
                      disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["gen"]
    check_replayed(summary, ran, 48, 4)
    assert summary["nfe_per_request"] == ran.calls
    ran.reset()
    lm.loglikelihood(ll_requests(), disable_tqdm=True)
    check_replayed(lm.get_model_info()["dlmskip"]["flops"]["ll"], ran, 48, 4)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    from .test_hf import save_qwen2

    path = tmp_path_factory.mktemp("qwen") / "tiny"
    save_qwen2(path)
    return path


def hf_lm(path: Path, **kwargs) -> tuple[HFSkipLM, Ran]:
    lm = HFSkipLM(pretrained=str(path), device="cpu", dtype="float32", **kwargs)
    return lm, Ran(lm.model, lm.model.get_input_embeddings(), [wrapped.layer for wrapped in find_layers(lm.model)])


HF_LL = [("abcdefg", " hij"), ("klm", " nopq!"), ("rstuvwxyzab", " c"), ("de", " fg")]  # padded batches
HF_GEN = {"until": ["zzz"], "max_gen_toks": 5, "do_sample": False}


def hf_run(lm: HFSkipLM, ran: Ran) -> dict[str, tuple[dict, dict]]:
    """Per request type: the summary and what ran."""
    out = {}
    for task, call, requests in (
        ("ll", lm.loglikelihood, [Instance("loglikelihood", {}, pair, 0, ("ll", i, 1)) for i, pair in enumerate(HF_LL)]),
        ("gen", lm.generate_until, [Instance("generate_until", {}, (c, HF_GEN), 0, ("gen", i, 1)) for i, (c, _) in enumerate(HF_LL)]),
    ):
        ran.reset()
        call(requests, disable_tqdm=True)
        out[task] = (lm.get_model_info()["dlmskip"]["flops"][task], ran.snapshot())
    return out


@pytest.mark.parametrize("mode, batch_size", [({"skip_layers": [1]}, 1), ({"skip_layers": [1]}, 4), ({"skip_random": 2}, 1),
                                              ({"skip_random": 2}, 4)],
                         ids=["static-batch1", "static-batch4", "random-batch1", "random-batch4"])
def test_hf_skip_flops_are_what_ran(mode, batch_size, qwen):
    """At batch 4 rows draw different random layers: a layer any row of the batch runs is computed
    for all of them, and the FLOPs must say so; the papers' figure stays each row's draw (2 of 4)."""
    lm, ran = hf_lm(qwen, batch_size=batch_size, **mode)
    plain, plain_ran = hf_lm(qwen, batch_size=batch_size)
    skipping, without = hf_run(lm, ran), hf_run(plain, plain_ran)
    per_row = "skip_random" in mode and batch_size > 1
    for task in ("ll", "gen"):
        (summary, counted), (_, full) = skipping[task], without[task]
        assert counted["shapes"] == full["shapes"]  # the same forwards, so the plain run's count is the no-skip one
        check_against_count(summary, counted, 32, 4, full["flops"], papers_from_blocks=not per_row)
        if per_row:
            assert summary["mean_executed_blocks"] == 4 - 2 and summary["normalized_flops_papers"] == 2 / 4


# ---- the 2-block toy: NFE and the 'vs plain decoding' baseline by hand ----------------------
D, KV, FF, V, LAYERS = 64, 64, 160, 256, 6  # the tiny reference LLaDA
P, G, BLOCK = 3, 8, 4  # prompt tokens, answer tokens (two blocks of four), steps = 4 (two per block)


def by_hand(n: int, keys: int, head: int, blocks: int = LAYERS) -> int:
    """One row's forward computing n tokens that attend to ``keys`` keys through ``blocks`` blocks,
    logits at ``head`` positions: embedding 4d per token; per block q/k/v/o 2 d (2d + 2kv), attention
    4 keys d, SwiGLU 6 d d_ff per token; head 2 d V per position."""
    return 4 * D * n + blocks * (n * (2 * D * (2 * D + 2 * KV) + 6 * D * FF) + 4 * n * keys * D) + 2 * D * V * head


PLAIN = 4 * by_hand(P + G, P + G, BLOCK)  # upstream's uncached decoding: 4 full forwards, the head over the block
TOY = {  # model_args: (forward passes, FLOPs of one request's forwards, rows per request)
    "none": ({}, 4, 4 * by_hand(P + G, P + G, BLOCK), 1),
    # each block: a fill over the canvas, then the block and what follows it (8 tokens, then 4) over the cache
    "prefix": ({"cache": "prefix"}, 4, 2 * by_hand(11, 11, 4) + by_hand(8, 11, 4) + by_hand(4, 11, 4), 1),
    # each block: a fill, then the block alone (4 tokens) over the cache
    "dual+static": ({"cache": "dual", "skip_layers": [1, 3]}, 4, 2 * by_hand(11, 11, 4, 4) + 2 * by_hand(4, 11, 4, 4), 1),
    # no confidence reaches 1: one token per step, four steps per block
    "threshold=1": ({"threshold": 1.0}, 8, 8 * by_hand(11, 11, 4), 1),
    # the unconditional rows (prompt masked) double every forward and the plain baseline alike
    "cfg+dual": ({"cfg": 0.5, "cache": "dual"}, 4, 2 * (2 * by_hand(11, 11, 4) + 2 * by_hand(4, 11, 4)), 2),
}


@pytest.mark.parametrize("mode", list(TOY))
def test_nfe_and_the_plain_decoding_baseline_by_hand(mode, ref_dir):
    args, nfe, flops, rows = TOY[mode]
    lm, _ = llada_lm(ref_dir, batch_size=2, **args)
    lm.generate_until(gen_requests(), disable_tqdm=True)  # two requests of P=3 tokens, one batch
    summary = lm.get_model_info()["dlmskip"]["flops"]["gen"]
    assert summary["nfe_per_request"] == nfe
    assert summary["tflops"] == 2 * flops / 1e12
    assert summary["normalized_flops_vs_plain_decoding"] == pytest.approx(flops / (rows * PLAIN), rel=1e-12)


# ---- the published shapes, on the meta device (shapes only, no weights) ----------------------
LLADA_8B = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "max_sequence_length": 4096, "mask_token_id": 126336}


def dream_7b() -> LLaDAConfig:
    raw = json.loads((DREAM / "config.json").read_text())
    raw.update(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, mask_token_id=151666)
    return LLaDAConfig.from_dict(raw)


def on_meta(cfg: LLaDAConfig) -> LLaDA:
    with torch.device("meta"):
        model = LLaDA(cfg)
    return model.fuse_projections()


@pytest.mark.parametrize("name", ["LLaDA-8B", "Dream-7B"])
def test_the_formula_at_the_published_shapes(name):
    """A full forward of 512 tokens (logits over a block of 32) and a window forward of that block
    over the cache, every block running and blocks 4, 6, 8 skipped: FlopsModel's figures equal
    the counted products (Dream-7B: 28 query heads sharing 4 key/value heads, q/k/v biases)."""
    cfg = LLaDAConfig(**LLADA_8B) if name == "LLaDA-8B" else dream_7b()
    model, flops = on_meta(cfg), FlopsModel.of(cfg)
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    # Dream's shifted logits have no window forward (cached decoding is refused for it)
    forwards = [(None, 512)] if cfg.shift_logits else [(None, 512), (slice(256, 288), 32)]
    for policy, executed in ((NO_SKIP, [True] * cfg.n_layers), (StaticSkip({4, 6, 8}), [i not in (4, 6, 8) for i in range(cfg.n_layers)])):
        cache = KVCache()
        for window, n in forwards:
            with counter() as mode:
                model(ids, policy=policy, logits_at=slice(0, 32) if window else slice(256, 288), cache=cache, window=window)
            one = torch.ones(1, dtype=torch.long)
            trace = SkipTrace(torch.tensor([executed]), n * one, 32 * one, 0 * one, keys=512 * one)
            spent, _ = flops.forward(trace)
            assert spent.item() == mode.get_total_flops() + 4 * cfg.d_model * n


# FLOPs per element of the operations the figure leaves out: 1 for arithmetic, 4 for SiLU
# (exp, add, divide, multiply), 5 for softmax (max, subtract, exp, sum, divide), reductions per input.
OMITTED_COST = {"silu": 4, "_safe_softmax": 5}


class Omitted(TorchDispatchMode):
    """Sums the FLOPs of every pointwise, reduction and softmax operation run: the work that is no
    matrix product (views, copies and the embedding lookup do no arithmetic)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (torch.Tag.pointwise in func.tags or name in ("mean", "sum", "_safe_softmax")) and name != "clone":
            elements = max(a.numel() for a in (*args, out) if isinstance(a, torch.Tensor))
            self.by_op[name] = self.by_op.get(name, 0) + OMITTED_COST.get(name, 1) * elements
        return out


def test_what_the_figure_leaves_out_is_named_and_bounded():
    """The figure counts matrix products only (and 4d per token for the embedding). At LLaDA-8B's
    shape over 512 tokens the rest, RMSNorms (pow, mean, rsqrt, scale), rotary (cos/sin tables,
    multiply, negate, add), the attention softmax, SiLU and the gate product, residual adds, comes
    to under 0.05% of it: it grows with d per token against d^2 for the products. A router of the
    paper's width (512) leaves out its RMSNorm(h) and SiLU: under 0.1% of the router's figure."""
    cfg = LLaDAConfig(**LLADA_8B)
    with Omitted() as omitted:
        on_meta(cfg)(torch.zeros(1, 512, dtype=torch.long, device="meta"), logits_at=slice(256, 512))
    one = torch.ones(1, dtype=torch.long)
    reported, _ = FlopsModel.of(cfg).forward(SkipTrace(torch.ones(1, 32, dtype=torch.bool), 512 * one, 256 * one, 0 * one))
    assert {"pow", "mean", "rsqrt", "silu", "_safe_softmax", "add", "mul", "neg", "cos", "sin"} <= set(omitted.by_op)
    assert sum(omitted.by_op.values()) < 5e-4 * reported.item()

    with torch.device("meta"):
        router = Routers(RouterConfig(d_model=4096, n_layers=1, hidden=512)).routers[0]
    h = torch.zeros(1, 512, 4096, device="meta")
    with Omitted() as omitted, counter() as products:
        router(h)
    router_figure = FlopsModel.of(cfg, router_hidden=512).router(torch.tensor(512)).item()
    assert router_figure == products.get_total_flops()  # Linear(d, h) and Linear(h, 2), biases aside
    assert {"pow", "mean", "rsqrt", "silu"} <= set(omitted.by_op)
    assert sum(omitted.by_op.values()) < 1e-3 * router_figure


def test_the_plain_decoding_baseline_of_a_padded_batch_by_hand(ref_dir):
    """Prompts of 3 and 5 tokens in one left-padded batch: upstream's uncached decoding of each is
    4 full forwards over its own real tokens (P + 8), the head over a block of 4; padding is no part
    of the baseline (the 'vs plain decoding' figure divides the FLOPs spent by it)."""
    gen = [Instance("generate_until", {}, (p, GEN), 0, ("gen", i, 1)) for i, p in enumerate(("t5 t6 t7", "t20 t21 t22 t23 t24"))]
    lm, _ = llada_lm(ref_dir, batch_size=2)
    lm.generate_until(gen, disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["gen"]
    plain = sum(4 * by_hand(p + G, p + G, BLOCK) for p in (3, 5))
    assert summary["normalized_flops_vs_plain_decoding"] == pytest.approx(summary["tflops"] * 1e12 / plain, rel=1e-12)

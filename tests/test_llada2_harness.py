"""``llada2_skip`` on the tiny LLaDA2 of tests/fixtures/llada2-reference: the block-wise likelihood
against an exact enumeration, the block split, is_greedy, the family refusals, FLOPs with active
parameters against what ran, the real lm_eval CLI and every skip method.

The likelihood (harness/llada2.py): under the block-causal mask log p(answer | prompt) factorises
over the answer's blocks (counted from column 0), and each block's term is estimated as LLaDA's
bound with the earlier blocks clean and the later positions absent. The test enumerates that bound
exactly with the model itself: for every block, every count l in 1..T_b and every subset of l
masked positions, (T_b / l) * sum of the masked positions' cross-entropies, averaged over l
uniform and the subsets uniform; the variance of one Monte-Carlo sample comes from the same
enumeration.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_dlmskip.harness.llada import LLaDASkipLM
from lm_eval_dlmskip.harness.llada2 import LLaDA2SkipLM, answer_blocks
from lm_eval_dlmskip.models import moe
from lm_eval_dlmskip.models.loading import load_model

from .conftest import words, write_task
from .processes import lm_eval
from .test_flops_reference import Ran, check_replayed, save_router

FIXTURES = Path(__file__).parent / "fixtures"
LLADA2, LLADA_MOE = FIXTURES / "llada2-reference", FIXTURES / "llada-moe-reference"
MASK = 250
aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: one thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model(str(LLADA2), dtype="float32").model


def llada2_lm(**model_args) -> LLaDA2SkipLM:
    return LLaDA2SkipLM.create_from_arg_obj({"pretrained": str(LLADA2), "device": "cpu", "dtype": "float32", **model_args})


def ll_requests(pairs: list[tuple[list[int], list[int]]], task: str = "ll") -> list[Instance]:
    """One request per document with idx 0, as a loglikelihood task sends them (is_greedy computed)."""
    return [Instance("loglikelihood", {}, (words(p), " " + words(a)), 0, (task, i, 1)) for i, (p, a) in enumerate(pairs)]


# ---- the reference, by enumeration -----------------------------------------------------------
def blocks_by_column(prompt_len: int, answer_len: int, block_length: int) -> list[list[int]]:
    """The answer's indices grouped by the block (column // block_length) their column falls in."""
    groups = itertools.groupby(range(answer_len), key=lambda j: (prompt_len + j) // block_length)
    return [list(indices) for _, indices in groups]


@torch.no_grad()
def block_scores(model, prefix: list[int], piece: list[int], block_length: int) -> list[torch.Tensor]:
    """Per l = 1..T: the sample score (T / l) * sum of CE over the masked positions for every subset
    of l positions of ``piece`` masked, ``prefix`` clean before it and nothing after it."""
    T, per_l = len(piece), []
    for l in range(1, T + 1):
        subsets = list(itertools.combinations(range(T), l))
        rows = torch.tensor([prefix + [MASK if i in s else t for i, t in enumerate(piece)] for s in subsets])
        logp = model(rows, block_length=block_length)[0].double().log_softmax(-1)[:, len(prefix):]
        per_l.append(torch.stack([T / l * -sum(logp[r, i, piece[i]] for i in s) for r, s in enumerate(subsets)]))
    return per_l


def exact_bound(model, prompt: list[int], answer: list[int], block_length: int) -> tuple[float, list[tuple[int, float]]]:
    """The block-wise bound on log p(answer | prompt), exactly, and per block (T_b, variance of one
    sample: l uniform on 1..T_b, the subset uniform given l)."""
    total, blocks = 0.0, []
    for piece in blocks_by_column(len(prompt), len(answer), block_length):
        per_l = block_scores(model, prompt + answer[: piece[0]], [answer[j] for j in piece], block_length)
        mean = sum(s.mean() for s in per_l) / len(per_l)
        second = sum((s * s).mean() for s in per_l) / len(per_l)
        total -= float(mean)
        blocks.append((len(piece), float(second - mean * mean)))
    return total, blocks


@torch.no_grad()
def greedy_fill(model, prefix: list[int], length: int, block_length: int) -> list[int]:
    """``length`` masks after ``prefix``, unmasked one most confident position at a time."""
    ids = torch.tensor([prefix + [MASK] * length])
    for _ in range(length):
        probs = model(ids, block_length=block_length)[0][0].softmax(-1).max(-1)
        position = torch.where(ids[0] == MASK, probs.values, -1.0).argmax()
        ids[0, position] = probs.indices[position]
    return ids[0, len(prefix):].tolist()


def blockwise_greedy(model, prompt: list[int], answer: list[int], block_length: int) -> bool:
    """Whether every block of the answer, given the prompt and the answer's earlier blocks, is what
    one-at-a-time unmasking of that block gives (block diffusion, one token per step)."""
    return all(greedy_fill(model, prompt + answer[: piece[0]], len(piece), block_length) == [answer[j] for j in piece]
               for piece in blocks_by_column(len(prompt), len(answer), block_length))


# ---- the block split -----------------------------------------------------------------------------
def test_answer_blocks_cut_where_the_columns_change_block():
    assert answer_blocks(3, 6, 4) == [(0, 1), (1, 5), (5, 6)]  # columns 3 | 4..7 | 8
    assert answer_blocks(4, 5, 4) == [(0, 4), (4, 5)]  # a prompt of whole blocks: the answer starts one
    assert answer_blocks(0, 4, 4) == [(0, 4)]
    assert answer_blocks(2, 2, 4) == [(0, 2)]
    assert answer_blocks(3, 3, 1) == [(0, 1), (1, 2), (2, 3)]
    for prompt_len, answer_len, block_length in itertools.product(range(10), range(1, 10), range(1, 6)):
        groups = blocks_by_column(prompt_len, answer_len, block_length)
        assert answer_blocks(prompt_len, answer_len, block_length) == [(g[0], g[-1] + 1) for g in groups]


def test_a_long_context_is_cut_by_whole_blocks(model):
    lm = llada2_lm(block_length=4, max_length=8, mc_num=4, mc_batch=4)
    assert lm._aligned_context(list(range(1, 8)), [9, 10]) == [5, 6, 7]  # 1 too many: one block of 4 goes
    assert lm._aligned_context(list(range(1, 10)), [9, 10, 11]) == [5, 6, 7, 8, 9]
    assert lm._aligned_context(list(range(1, 9)), [9]) == [5, 6, 7, 8]
    assert lm._aligned_context([1, 2, 3], [9, 10, 11, 12, 13]) == [1, 2, 3]  # fits
    with pytest.raises(ValueError, match=r"a continuation of 7 tokens after a context of 2 does not fit max_length=8 "
                                         r"with the context cut by whole blocks of block_length=4.*raise max_length"):
        lm._aligned_context([1, 2], [9, 10, 11, 12, 13, 14, 15])
    # scored as the answer after what is left, at the columns of its blocks: one token per block, exact
    context, answer = list(range(1, 8)), [120, 81]
    [(score, _)] = lm.loglikelihood(ll_requests([(context, answer)]), disable_tqdm=True)
    assert score == pytest.approx(exact_bound(model, [5, 6, 7], answer, 4)[0], abs=1e-5)


# ---- the likelihood ------------------------------------------------------------------------------
PAIRS = [([5, 6], [120, 120, 120, 81, 208, 208, 214]),  # blocks of 2, 4 and 1 answer tokens
         ([9, 3, 7, 1, 2], [81, 120, 120, 120, 173, 123, 173])]  # blocks of 3 and 4


def test_loglikelihood_is_the_blockwise_bound_within_its_standard_error(model):
    """mc_num 1024 per block: the estimate (one fixed draw, mc_seed's) within 4 standard errors of
    the enumerated bound, the error from the one-sample variance (stratifying l removes at most its
    between-l part)."""
    lm = llada2_lm(block_length=4, mc_num=1024, batch_size=4)
    scores = [s for s, _ in lm.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)]
    for (prompt, answer), score in zip(PAIRS, scores):
        exact, blocks = exact_bound(model, prompt, answer, 4)
        assert len(blocks) > 1 and all(T > 1 for T, _ in blocks[:2])
        error = sum(var / (1024 if T > 1 else 1) for T, var in blocks) ** 0.5
        assert abs(score - exact) < 4 * error, (score, exact, error)
        assert 4 * error < 0.1 * abs(exact)  # a test that could fail: the error is small against the value


@pytest.mark.parametrize("block_length, pairs", [
    (1, PAIRS),  # every token its own block: each term is one token's CE given the tokens before it
    (4, [([5, 6, 7], [120, 81]), ([9, 3, 7, 1, 2, 4, 4], [81, 120, 120])]),  # columns 3 | 4; 7 | 8..9 (not one per block)
])
def test_one_token_per_block_is_exact_with_one_sample(model, block_length, pairs):
    lm = llada2_lm(block_length=block_length, mc_num=128, batch_size=1)  # one block per batch: rows countable
    scores = [s for s, _ in lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)]
    single = [all(T == 1 for T, _ in exact_bound(model, p, a, block_length)[1]) for p, a in pairs]
    for (prompt, answer), score, exact_case in zip(pairs, scores, single):
        if exact_case:
            assert score == pytest.approx(exact_bound(model, prompt, answer, block_length)[0], abs=1e-5)
    assert single[0]
    counted = lm.get_model_info()["dlmskip"]["flops"]["ll"]["forwards"]  # rows: 1 per one-token block, else mc_num
    blocks = [T for p, a in pairs for T, _ in exact_bound(model, p, a, block_length)[1]]
    greedy_rows = sum(len(a) for _, a in pairs)  # one forward per answer token (is_greedy)
    assert counted == sum(1 if T == 1 else 128 for T in blocks) + greedy_rows


def test_is_greedy_holds_when_every_block_is_its_greedy_decoding(model):
    """A loglikelihood request's is_greedy: each block, given the clean blocks before it, is what
    unmasking its most confident position one at a time gives (block diffusion, one token per step).
    The answer greedy over all its blocks masked at once is not that answer here."""
    prompt = [100, 7, 9]  # answer columns 3 | 4..7 | 8..9
    greedy = []
    for piece in blocks_by_column(3, 7, 4):
        greedy += greedy_fill(model, prompt + greedy, len(piece), 4)
    at_once = greedy_fill(model, prompt, 7, 4)
    assert at_once != greedy and max(greedy + at_once) < 248  # words of the tokenizer
    middle = greedy[:2] + [(greedy[2] + 1) % 240] + greedy[3:5]  # the middle block not greedy, the last block
    middle += greedy_fill(model, prompt + middle, 2, 4)  # greedy after it
    answers = [greedy, at_once, greedy[:-1] + [(greedy[-1] + 1) % 240], [(greedy[0] + 1) % 240] + greedy[1:], middle]
    expected = [blockwise_greedy(model, prompt, a, 4) for a in answers]
    assert expected == [True, False, False, False, False]
    lm = llada2_lm(block_length=4, mc_num=4, mc_batch=4, batch_size=2)
    assert [g for _, g in lm.loglikelihood(ll_requests([(prompt, a) for a in answers]), disable_tqdm=True)] == expected


# ---- the family refusals ---------------------------------------------------------------------------
def unreadable_copy(source: Path, target: Path) -> Path:
    """The checkpoint with every weight file replaced by bytes that are no safetensors."""
    shutil.copytree(source, target)
    for file in target.glob("*.safetensors"):
        file.write_bytes(b"never read")
    return target


def test_each_family_refuses_the_others_checkpoint_before_reading_weights(tmp_path):
    with pytest.raises(ValueError, match=r"expected LLaDA, found LLaDA2 \(model_type=llada2_moe\): use --model llada2_skip"):
        LLaDASkipLM(pretrained=str(unreadable_copy(LLADA2, tmp_path / "llada2")), device="cpu")
    with pytest.raises(ValueError, match=r"expected LLaDA2, found LLaDA \(model_type=lladamoe\): use --model llada_skip"):
        LLaDA2SkipLM(pretrained=str(unreadable_copy(LLADA_MOE, tmp_path / "moe")), device="cpu")
    assert LLaDASkipLM(pretrained=str(LLADA_MOE), device="cpu").cfg.layout == "lladamoe"  # LLaDA-MoE is llada_skip's


# ---- FLOPs with active parameters, against what ran ------------------------------------------------
class ExpertsRan(Ran):
    """``Ran`` that also keeps the grouped products (the routed experts) apart, and the experts the
    router chose for every token (``route`` wrapped)."""

    def reset(self) -> None:
        super().reset()
        self.grouped = 0
        self.chosen = 0  # (token, expert) pairs the routers chose

    def _leave(self, module, args, output) -> None:
        if self._mode is not None:
            self.grouped += self._mode.get_flop_counts()["Global"].get(aten._grouped_mm, 0)
        super()._leave(module, args, output)

    def route(self, original):
        def recorded(*args):
            chosen, weights = original(*args)
            if self.active:
                self.chosen += chosen.numel()
            return chosen, weights
        return recorded


GEN = {"until": [], "max_gen_toks": 8, "steps": 4, "block_length": 4, "threshold": 0.5}
PROMPTS = ("t5 t6 t7", "t20 t21 t22")  # equal lengths: no padding, which the products would compute
MOE_FLOPS = {  # request type, model_args (LLaDA-MoE through llada_skip where named)
    "generate, exact cache, static [0, 2]": ("gen", {"cache": "blocks", "skip_layers": [0, 2]}),
    "generate, exact cache, random 2": ("gen", {"cache": "blocks", "skip_random": 2}),
    "generate, exact cache, routed": ("gen", {"cache": "blocks", "router": "router"}),
    "generate, uncached, static [3]": ("gen", {"cache": "none", "skip_layers": [3]}),
    "loglikelihood, static [1]": ("ll", {"skip_layers": [1], "block_length": 4}),
    "LLaDA-MoE: generate, dual cache, its dense layer skipped": ("gen", {"cache": "dual", "skip_layers": [1]}),
    "LLaDA-MoE: loglikelihood, random 1": ("ll", {"skip_random": 1}),
}


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Path:
    """Routers that run some blocks for some rows on the tiny LLaDA2 (an execute bias of 6)."""
    return save_router(tmp_path_factory.mktemp("router") / "llada2", LLADA2, init_bias=6.0)


@pytest.mark.parametrize("mode", list(MOE_FLOPS))
def test_flops_count_the_experts_each_token_used(mode, router, monkeypatch):
    """The FLOPs in the results against FlopCounterMode over the forwards that ran (the dense first
    layer's SwiGLU, the shared expert and the expert router are matrix products it counts; the
    routed experts run as grouped products it has no entry for, counted from the weight shapes
    2 x rows x in x out) and the same forwards replayed without skipping. Each token's rows through
    the grouped products are the experts its router chose: 6 d h FLOPs per (token, expert)."""
    kind, args = MOE_FLOPS[mode]
    args = {k: (str(router) if v == "router" else v) for k, v in args.items()}
    args.update(batch_size=2 if kind == "gen" else 1, mc_num=4, mc_batch=2)
    if mode.startswith("LLaDA-MoE"):  # softmax routing, its second layer dense, a shared expert twice as wide
        lm = LLaDASkipLM.create_from_arg_obj({"pretrained": str(LLADA_MOE), "device": "cpu", "dtype": "float32", **args})
    else:
        lm = llada2_lm(**args)
    ran = ExpertsRan(lm.model, lm.model.wte, lm.model.blocks)
    monkeypatch.setattr(moe, "route", ran.route(moe.route))
    if kind == "gen":
        lm.generate_until([Instance("generate_until", {}, (p, GEN), 0, ("t", i, 1)) for i, p in enumerate(PROMPTS)],
                          disable_tqdm=True)
    else:
        lm.loglikelihood([Instance("loglikelihood", {}, (p, " t9 t10 t11"), 0, ("t", i, 1)) for i, p in enumerate(PROMPTS)],
                         disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["t"]
    d, h = 64, 8  # the fixture's d_model and expert width
    assert ran.chosen > 0 and ran.grouped == ran.chosen * 6 * d * h
    check_replayed(summary, ran, d, 4)
    if kind == "gen":
        assert summary["nfe_per_request"] == ran.calls  # both requests share every forward


def test_the_plain_decoding_baseline_by_hand():
    """'vs plain decoding' divides by LLaDA2's own uncached decoding without skipping: from the
    prompt's last block on, every block takes all its steps, each a forward over the prefix up to
    the block's end, the head over the block. Prompts of 3 tokens, 8 answer tokens in blocks of 4,
    4 steps: blocks 0, 1, 2, forwards over 4, 8 and 12 tokens. Per token: embedding 4 d; per block
    2 d (2 q + 2 kv) and 4 n q (attention over n keys); the dense layer 6 d 64, an MoE layer 2 d 16
    (router) + 6 d 8 (4 experts + the shared one); head 2 d V per position."""
    d, q, kv, V = 64, 64, 32, 256
    mlp = 6 * d * 64 + 3 * (2 * d * 16 + 6 * d * 8 * 5)

    def forward(n: int) -> int:
        return 4 * d * n + 4 * (n * 2 * d * (2 * q + 2 * kv) + 4 * n * n * q) + n * mlp + 2 * d * V * 4

    plain = 4 * (forward(4) + forward(8) + forward(12))
    lm = llada2_lm(batch_size=2, skip_layers=[2])
    lm.generate_until([Instance("generate_until", {}, (p, GEN), 0, ("t", i, 1)) for i, p in enumerate(PROMPTS)],
                      disable_tqdm=True)
    summary = lm.get_model_info()["dlmskip"]["flops"]["t"]
    assert summary["normalized_flops_vs_plain_decoding"] == pytest.approx(summary["tflops"] * 1e12 / (2 * plain), rel=1e-12)


def test_flops_model_counts_a_moe_block_by_its_active_parameters():
    """FlopsModel.of at LLaDA2-mini's published shape (20 layers, d 2048, 16/4 heads of 128, dense
    first layer of 5120, 256 experts of 512, top 8, one shared expert), by hand per token: a dense
    block 6 d 5120 for its MLP, an MoE block 2 d 256 for the router and 6 d 512 for each of its
    8 routed experts and the shared one; attention's projections 2 d (2 q + 2 kv) either way."""
    from lm_eval_dlmskip.models.config import LLaDAConfig
    from lm_eval_dlmskip.skipping.flops import FlopsModel
    from lm_eval_dlmskip.skipping.policies import SkipTrace

    raw = json.loads((LLADA2 / "config.json").read_text())
    raw.update(hidden_size=2048, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
               intermediate_size=5120, num_experts=256, moe_intermediate_size=512, num_experts_per_tok=8, n_group=8,
               topk_group=4, vocab_size=157184)
    flops = FlopsModel.of(LLaDAConfig.from_dict(raw))
    d, q, kv, n = 2048, 16 * 128, 4 * 128, 100
    dense, routed = 6 * d * 5120, 2 * d * 256 + 6 * d * 512 * (8 + 1)
    attention = n * 2 * d * (2 * q + 2 * kv) + 4 * n * n * q
    one = torch.ones(1, dtype=torch.long)
    executed = torch.tensor([[True] + [True, False] * 9 + [True]])  # 11 blocks: the dense one and 10 MoE
    spent, full = flops.forward(SkipTrace(executed, n * one, 0 * one, 0 * one))
    assert spent.item() == 4 * d * n + 11 * attention + n * (dense + 10 * routed)
    assert full.item() == 4 * d * n + 20 * attention + n * (dense + 19 * routed)


# ---- the real CLI, then every skip method in process ---------------------------------------------------
@pytest.fixture(scope="module")
def llada2_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llada2_tasks")
    mc = [{"prompt": words(p), "choices": [" t9 t10", " t30 t31 t32"], "label": i % 2}
          for i, p in enumerate(([5, 6, 7], [20, 21, 22]))]
    write_task(root, "l2_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    gen = [{"prompt": words(p), "answer": "t1"} for p in ([5, 6, 7], [40, 41], [100, 7, 9, 12, 13])]
    write_task(root, "l2_gen", gen, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
               "generation_kwargs:\n  until: [t247]\n  max_gen_toks: 8\n  steps: 4\n  block_length: 4\n"
               "metric_list:\n  - metric: exact_match\n")
    return root


def test_lm_eval_cli_runs_llada2_skip_with_static_skipping(tmp_path, llada2_tasks):
    out = tmp_path / "results"
    done = lm_eval(
        "--model", "llada2_skip", "--model_args", f"pretrained={LLADA2},mc_num=4,mc_batch=4,block_length=4,"
        "skip_layers=[1,3],dtype=float32", "--tasks", "l2_mc,l2_gen", "--include_path", str(llada2_tasks),
        "--device", "cpu", "--batch_size", "2", "--output_path", str(out),
    )
    assert "l2_mc" in done.stdout and "l2_gen" in done.stdout
    [results_file] = list(out.rglob("results_*.json"))
    info = json.loads(results_file.read_text())["config"]["dlmskip"]
    assert info["family"] == "llada2" and info["n_layers"] == 4 and info["skip"]["skip_layers"] == [1, 3]
    for task in ("l2_mc", "l2_gen"):
        flops = info["flops"][task]
        assert flops["normalized_flops_papers"] == 0.5 and flops["block_execution_ratio"] == [1, 0, 1, 0]
        assert 0 < flops["tflops"] < flops["tflops_no_skip"]
        assert flops["normalized_flops_whole_model"] == pytest.approx(flops["tflops"] / flops["tflops_no_skip"])
    # per document: " t9 t10" is two one-token blocks (columns 3 | 4: a row each), " t30 t31 t32" one token
    # (column 3) and a block of two (4..5: mc_num rows); multiple choice, so no greedy check
    assert info["flops"]["l2_mc"]["forwards"] == 2 * (2 + 1 + 4)
    gen = info["flops"]["l2_gen"]
    assert gen["nfe_per_request"] >= 2 and 0 < gen["normalized_flops_vs_plain_decoding"] < 1
    assert "llada2_skip [l2_gen] decodes with" in done.stderr and "steps=4 (task)" in done.stderr


def test_profile_random_and_routed_skipping_through_the_harness(tmp_path, router):
    """A skip profile from ``dlmskip calibrate`` on the MoE model, random-k and a router, each through
    LLaDA2SkipLM: the blocks skipped per forward are the profile's, exactly k, or the router's
    (counted by hooks on the blocks)."""
    from lm_eval_dlmskip.cli import main

    data = tmp_path / "prompts.txt"
    data.write_text("t5 t6 t7\nt40 t41\nt100 t7 t9 t12 t13\n")
    profile = tmp_path / "profile.json"
    assert main(["calibrate", "--model", str(LLADA2), "--data", str(data), "--output", str(profile), "--threshold", "-1",
                 "--max-skip", "2", "--block-length", "4", "--dtype", "float32"]) == 0
    chosen = json.loads(profile.read_text())["skip_layers"]
    assert len(chosen) == 2
    gen = [Instance("generate_until", {}, (p, GEN), 0, ("gen", i, 1)) for i, p in enumerate(PROMPTS)]
    ll = [Instance("loglikelihood", {}, (p, " t9 t10 t11"), 0, ("ll", i, 1)) for i, p in enumerate(PROMPTS)]
    for args in ({"skip_profile": str(profile)}, {"skip_random": 3}, {"router": str(router)}):
        lm = llada2_lm(block_length=4, mc_num=4, mc_batch=2, batch_size=2, **args)
        ran = Ran(lm.model, lm.model.wte, lm.model.blocks)
        lm.generate_until(gen, disable_tqdm=True)
        lm.loglikelihood(ll, disable_tqdm=True)
        info = lm.get_model_info()["dlmskip"]
        rows = sum(info["flops"][t]["forwards"] for t in ("gen", "ll"))
        executed = [sum(info["flops"][t]["block_execution_ratio"][b] * info["flops"][t]["forwards"] for t in ("gen", "ll"))
                    for b in range(4)]
        assert executed == pytest.approx(ran.block_rows, abs=1e-9) and rows == ran.rows
        if "skip_profile" in args:
            assert info["skip"]["method"] == "static" and info["skip"]["skip_layers"] == sorted(chosen)
            assert ran.block_rows == [0 if b in chosen else rows for b in range(4)]
        elif "skip_random" in args:
            assert info["skip"]["method"] == "random" and sum(ran.block_rows) == rows  # 4 - 3 blocks per row
        else:
            assert info["skip"]["method"] == "routed" and 0 < sum(ran.block_rows) < 4 * rows

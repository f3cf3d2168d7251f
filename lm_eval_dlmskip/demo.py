"""``dlmskip demo``: a tiny LLaDA, its tokenizer and two lm-eval tasks, all offline, then two runs;
with ``--family dream`` or ``llama`` a tiny Dream (``dream_skip``) or Llama (``hf_skip``) instead.

The checkpoint is written exactly as upstream lays one out (``config.json`` with upstream field
names, sharded safetensors with ``model.safetensors.index.json``, keys ``model.transformer.*``, a
``tokenizer.json``), so the demo exercises the real loading path. The model is trained for a few
seconds with LLaDA's masked-diffusion objective on a toy language (reverse a list of words), so
that accuracy, and what skipping costs, mean something.

Tasks: ``demo_reverse_mc`` (pick the reversed list: loglikelihood, like PIQA) and
``demo_reverse_gen`` (write it: generate_until, like GSM8K).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from .common.threads import use_threads
from .models.config import LLaDAConfig
from .models.layouts import dream_name
from .models.llada import LLaDA

WORDS = [f"w{i}" for i in range(24)]
SPECIALS = ["<|mdm_mask|>", "<|endoftext|>", "<|startoftext|>", "<|eot_id|>"]
PUNCT = ["reverse", ":", "."]
LIST_LENGTH = 4  # every list has 4 words, so an answer is always 5 tokens (4 words and ".")
ANSWER_TOKENS = LIST_LENGTH + 1
DEMO_CONFIG = {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "weight_tying": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "attention_layer_norm": False,
    "block_group_size": 1,
    "d_model": 64,
    "n_layers": 8,
    "n_heads": 4,
    "n_kv_heads": 4,
    "mlp_hidden_size": 192,
    "max_sequence_length": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}


def vocabulary() -> list[str]:
    return WORDS + PUNCT + SPECIALS


def write_tokenizer(out: Path, vocab: list[str], max_length: int) -> None:
    """A word-level tokenizer that AutoTokenizer loads: words split on spaces, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|eot_id|>"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


def write_checkpoint(out: Path, raw_config: dict, model: LLaDA, shards: int = 2,
                     name: Callable[[str], str] = "model.transformer.{}".format) -> None:
    """Save in the upstream layout: config.json, model-0000i-of-0000n.safetensors and an index;
    ``name`` spells our parameter names as the checkpoint does (LLaDA's by default)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    state = {name(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def reverse_example(rng: random.Random) -> tuple[str, str]:
    """('w3 w7 w1 w5 reverse :', ' w5 w1 w7 w3 .')"""
    items = [rng.choice(WORDS) for _ in range(LIST_LENGTH)]
    return " ".join(items) + " reverse :", " " + " ".join(reversed(items)) + " ."


def train_demo_model(cfg: LLaDAConfig, vocab: list[str], steps: int, seed: int = 0, bar: tqdm | None = None) -> LLaDA:
    """LLaDA's SFT objective on the toy language: mask a random share of the answer, CE / p_mask.
    ``bar`` shows the step and the loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    index = {w: i for i, w in enumerate(vocab)}
    model = LLaDA(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    pad, mask = index["<|endoftext|>"], cfg.mask_token_id
    for step in range(steps):
        rows, prompt_lens = [], []
        for _ in range(64):
            prompt, answer = reverse_example(rng)
            p, a = [index[w] for w in prompt.split()], [index[w] for w in answer.split()]
            rows.append(p + a)
            prompt_lens.append(len(p))
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
        position = torch.arange(L)[None, :]
        answer = (position >= torch.tensor(prompt_lens)[:, None]) & (position < torch.tensor([len(r) for r in rows])[:, None])
        p_mask = torch.rand(len(rows), 1).clamp(min=0.05)
        masked = answer & (torch.rand(ids.shape) < p_mask)
        logits, _ = model(torch.where(masked, mask, ids))
        loss = (F.cross_entropy(logits[masked], ids[masked], reduction="none") / p_mask.expand_as(ids)[masked]).sum() / answer.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        show_step(bar, step, steps, loss)
    return model.eval()


def show_step(bar: tqdm | None, step: int, steps: int, loss: Tensor) -> None:
    """The training step and loss on the demo's bar (the last step always shown; the others at most
    10 times a second)."""
    if bar is not None:
        bar.set_postfix_str(f"step {step + 1}/{steps}, loss {loss.item():.3f}", refresh=step + 1 == steps)
        bar.update(0)


# Declared, not left to lm-eval's defaults: it warns about every metric whose task leaves them out.
METRIC_KEYS = "    aggregation: mean\n    higher_is_better: true\n"


def write_tasks(out: Path, n_docs: int = 40, n_train: int = 200, seed: int = 1) -> Path:
    """Two lm-eval tasks over local JSONL files (no dataset hub), with a training split for routers."""
    rng = random.Random(seed)
    tasks = out.resolve() / "tasks"  # absolute data paths: lm_eval --include_path works from any folder
    tasks.mkdir(parents=True, exist_ok=True)
    splits = {"test": tasks / "reverse.jsonl", "train": tasks / "reverse_train.jsonl"}
    for split, count in (("test", n_docs), ("train", n_train)):
        splits[split].write_text("".join(json.dumps(d) + "\n" for d in _reverse_docs(rng, count)))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {splits['test']}\n    train: {splits['train']}\n"
        "test_split: test\ntraining_split: train\ndoc_to_text: \"{{prompt}}\"\n"
    )
    (tasks / "demo_reverse_mc.yaml").write_text(
        "task: demo_reverse_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n" + METRIC_KEYS
    )
    (tasks / "demo_reverse_gen.yaml").write_text(
        "task: demo_reverse_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        # only keys every family understands (llada_skip, dream_skip, hf_skip): a diffusion model then
        # decodes the 5 tokens with 5 steps in one block (steps and block_length default to gen_length)
        f"generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: {ANSWER_TOKENS}\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n        regex_pattern: \"^\\\\s*(.*?)\\\\s*$\"\n"
        "      - function: take_first\nmetric_list:\n  - metric: exact_match\n" + METRIC_KEYS + "    ignore_punctuation: true\n"
    )
    return tasks


def _reverse_docs(rng: random.Random, count: int) -> list[dict]:
    docs = []
    for _ in range(count):
        prompt, answer = reverse_example(rng)
        items = prompt.split()[:-2]
        wrong = [" " + " ".join(items) + " .", " " + " ".join(rng.sample(items, len(items))) + " .", " " + " ".join(rng.choice(WORDS) for _ in items) + " ."]
        choices = [answer] + [w for w in wrong if w != answer][:2]
        while len(choices) < 3:
            choices.append(" " + " ".join(rng.choice(WORDS) for _ in items) + " .")
        order = list(range(3))
        rng.shuffle(order)
        docs.append({"prompt": prompt, "answer": answer.strip(" ."), "choices": [choices[i] for i in order], "label": order.index(0)})
    return docs


def build_demo(out: str | Path, train_steps: int = 400, family: str = "llada", bar: tqdm | None = None) -> Path:
    """The checkpoint directory of ``family`` (reused if it exists) and the tasks; ``bar`` counts three stages."""
    out = Path(out)
    bar = bar or tqdm(disable=True)
    checkpoint = out / f"{family}-demo"
    if not (checkpoint / "config.json").exists():  # a checkpoint folder appears whole (os.replace)
        train, save = FAMILIES[family]
        with stage(bar, "training the model"):
            model = train(train_steps, bar)
        with stage(bar, "writing the checkpoint"):
            tmp = out / f"{family}-demo.tmp"
            save(tmp, model)
            os.replace(tmp, checkpoint)
    else:  # trained before: no training, no writing
        bar.set_description_str(f"dlmskip demo: reusing the checkpoint in {checkpoint}")
        bar.update(2)
    with stage(bar, "writing the tasks"):
        write_tasks(out)
    return checkpoint


@contextmanager
def stage(bar: tqdm, name: str) -> Iterator[None]:
    """One stage of the demo's progress bar: its name while it runs, one unit more when it ends."""
    bar.set_description_str(f"dlmskip demo: {name}", refresh=False)
    bar.set_postfix_str("")  # and show the stage's name
    yield
    bar.update(1)


def llada_config() -> dict:
    """The LLaDA demo's config.json (upstream field names)."""
    vocab = vocabulary()
    return {**DEMO_CONFIG, "vocab_size": len(vocab), "embedding_size": len(vocab),
            "mask_token_id": vocab.index("<|mdm_mask|>"), "eos_token_id": vocab.index("<|endoftext|>"),
            "pad_token_id": vocab.index("<|endoftext|>")}


def train_llada(train_steps: int, bar: tqdm | None = None) -> LLaDA:
    return train_demo_model(LLaDAConfig.from_dict(llada_config()), vocabulary(), train_steps, bar=bar)


def save_llada(out: Path, model: LLaDA) -> None:
    raw = llada_config()
    write_checkpoint(out, raw, model)
    write_tokenizer(out, vocabulary(), raw["max_sequence_length"])


def parse_skip_layers(value: str, n_layers: int = DEMO_CONFIG["n_layers"]) -> list[int]:
    """``4,6``, ``[4,6]`` or ``4 6`` -> [4, 6]; 0-based blocks of the demo model, checked."""
    items = value.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    try:
        layers = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"--skip-layers {value!r}: write 0-based block numbers, e.g. 1,3 or '[1,3]' or '1 3'") from None
    if not layers:
        raise ValueError(f"--skip-layers {value!r}: name at least one block, e.g. 1,3")
    wrong = [layer for layer in layers if not 0 <= layer < n_layers]
    if wrong:
        raise ValueError(f"--skip-layers: {', '.join(map(str, wrong))} out of range; the demo model's blocks are "
                         f"0-based, 0..{n_layers - 1}")
    if len(set(layers)) < len(layers):
        raise ValueError(f"--skip-layers {value!r}: a block is named twice")
    if len(layers) == n_layers:
        raise ValueError(f"--skip-layers {value!r}: skipping all {n_layers} blocks leaves no model; keep at least one")
    return sorted(layers)


# Each family's lm-eval model, and the model_args of its demo runs (hf_skip has no Monte-Carlo estimate).
DEMO_MODELS = {"llada": ("llada_skip", "mc_num=8,dtype=float32"), "dream": ("dream_skip", "mc_num=8,dtype=float32"),
               "llama": ("hf_skip", "dtype=float32")}


def run_ticking(cmd: list[str], env: dict[str, str], bar: tqdm) -> subprocess.CompletedProcess:
    """``python -m CMD`` with its output kept for later; the bar's clock ticks while it runs."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", *cmd], text=True, stdout=stdout, stderr=stderr, env=env)
        while True:
            try:
                proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                bar.refresh()
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout.read(), stderr.read())


def lm_eval_command(checkpoint: Path, tasks: Path, results: Path, extra: str = "", family: str = "llada") -> list[str]:
    """The lm_eval command line of one demo run (absolute paths: it works from any folder)."""
    model, model_args = DEMO_MODELS[family]
    return [
        "lm_eval", "--model", model,
        "--model_args", f"pretrained={checkpoint.resolve()},{model_args}{extra}",
        "--tasks", "demo_reverse_mc,demo_reverse_gen", "--include_path", str(tasks.resolve()),
        "--device", "cpu", "--batch_size", "8", "--output_path", str(results.resolve()),
    ]


def run_demo(out: str, skip_layers: str, family: str = "llada", threads: int | None = None, train_steps: int = 400) -> int:
    """Build everything, then evaluate the demo model of ``family`` with and without skipping through
    lm_eval, with a progress bar on stderr naming each stage."""
    layers = parse_skip_layers(skip_layers)
    if train_steps < 1:
        raise ValueError(f"--train-steps {train_steps}: give 1 or more (400, the default, trains the demo model well)")
    env = use_threads(threads)
    start = time.time()
    skip = f",skip_layers=[{','.join(map(str, layers))}]"
    prefix = "" if family == "llada" else f"{family}-"
    runs = ((f"{prefix}base", "", "without skipping"), (f"{prefix}skip", skip, f"skipping blocks {','.join(map(str, layers))}"))
    with tqdm(total=3 + len(runs), desc="dlmskip demo", unit="stage", file=sys.stderr, dynamic_ncols=True,
              bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]") as bar:
        checkpoint = build_demo(out, train_steps, family, bar)
        tasks = Path(out) / "tasks"
        bar.write(f"demo checkpoint: {checkpoint.resolve()} ({time.time() - start:.0f}s)\ndemo tasks: {tasks.resolve()}",
                  file=sys.stdout)
        for name, extra, what in runs:
            cmd = lm_eval_command(checkpoint, tasks, Path(out) / "results" / name, extra, family)
            bar.write("$ " + shlex.join(cmd), file=sys.stdout)
            with stage(bar, f"lm_eval {what}"):
                done = run_ticking(cmd, env, bar)
            if done.returncode:
                bar.write(done.stdout + done.stderr, file=sys.stdout)
                return done.returncode
            bar.write(done.stdout, file=sys.stdout)  # lm-eval's results table, then the FLOPs table
    print(f"demo finished in {time.time() - start:.0f}s; everything is under {Path(out).resolve()}:\n"
          f"  checkpoint  {checkpoint.resolve()}\n  tasks       {tasks.resolve()}\n"
          f"  results     {(Path(out) / 'results').resolve()}\nrerun the skipping run from any folder with:\n"
          f"  {shlex.join(lm_eval_command(checkpoint, tasks, Path(out) / 'results' / runs[1][0], skip, family))}")
    return 0


# ------------------------------------------------------------------ the other families (--family)
# Same vocabulary, tokenizer, toy language, size (8 blocks of width 64) and tasks as the LLaDA demo,
# so the three families' accuracies and FLOPs read side by side.

DREAM_CONFIG = {  # Dream's config.json (DreamConfig) field names; the weights under Qwen2's key names
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 192,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "torch_dtype": "float32",
}


def dream_config() -> dict:
    """The Dream demo's config.json (DreamConfig field names)."""
    vocab = vocabulary()
    return {**DREAM_CONFIG, "vocab_size": len(vocab), "mask_token_id": vocab.index("<|mdm_mask|>"),
            "eos_token_id": vocab.index("<|endoftext|>"), "pad_token_id": vocab.index("<|endoftext|>"),
            "bos_token_id": vocab.index("<|startoftext|>")}


def train_dream(train_steps: int, bar: tqdm | None = None) -> LLaDA:
    """A tiny Dream trained with the same masked-diffusion objective as the LLaDA demo (Dream's
    logits are shifted: the model predicts token p from position p-1). Its answers end without an
    EOS, as the demo's generation canvas does (training one after the answer made greedy decoding
    of 5 tokens fail on the fourth word)."""
    return train_demo_model(LLaDAConfig.from_dict(dream_config()), vocabulary(), train_steps, bar=bar)


def save_dream(out: Path, model: LLaDA) -> None:
    """Dream's hub layout: its config.json, the weights under Qwen2's key names."""
    raw = dream_config()
    write_checkpoint(out, raw, model, name=dream_name)
    write_tokenizer(out, vocabulary(), raw["max_position_embeddings"])


def train_llama(train_steps: int, bar: tqdm | None = None, seed: int = 0):
    """A tiny LlamaForCausalLM trained to write the answer after the prompt, token by token, for
    ``hf_skip``. Llama, not Qwen2
    (the same blocks but for Qwen2's q/k/v biases): transformers 5 gives a qwen2 checkpoint its
    byte-level BPE tokenizer class whatever tokenizer.json holds, which would split the demo's words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocabulary()
    index = {w: i for i, w in enumerate(vocab)}
    eos = index["<|endoftext|>"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=192, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         eos_token_id=eos, pad_token_id=eos, bos_token_id=index["<|startoftext|>"],
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(train_steps):
        rows, prompt_lens = [], []
        for _ in range(64):
            prompt, answer = reverse_example(rng)
            rows.append([index[w] for w in (prompt + answer).split()])
            prompt_lens.append(len(prompt.split()))
        ids = torch.tensor(rows)  # every row has the same length (lists of 4 words)
        logits = model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:].clone()
        target[torch.arange(target.shape[1])[None, :] < torch.tensor(prompt_lens)[:, None] - 1] = -100  # answer only
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        show_step(bar, step, train_steps, loss)
    return model.eval()


def save_llama(out: Path, model) -> None:
    """As transformers saves a LlamaForCausalLM (config.json, model.safetensors), and the tokenizer."""
    model.save_pretrained(str(out))
    write_tokenizer(out, vocabulary(), model.config.max_position_embeddings)


# family -> (train(steps, bar) -> model, save(folder, model))
FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "llada": (train_llada, save_llada), "dream": (train_dream, save_dream), "llama": (train_llama, save_llama),
}

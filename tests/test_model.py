"""The native LLaDA is the upstream function: logits and hidden states against the golden fixture,
and every way a checkpoint can be wrong gives an error that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lm_eval_dlmskip.demo import write_checkpoint
from lm_eval_dlmskip.models.config import LLaDAConfig
from lm_eval_dlmskip.models.llada import LLaDA
from lm_eval_dlmskip.models.loading import load_llada, load_tokenizer
from lm_eval_dlmskip.skipping.policies import StaticSkip

TOL = 1e-4


def test_forward_logits_and_hidden_states_match_upstream(ref_model, ref_tensors):
    ids = ref_tensors["forward.input_ids"]
    logits, trace = ref_model(ids)
    assert torch.allclose(logits, ref_tensors["forward.logits"], atol=TOL, rtol=0)
    states = ref_model.hidden_states(ids)
    assert len(states) == ref_model.cfg.n_layers + 1
    for i, state in enumerate(states):
        assert torch.allclose(state, ref_tensors[f"forward.hidden_states.{i}"], atol=TOL, rtol=0), i
    assert trace.executed.all()


def test_padded_rows_match_upstream_at_real_positions(ref_model, ref_tensors):
    mask = ref_tensors["padded.attention_mask"]
    logits, trace = ref_model(ref_tensors["forward.input_ids"], mask)
    real = mask.bool()
    assert torch.allclose(logits[real], ref_tensors["padded.logits"][real], atol=TOL, rtol=0)
    assert trace.seq_lens.tolist() == [9, 12]


def test_skipped_blocks_match_upstream(ref, ref_model, ref_tensors):
    skipped = ref["cases"]["skip"]["skipped_blocks_0based"]
    logits, trace = ref_model(ref_tensors["forward.input_ids"], policy=StaticSkip(skipped))
    assert torch.allclose(logits, ref_tensors["skip.logits"], atol=TOL, rtol=0)
    assert trace.executed[0].tolist() == [i not in skipped for i in range(6)]


def test_skipped_block_passes_hidden_state_through(ref_model, ref_tensors):
    ids = ref_tensors["forward.input_ids"]
    states = ref_model.hidden_states(ids, policy=StaticSkip({2}))
    assert torch.equal(states[3], states[2])  # input of block 3 == input of block 2
    assert not torch.equal(states[2], states[1])


def test_logits_at_positions_equal_full_logits(ref_model, ref_tensors):
    ids = ref_tensors["forward.input_ids"]
    full, _ = ref_model(ids)
    window, trace = ref_model(ids, logits_at=slice(4, 9))
    assert torch.allclose(window, full[:, 4:9], atol=1e-5)
    assert trace.head_positions.tolist() == [5, 5]
    flat = torch.tensor([1, 5, 12 + 3, 12 + 11])
    picked, trace = ref_model(ids, logits_at=flat)
    assert torch.allclose(picked, full.flatten(0, 1)[flat], atol=1e-5)
    assert trace.head_positions.tolist() == [2, 2]


def test_bfloat16_load_is_close(ref_dir, ref_tensors):
    model = load_llada(str(ref_dir), dtype="bfloat16").model
    assert model.dtype == torch.bfloat16
    logits, _ = model(ref_tensors["forward.input_ids"])
    ref = ref_tensors["forward.logits"]
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, ref_dir, ref_model, ref_tensors):
    raw = json.loads((ref_dir / "config.json").read_text())
    write_checkpoint(tmp_path / "sharded", raw, ref_model, shards=3)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) == 3
    reloaded = load_llada(str(tmp_path / "sharded"))
    logits, _ = reloaded.model(ref_tensors["forward.input_ids"])
    assert torch.equal(logits, ref_model(ref_tensors["forward.input_ids"])[0])
    assert reloaded.fingerprint == load_llada(str(ref_dir)).fingerprint


def test_fingerprint_is_independent_of_load_dtype_and_tells_models_apart(tmp_path, ref_dir, ref_model):
    fp32 = load_llada(str(ref_dir), dtype="float32").fingerprint
    assert load_llada(str(ref_dir), dtype="bfloat16").fingerprint == fp32
    other = LLaDA(ref_model.cfg)
    other.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        other.blocks[3].q_proj.weight.mul_(1.5)
    write_checkpoint(tmp_path / "other", json.loads((ref_dir / "config.json").read_text()), other)
    assert load_llada(str(tmp_path / "other")).fingerprint != fp32


def _copy(ref_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ref_dir, target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("block_type", "sequential", "block_type='sequential'"),
        ("alibi", True, "alibi=True"),
        ("activation_type", "gelu", "activation_type='gelu'"),
        ("attention_layer_norm", True, "attention_layer_norm=True"),
        ("block_group_size", 2, "block_group_size=2"),
        ("mask_token_id", None, "mask_token_id"),
    ],
)
def test_unsupported_config_names_the_field(tmp_path, ref_dir, field, value, message):
    ckpt = _copy(ref_dir, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw[field] = value
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_llada(str(ckpt))


def test_missing_files_are_named(tmp_path, ref_dir):
    ckpt = _copy(ref_dir, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_llada(str(ckpt))
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_llada(str(ckpt))
    with pytest.raises(ValueError, match="no such local directory"):
        load_llada(str(tmp_path / "nowhere" / "deeper"))


def test_missing_shard_is_named(tmp_path, ref_dir, ref_model):
    write_checkpoint(tmp_path / "sharded", json.loads((ref_dir / "config.json").read_text()), ref_model, shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_llada(str(tmp_path / "sharded"))


def test_corrupt_and_truncated_weights_are_refused(tmp_path, ref_dir):
    ckpt = _copy(ref_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_llada(str(ckpt))
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_llada(str(ckpt))


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path, ref_dir):
    ckpt = _copy(ref_dir, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["n_layers"] = 7
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"missing: blocks\.6\.q_proj\.weight"):
        load_llada(str(ckpt))
    raw["n_layers"], raw["mlp_hidden_size"] = 6, 128
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"shape: blocks\.0\.ff_proj\.weight is \(160, 64\)"):
        load_llada(str(ckpt))


def test_hub_id_that_cannot_be_fetched_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not reachable on the Hugging Face hub") as err:
        load_llada("GSAI-ML/LLaDA-8B-Base")
    assert "hf download GSAI-ML/LLaDA-8B-Base" in str(err.value) and "huggingface-cli" not in str(err.value)


def test_a_mistyped_local_path_says_it_is_no_local_directory(tmp_path, monkeypatch):
    """``dlmskip-demo/llada-dmo`` looks like a hub id; the message still names the missing folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dlmskip-demo" / "llada-demo").mkdir(parents=True)
    with pytest.raises(ValueError, match="'dlmskip-demo/llada-dmo': not a local directory") as err:
        load_llada("dlmskip-demo/llada-dmo")
    assert "check it for a typo" in str(err.value) and "hf download" in str(err.value)


def test_bad_dtype_is_refused(ref_dir):
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_llada(str(ref_dir), dtype="int8")


def test_tokenizer_adds_no_bos_and_refuses_pad_equal_to_mask(tmp_path, ref_dir):
    tokenizer = load_tokenizer(ref_dir, mask_id=250)
    assert tokenizer.encode("t3 t41 t7", add_special_tokens=False) == [3, 41, 7]
    assert tokenizer.pad_token_id == 251
    ckpt = _copy(ref_dir, tmp_path)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|mdm_mask|>"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pad id 250 equals the mask id 250"):
        load_tokenizer(ckpt, mask_id=250)


def test_config_maps_upstream_fields(ref_dir):
    cfg = LLaDAConfig.from_json(ref_dir / "config.json")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (64, 6, 4, 4)
    assert (cfg.mlp_hidden_size, cfg.vocab_size, cfg.mask_token_id) == (160, 256, 250)
    assert cfg.rope_theta == 500000.0 and cfg.max_sequence_length == 256


def test_grouped_query_attention_equals_repeated_heads():
    """n_kv_heads < n_heads (as upstream's repeat_interleave) gives the same result as full heads."""
    torch.manual_seed(0)
    base = dict(d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=48, vocab_size=40,
                max_sequence_length=32, mask_token_id=39)
    gqa = LLaDA(LLaDAConfig(n_kv_heads=2, **base))
    full = LLaDA(LLaDAConfig(n_kv_heads=4, **base))
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
        full.state_dict()[name].copy_(w)
    ids = torch.randint(0, 39, (2, 9))
    assert torch.allclose(gqa(ids)[0], full(ids)[0], atol=1e-5)


def test_bias_and_tied_embeddings_are_supported():
    cfg = LLaDAConfig.from_dict(dict(d_model=16, n_layers=1, n_heads=2, vocab_size=20, mask_token_id=19,
                                     include_bias=True, bias_for_layer_norm=False, weight_tying=True,
                                     mlp_ratio=2))
    torch.manual_seed(0)
    model = LLaDA(cfg)
    assert model.ff_out is None and model.blocks[0].q_proj.bias is not None
    assert "ff_out.weight" not in model.state_dict()
    ids = torch.tensor([[3, 7, 11, 19]])
    logits, _ = model(ids)
    h, _ = model.trunk(ids)
    assert logits.shape == (1, 4, 20)
    assert torch.allclose(logits, model.ln_f(h) @ model.wte.weight.T, atol=1e-6)  # the head is the embedding


def test_fast_path_is_taken_and_equals_the_plain_path(ref_dir, ref_tensors):
    """Loading fuses q/k/v and gate/up into one buffer each; the keys and the function stay the same."""
    fast = load_llada(str(ref_dir)).model
    assert all(block.fused_weights() is not None for block in fast.blocks)
    plain = LLaDA(fast.cfg)
    plain.load_state_dict(fast.state_dict())
    assert all(block.fused_weights() is None for block in plain.blocks)
    assert sorted(plain.state_dict()) == sorted(fast.state_dict())
    ids, mask = ref_tensors["forward.input_ids"], ref_tensors["padded.attention_mask"]
    for kwargs in ({}, {"attention_mask": mask}, {"policy": StaticSkip({1, 3})}):
        assert torch.allclose(fast(ids, **kwargs)[0], plain(ids, **kwargs)[0], atol=1e-5)


def test_fast_path_steps_aside_when_a_projection_changes(ref_dir, ref_tensors):
    fast = load_llada(str(ref_dir)).model
    plain = LLaDA(fast.cfg)
    plain.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for model in (fast, plain):
            model.blocks[2].v_proj.weight = torch.nn.Parameter(model.blocks[2].v_proj.weight * 2)
    assert fast.blocks[2].fused_weights() is None and fast.blocks[1].fused_weights() is not None
    ids = ref_tensors["forward.input_ids"]
    assert torch.allclose(fast(ids)[0], plain(ids)[0], atol=1e-5)
    # Hold the old buffers, so the allocator cannot hand their addresses to the new ones.
    stale = {id(block): list(block._fused.values()) for block in fast.blocks}
    fast.double()  # casting copies every parameter: no block may keep using its stale buffer
    for i, block in enumerate(fast.blocks):  # a fused block is fused again, into a fresh buffer
        fused = block.fused_weights()
        assert (fused is None) == (i == 2)
        old = {t.data_ptr() for t in stale[id(block)]}
        assert fused is None or all(b.dtype == torch.float64 and b.data_ptr() not in old for b in fused.values())
    assert torch.allclose(fast(ids)[0].float(), plain(ids)[0], atol=1e-4)
    assert torch.allclose(fast.fuse_projections()(ids)[0].float(), plain(ids)[0], atol=1e-4)


def test_compiled_blocks_give_the_same_logits(ref_dir, ref_tensors):
    model = load_llada(str(ref_dir)).model
    ids = ref_tensors["forward.input_ids"]
    with torch.no_grad():
        eager = model(ids, policy=StaticSkip({2}))[0]
        compiled = model.compile_blocks()(ids, policy=StaticSkip({2}))[0]
    assert torch.allclose(compiled, eager, atol=1e-4)


def test_a_failed_compilation_falls_back_to_the_eager_function_once(monkeypatch, caplog):
    """compile is the default on a GPU: a compiler error logs one warning and the eager function
    runs from then on (same results); an error of the computation itself is not swallowed."""
    import torch._dynamo.exc

    from lm_eval_dlmskip.models import llada

    calls = []

    def failing_compile(fn):
        def compiled(*args):
            calls.append(1)
            raise torch._dynamo.exc.InternalTorchDynamoError("no compiler here")
        return compiled

    monkeypatch.setattr(llada.torch, "compile", failing_compile)
    double = llada.Compiled(lambda x: 2 * x)
    with caplog.at_level("WARNING", logger=llada.__name__):
        assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert len(calls) == 1 and sum("running it eagerly" in r.getMessage() for r in caplog.records) == 1

    def computation_error(x):
        raise ValueError("a bug in the computation")

    monkeypatch.setattr(llada.torch, "compile", lambda fn: fn)
    with pytest.raises(ValueError, match="a bug in the computation"):
        llada.Compiled(computation_error)(torch.ones(1))

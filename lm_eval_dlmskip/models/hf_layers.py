"""A Hugging Face causal LM as this package sees it: its decoder layers, skipping them, its identity.

``hf_skip`` evaluates transformers' own model, so skipping cannot be an argument of our forward
as in ``llada.py``. Instead each decoder layer is put inside a ``SkippableLayer`` that asks a
``LayerSchedule`` which rows run it: a layer no row runs is not called at all (static skipping
saves its time), and a row that skips keeps its hidden states (h_{l+1} = h_l). The schedule is
fixed for a whole model call (a loglikelihood forward, or every step of one ``generate``), so a
row that skips layer l never reads the keys and values of layer l through an output it keeps.

Nothing here imports lm-eval; ``harness/hf.py`` and ``report/`` build on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..skipping.flops import FlopsModel
from ..skipping.policies import ForwardBatch, SkipPolicy, SkipTrace, row_keys
from .loading import DTYPES, check_dtype

FAMILY = "hf"
# Where transformers keeps the decoder layers, by architecture (the suffix of a ModuleList's name).
LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi, OLMo, ...
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "transformer.blocks",  # MPT
)


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, also inside wrappers such as a PEFT model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(name == p or name.endswith("." + p) for p in LAYER_PATHS):
            return module
    raise ValueError(
        f"hf_skip: cannot find the decoder layers of {type(model).__name__}: looked for a layer list at "
        f"{', '.join(LAYER_PATHS)}. hf_skip supports causal LMs with one of these layouts."
    )


def hf_model_type(config_dir: Path) -> str | None:
    """The config's model_type when transformers has a causal LM for it (an ``hf`` model), else None
    (LLaDA's and Dream's types are not transformers': they load with this package's own code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = config_dir / "config.json"
    if not config_file.exists():
        return None
    model_type = json.loads(config_file.read_text()).get("model_type")
    return model_type if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over a sample of every floating weight, rounded to bfloat16 so that the same checkpoint
    loaded in float32 or bfloat16 has one fingerprint (call it before ``install_skipping``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_floating_point():
            sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 256)].to(torch.bfloat16).float().cpu()
            digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class HFShape:
    """The numbers a skip profile is checked against (``check_identity`` reads n_layers, d_model)."""

    model_type: str
    n_layers: int
    d_model: int
    family: str = FAMILY

    @classmethod
    def of(cls, config) -> "HFShape":
        return cls(config.model_type, config.num_hidden_layers, config.hidden_size)


def model_identity(config, name: str, fingerprint: str) -> dict:
    """What a skip profile records about the HF model it was measured on."""
    return {
        "name": name,
        "family": FAMILY,
        "model_type": config.model_type,
        "fingerprint": fingerprint,
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
    }


def flops_model(model: nn.Module, layers: nn.ModuleList) -> FlopsModel:
    """flops.py's FLOPs model for this architecture. The per-token cost of a layer's matrix products
    is 2 x its matrix weights, whatever its MLP (gated or not): the MLP width is set so that
    flops.py's SwiGLU term 6 d d_ff equals twice the layer's weights outside q, k, v and o."""
    config = model.config
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    layer_weights = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    mlp_hidden = (layer_weights - d * (2 * d + 2 * kv_dim)) / (3 * d)
    vocab = model.get_output_embeddings().weight.shape[0]
    return FlopsModel(d, len(layers), kv_dim, mlp_hidden, vocab)


class LayerSchedule:
    """Which rows run each decoder layer during the current model call.

    ``begin(ids, real)`` asks the policy once per layer for the request tokens of the call (random
    draws key on them, so a request's set does not depend on its batch) and keeps the answers
    for every forward of the call: one ``generate`` reuses the prompt's draw at every step.
    """

    def __init__(self, policy: SkipPolicy, n_layers: int) -> None:
        self.policy = policy
        self.n_layers = n_layers
        self.executed: Tensor | None = None  # [B, n_layers] bool of the current call
        self.computed: Tensor | None = None  # [B, n_layers] bool: layers run per row (None: as executed)
        self._decisions: list[bool | Tensor] = []

    def begin(self, ids: Tensor, real: Tensor) -> None:
        """Decide for a call over ``ids`` [B, L], of which ``real`` [B, L] marks the request tokens."""
        batch = ForwardBatch(ids, real, torch.zeros_like(real, dtype=torch.bool), row_keys(ids, real),
                             torch.zeros(ids.shape[0], device=ids.device))
        # h: static and random policies never read the hidden states, and the call has none yet
        decisions = [self.policy.rows_to_run(layer, None, batch) for layer in range(self.n_layers)]
        self.executed = SkipTrace.from_decisions(decisions, len(ids), ids.device)
        self.computed = None
        if all(isinstance(d, bool) for d in decisions):
            self._decisions = decisions
            return
        # a layer that any row runs is computed for every row (SkippableLayer keeps the others' input)
        self.computed = self.executed.any(0, keepdim=True).expand_as(self.executed)
        # sync: once per call, so that a layer no row runs is not called at all
        run_all, run_any = self.executed.all(0).tolist(), self.executed.any(0).tolist()
        self._decisions = [True if a else False if not n else self.executed[:, layer]
                           for layer, (a, n) in enumerate(zip(run_all, run_any))]

    def rows(self, layer: int) -> bool | Tensor:
        """True (every row runs ``layer``), False (none does) or a [B] bool tensor."""
        assert self._decisions, "LayerSchedule.begin() must be called before the model runs"
        return self._decisions[layer]


class SkippableLayer(nn.Module):
    """A decoder layer that runs only for the rows its schedule names; the others pass through."""

    def __init__(self, layer: nn.Module, index: int, schedule: LayerSchedule) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.cache_index = next((m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)), index)
        self.schedule = schedule

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        rows = self.schedule.rows(self.index)
        if rows is False:
            self._keep_cache_length(hidden_states, args, kwargs)
            return hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"hf_skip: {type(self.layer).__name__} returned {type(out).__name__}, not the hidden states tensor that "
                "transformers 5's decoder layers return; this architecture cannot be skipped"
            )
        if rows is True:
            return out
        if len(rows) != len(hidden_states):
            raise ValueError("hf_skip: random skipping needs one sequence per request (no beams or multiple samples)")
        # rows that skip discard what the layer computed for them, also the keys and values it
        # cached: only their own (discarded) outputs at this layer ever attend to those
        return torch.where(rows[:, None, None], out, hidden_states)

    def _keep_cache_length(self, hidden_states: Tensor, args, kwargs) -> None:
        """A skipped layer still adds its positions to the KV cache (one number per position, no
        keys): transformers reads the cache length from one layer (``get_seq_length()`` reads layer
        0, masks the first full-attention layer), which must count every token seen."""
        from transformers.cache_utils import Cache, EncoderDecoderCache

        cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if cache is not None:
            B, n = hidden_states.shape[:2]
            stub = hidden_states.new_zeros(B, 1, n, 1)
            cache.update(stub, stub, self.cache_index)


def install_skipping(model: nn.Module, schedule: LayerSchedule) -> nn.ModuleList:
    """Put every decoder layer of ``model`` inside a ``SkippableLayer`` asking ``schedule``."""
    layers = find_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = SkippableLayer(layer, i, schedule)
    return layers


def load_hf(path: Path, dtype: str, device: str):
    """An HF causal LM and its tokenizer from a checkpoint directory, for ``calibrate``/``analyze``
    (safetensors only, no code from the checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_dtype(dtype)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def hidden_states(model: nn.Module, sequences: list[list[int]], pad_id: int) -> tuple[list[Tensor], Tensor]:
    """The hidden states entering every layer (0 = embeddings, last = after the final norm), as
    transformers' ``output_hidden_states`` gives them, for right-padded ``sequences``; and the
    [B, L] bool of real tokens."""
    device = next(model.parameters()).device
    L = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in sequences], device=device)
    real = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in sequences], device=device)
    out = model(input_ids=ids, attention_mask=real, output_hidden_states=True, use_cache=False)
    return list(out.hidden_states), real.bool()

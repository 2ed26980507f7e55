"""Memory planner: how much memory `eetune tune` or decoding needs per rank, before running it.

    eetune plan smollm2-135m --exits 10,20 --arch mlp --output-embedding shared
    eetune plan llama-2-70b/ --exits 20 --dtype bf16 --distill 0 --ranks 4 --mem-per-rank 80
    eetune plan smollm2-135m --exits 10,20 --mode decode --batch-size 1 --prompt-len 512 --json
    eetune plan gemma3-270m --exits 12,15 --exit-vocab 8k      # heads of 8,192 tokens + OTHER

    from eetune.measure.plan import plan, format_plan
    print(format_plan(plan("model_dir", "20", dtype="bf16", distill=0.0, ranks=4, mem_per_rank_gib=80)))

Everything comes from the model's `config.json` alone; no weight is read. The model is built on
PyTorch's meta device (shapes without storage), so parameter counts are exact for every family the
backbone adapters support, and the exit heads are counted by building `eetune.model.heads.ExitHead` on
it, exactly as `convert` builds them (with `exit_vocab` K, restricted to K tokens + OTHER: K rows
of an own output embedding, OTHER's row and bias; their logits and loss buffers are K + 1 wide).

What a tune step holds per rank (`plan_memory` spells out each term):
- the frozen trunk: decoder layers 1..k, k the deepest exit (all of them when distillation or
  decoding needs the final layer), plus embeddings, final norm and LM head, in the backbone dtype;
- the heads in fp32 (tune casts them: no separate fp32 master copy), their gradients, and AdamW's
  two fp32 moments; with `ranks > 1`, FSDP2 shards the trunk layers and the heads (not the
  embeddings), and all-gathers one layer, and the heads' parameters and gradients, to compute;
- activations, the largest of the step's phases (trunk, loss, backward, optimizer step,
  validation, writing the heads). The head gradients exist only in backward and the optimizer
  step (`zero_grad(set_to_none=True)`): a peak in another phase is counted less them. AdamW's
  step makes temporaries: on a CPU (single-tensor) two of each head tensor's size while the
  previous tensor's are still bound, three weight matrices' worth with two own output
  embeddings; on a GPU (foreach) one per tensor of a parameter group.
  With chunked exit losses (`loss_chunk` > 0, tune's default 256; eetune.train.losses), no
  (tokens x vocab) buffer is ever whole. The loss runs `chunk` tokens at a time and computes
  each exit's gradients in the same pass, so what it holds is: the exits' hidden states (and
  with distillation the final layer's normed hidden state, not its logits); per exit the fp32
  gradient with respect to its flattened input (tokens x hidden) and, for an own output
  embedding (`--output-embedding copy`), with respect to that (vocab x hidden) weight, saved
  for backward; and one chunk's work, fp32 (chunk x vocab) buffers (z, p and g, plus the weight
  gradient's vocab x hidden product; eight buffers with distillation: the final layer's log-probs
  and probs, the KL's temporaries and the float64 copy its sum makes). Backward scales the
  saved gradients, one copy each. With an own output embedding, the loss's peak is then about
  one exit's weight plus three chunk buffers more than the gradients it replaces.
  With `loss_chunk=0` (whole logits, `tune.exit_loss`) the (batch x seq x vocab) buffers
  dominate: the exit's logits, their shifted fp32 copy and log-softmax, and with distillation
  the final layer's logits and four more; each exit keeps one (three with distillation) for
  backward, which adds two (one).
  The counts follow the tensors the code keeps alive, checked phase by phase against measured
  peak RSS on a CPU (tests/test_plan.py, benchmarks/plan_check.py);
- decoding (`mode="decode"`): the whole model, the heads in the backbone dtype, the engine's
  static KV cache (`layers x 2 x batch x slots x kv_heads x head_dim`, slots = prompt + new tokens +
  the engine's self-spec slack) and the prefill's activations.

The peak is the steady state after loading. `load_peak_bytes` is what loading costs: tune with
`--distill 0` loads only layers 1..k (partial loading, `load_backbone(..., up_to_layer=k)`);
distillation, gates and decoding load the whole model.
Not counted: the CUDA context and allocator fragmentation on a GPU (about 1 GiB); the process
itself on the host: tokenizer, data, code pages, Python objects, and what the allocator keeps of
freed buffers (tuning SmolLM2 on a CPU holds 65 to 195 MiB more than planned, 58 MiB of it
SmolLM2's tokenizer and the default data; a tiny model about 30 MiB); with `--grad-accum` > 1,
the head gradients that the later micro-batches' losses run beside (add the head gradients line
once more when the peak is in the loss). On a CPU, glibc serves buffers under 32 MiB from its heap,
which can keep them after they are freed: a chunk buffer (chunk x vocab x 4 bytes) under 32 MiB
(vocab 32000 at chunk 256) can make a run hold more than planned.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eetune.errors import EETuneError

GIB = 1 << 30
MIB = 1 << 20

# The embedded default model's config (SmolLM2-135M-Instruct as eetune.model.defaults converts it), used
# only when the converted copy is not in the cache yet: planning never downloads anything.
SMOLLM2_135M = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}
# Gemma-3-270M (the `gemma3-270m` embedded model), as eetune.model.defaults converts it.
GEMMA3_270M = {
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "vocab_size": 262144, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "attention_bias": False, "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256, "sliding_window": 512, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
}
# Every embedded model's alias -> (its known config, its name in plans).
KNOWN_CONFIGS = {"smollm2-135m": (SMOLLM2_135M, "SmolLM2-135M-Instruct (smollm2-135m)"),
                 "gemma3-270m": (GEMMA3_270M, "Gemma-3-270M (gemma3-270m)")}

# Keys a config must have, per family (GPT-2 spells them its own way; either spelling is accepted).
REQUIRED = {
    "llama-like": (("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",), ("intermediate_size",),
                   ("vocab_size",)),
    "gpt2": (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
             ("vocab_size",)),
}
ENGINE_SLACK = 4  # eetune.decode.engine.run: capacity = prompt + new tokens + 2 * draft_len + 4, then Engine
#                  rounds (capacity + the largest bucket) up to a multiple of CAPACITY_STEP
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# --- the model, from its config ---------------------------------------------------------------
def read_config(model: str) -> tuple[dict, str]:
    """(config.json as a dict, a name for it) for a local HF directory, a path to a config.json, or
    an embedded model's alias, 'smollm2-135m' or 'gemma3-270m' (its cached converted config, else
    the known shape). Refuses, in one line, anything it cannot read or that eetune does not support."""
    from eetune.model.backbone import EMBEDDED_ALIASES, SUPPORTED_MODEL_TYPES

    aliases = "an embedded alias (" + ", ".join(f"'{a}'" for a in EMBEDDED_ALIASES) + ")"
    if model in EMBEDDED_ALIASES:
        from eetune.model.defaults import cache_dir, embedded_model
        known, name = KNOWN_CONFIGS[model]
        path = cache_dir() / "models" / embedded_model(model).dirname / "config.json"
        if not path.is_file():
            return copy.deepcopy(known), name
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise EETuneError(f"{model} has no config.json: give a Hugging Face model directory, its "
                                  f"config.json, or {aliases}")
        elif str(model).endswith(".gguf"):
            raise EETuneError("plan reads a config.json, not a .gguf file: give the directory `eetune convert` "
                              "made from it (or the model's Hugging Face directory)")
        elif not path.is_file():
            raise EETuneError(f"model config not found: {model}: give a local model directory, a config.json or "
                              f"{aliases} (plan never contacts the hub)")
        name = str(model)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise EETuneError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise EETuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): give the model's "
                          f"config.json") from None
    if not isinstance(config, dict):
        raise EETuneError(f"{path} holds a JSON {type(config).__name__}, not a model config object")
    model_type = config.get("model_type")
    if model_type is None:
        raise EETuneError(f"{path} has no model_type: give a Hugging Face model config")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (config.get("architectures") or [model_type])[0]
        raise EETuneError(f"unsupported architecture {arch!r} (model_type {model_type!r}): eetune plans for causal "
                          f"LMs of type {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = "gpt2" if model_type == "gpt2" else "llama-like"
    for spellings in REQUIRED[family]:
        value = next((config[k] for k in spellings if k in config), None)
        if value is None:
            raise EETuneError(f"{path} lacks {' / '.join(spellings)}: a {model_type} config needs it to size the "
                              f"model")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EETuneError(f"{path}: {spellings[0]} is {value!r}, not a positive integer")
    return config, name


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model and its exits (parameter counts exact)."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_params: tuple[int, ...]  # per decoder layer
    embedding_params: int  # token (and position) embeddings; the LM head too when tied to them
    final_norm_params: int
    lm_head_params: int  # 0 when tied to the token embeddings
    buffer_bytes: int  # non-parameter buffers (rotary tables ...), at their own dtypes
    tied: bool
    exit_layers: tuple[int, ...]
    arch: str
    output_embedding: str
    head_params: dict[int, int]  # exit layer -> its head's parameters
    head_largest: int  # the largest single head tensor
    # AdamW's temporaries (elements) at its step, the larger of: the single-tensor step (a CPU's) makes two of a
    # tensor's size while the previous tensor's denominator is still bound; the foreach step (a GPU's) one per
    # tensor of a parameter group at once (tune's groups: matrices, decayed; vectors)
    head_step_temp: int = 0
    logit_softcap: float | None = None  # final-logit soft-capping (Gemma 2): the chunked loss's gradient needs more
    exit_vocab: int | None = None  # K of restricted-vocabulary heads (None: the whole vocabulary)

    @property
    def exit_classes(self) -> int:
        """Width of an exit head's logits: V, or K (+ 1 for OTHER when K < V)."""
        if self.exit_vocab is None:
            return self.vocab_size
        return self.exit_vocab + int(self.exit_vocab < self.vocab_size)

    @property
    def backbone_params(self) -> int:
        return sum(self.layer_params) + self.embedding_params + self.final_norm_params + self.lm_head_params

    @property
    def head_total(self) -> int:
        return sum(self.head_params.values())


def model_shape(config: dict, exit_layers, arch: str = "norm", output_embedding: str = "copy",
                name: str = "", exit_vocab: int | None = None) -> ModelShape:
    """Count the parameters of the model `config` describes and of its exit heads, by building both
    on the meta device (no memory, no weights) with transformers and `eetune.model.heads.ExitHead`
    (`exit_vocab` K: heads restricted to K tokens + OTHER, as `convert --exit-vocab K` builds
    them: K rows of an own output embedding plus OTHER's row and bias; which K ids does not
    change the counts)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from eetune.model.backbone import adapter_for
    from eetune.model.config import ExitConfig
    from eetune.model.heads import ExitHead

    model_type = config["model_type"]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config sanity warnings (e.g. token ids) are not the planner's business
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k != "quantization_config"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EETuneError(f"cannot build a {model_type} model from {name or 'the config'}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bb = adapter_for(model)
    layers = tuple(sum(p.numel() for p in layer.parameters()) for layer in bb.layers)
    final_norm = sum(p.numel() for p in bb.final_norm.parameters())
    tied = bb.lm_head.weight is model.get_input_embeddings().weight
    lm_head = 0 if tied else sum(p.numel() for p in bb.lm_head.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied tensors once
    exit_config = ExitConfig(exit_layers=tuple(exit_layers), num_layers=bb.num_layers, arch=arch,
                             output_embedding=output_embedding)  # validates layers, arch, output embedding
    if arch == "embedding" and output_embedding == "shared":
        raise EETuneError("an `embedding` exit with a shared output embedding has no trainable parameters (it is "
                          "the frozen LM head on the raw hidden state): use --output-embedding copy, or --arch "
                          "norm, mlp or layer")
    if exit_vocab is not None and not (isinstance(exit_vocab, int) and 1 <= exit_vocab <= bb.vocab_size):
        raise EETuneError(f"--exit-vocab {exit_vocab!r}: give a token count from 1 to the model's vocabulary of "
                          f"{bb.vocab_size}, or `all`")
    vocab_ids = None if exit_vocab is None else torch.arange(exit_vocab)
    heads = {k: ExitHead(bb, k, arch, "copy", output_embedding, vocab_ids=vocab_ids) for k in exit_config.exit_layers}
    step_temp = 0
    for group in (True, False):  # tune's AdamW groups, in its order: matrices (decayed), then vectors
        sizes = [p.numel() for k in exit_config.exit_layers for p in heads[k].parameters()
                 if p.requires_grad and (p.ndim >= 2) == group]
        single = max((2 * n + prev for prev, n in zip([0] + sizes, sizes)), default=0)
        step_temp = max(step_temp, single, sum(sizes))
    c = bb.config
    heads_n = c.num_attention_heads
    return ModelShape(
        name=name, model_type=model_type, num_layers=bb.num_layers, hidden_size=c.hidden_size,
        vocab_size=bb.vocab_size,
        intermediate_size=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
        num_heads=heads_n, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads_n,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads_n,
        layer_params=layers, embedding_params=total - sum(layers) - final_norm - lm_head,
        final_norm_params=final_norm, lm_head_params=lm_head,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()), tied=tied,
        exit_layers=exit_config.exit_layers, arch=arch, output_embedding=output_embedding,
        head_params={k: sum(p.numel() for p in h.parameters()) for k, h in heads.items()},
        head_largest=max((p.numel() for h in heads.values() for p in h.parameters()), default=0),
        head_step_temp=step_temp, logit_softcap=bb.logit_softcap, exit_vocab=exit_vocab)


# --- the plan ---------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per rank of a tune step or of decoding, term by term; `peak_bytes` is their sum."""

    model: str
    model_type: str
    num_layers: int
    mode: str  # tune | decode
    exit_layers: tuple[int, ...]
    arch: str
    output_embedding: str
    dtype: str  # backbone weights and compute (heads train in fp32 either way)
    distill: float | None  # tune: the resolved --distill alpha
    batch_size: int  # per rank (tune's --batch-size is per process too)
    seq_len: int  # tune: tokens per block; decode: prompt + new tokens
    ranks: int
    loss_chunk: int | None  # tune: tokens per chunk of the exit losses (0: whole logits)
    trunk_layers: int  # decoder layers held (1..k)
    parts: dict[str, int]  # term -> bytes per rank; the peak is their sum
    # tune: bytes each phase of a step holds beyond the parameters, AdamW moments and all-gathered copies, the head
    # gradients included where they exist; "activations" is the largest less the "head gradients" term
    activation_phases: dict[str, int]
    activation_peak_phase: str
    peak_bytes: int
    load_peak_bytes: int  # loading: the layers load_backbone reads (partial loading for tune --distill 0)
    parameters: dict[str, int | dict]
    mem_per_rank_bytes: int | None = None
    exit_vocab: int | None = None  # K of restricted-vocabulary heads (None: the whole vocabulary)
    fits: bool | None = None
    min_ranks: int | None = None  # smallest number of ranks that fits mem_per_rank
    load_fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exit_layers"] = list(self.exit_layers)
        d["parameters"]["head_per_exit"] = {str(k): v for k, v in self.parameters["head_per_exit"].items()}
        return d


GRAD_PHASES = ("backward", "optimizer step")  # the phases during which the head gradients exist


def _tune_activations(s: ModelShape, dtype: str, alpha: float, b: int, T: int, ranks: int,
                      chunk: int) -> dict[str, int]:
    """Bytes each phase of one tune step holds beyond the parameters, the AdamW moments and the
    FSDP all-gathered copies: the head gradients are included in the phases where they exist
    (backward and the optimizer step: `zero_grad(set_to_none=True)` frees them after each step),
    absent from the others. Counted from the tensors the code keeps alive (torch 2.13), checked
    phase by phase against measured RSS on CPU (benchmarks/plan_check.py).

    Common to both loss paths: the trunk's hidden state at each exit (and with distillation the
    final layer's normed hidden state) from the trunk to the end of the step; one layer's work
    in the trunk; what autograd keeps inside each head; AdamW's temporaries (`head_step_temp`);
    writing the heads, a bytes copy of all of them.

    Chunked losses (`chunk > 0`, eetune.train.losses; `u` is one fp32 (chunk, vocab) buffer): while the
    last exit's loss runs, every exit's fp32 gradient with respect to its (tokens, hidden) input
    (and, for an own output embedding, to its (vocab, hidden) weight) saved for backward, the
    exit's flattened input, and one chunk's work at its peak: z, p and g (3u; the weight gradient
    accumulates in place); with distillation eight buffers (z, p, g, the final layer's log-probs
    and probs, two temporaries of the KL, and the float64 copy its sum makes); with soft-capping
    five; a frozen bf16 LM head is cast to fp32 once per exit, and an own head's weight to bf16
    once per exit. Backward scales the saved gradients (one
    more copy of a weight gradient, which becomes the head's gradient).

    Whole logits (`chunk == 0`, `tune.exit_loss`; `u` is one fp32 (batch, seq, vocab) buffer, `ul`
    the exit's logits in the compute dtype): the current exit's logits and, with distillation,
    the final layer's; the loss's shifted fp32 copy (none for fp32 at batch 1) and its
    log-softmax, saved for backward (with distillation also the exit's second log-softmax and
    exp(target) of the KL), while its own work peaks at seven buffers; backward adds two buffers
    (one with distillation), then the weight gradient.

    Restricted-vocabulary heads (`s.exit_vocab` K: logits over C = K + OTHER classes): every
    exit-side buffer and output weight above is C wide instead of V; with distillation the
    final layer's log-probs and probs stay V wide (two buffers), and the target folded onto the
    C classes is one more C-wide buffer; a head with OTHER concatenates its (C, hidden)
    projection once per loss. With K = V everything reduces to the unrestricted counts (but the
    folded target)."""
    V, H, I = s.vocab_size, s.hidden_size, s.intermediate_size
    Ve = s.exit_classes  # an exit's logits: V, or K (+ OTHER) for restricted heads; the final layer's stay V wide
    restricted = s.exit_vocab is not None
    other = restricted and s.exit_vocab < V
    hq, hkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    cb = DTYPE_BYTES[dtype]
    n = len(s.exit_layers)
    bt, N = b * T, b * (T - 1)  # positions, and the positions that predict a next token
    grads = (math.ceil(s.head_total / ranks) if ranks > 1 else s.head_total) * 4  # the "head gradients" term
    hidden = n * bt * H * cb  # the trunk's hidden state at each exit
    final_h = bt * H * cb if alpha > 0 else 0  # the final layer's normed hidden state (distillation)
    per_head = {  # what autograd keeps inside one head (fp32 heads; linears in the compute dtype)
        "embedding": 0,
        "norm": bt * 3 * H * 4,
        "mlp": bt * (7 * H * 4 + (H + 4 * I) * cb),
        "layer": bt * (11 * H * 4 + (2 * hq + 3 * hkv + 2 * H + 4 * I) * cb) + b * T * T * 4,
    }[s.arch] * n
    own = s.output_embedding == "copy"  # a trainable output embedding per exit
    layer_work = bt * (4 * H + hq + 2 * hkv + 3 * I) * cb + b * T * T * (cb + 3)  # one layer, no grad, + mask
    opt_tmp = math.ceil(s.head_step_temp / ranks) * 4
    save = s.head_total * 4 * (2 if ranks > 1 else 1)  # the bytes written (and the gathered copy under FSDP)
    phases = {"trunk": hidden + final_h + max(layer_work, 3 * bt * H * 4)}
    # a restricted head with OTHER builds its (C, hidden) projection (K rows + OTHER's) once per loss
    cat_w = Ve * H * (4 if own else cb) if other else 0
    if chunk == 0:
        u, ul = bt * Ve * 4, bt * Ve * cb  # the exit's buffers
        uf, ulf = bt * V * 4, bt * V * cb  # the final layer's
        copy = 0 if (dtype == "fp32" and b == 1) else 1
        keep = 1 if alpha == 0 else 3  # fp32 buffers each exit's loss keeps for backward
        work = (1 if alpha == 0 else 6) + copy  # the loss's own working buffers at its peak
        folded = 2 if (alpha > 0 and restricted) else 0  # of them, V wide: the final layer's, before folding
        bwd = 2 if alpha == 0 else 1
        final = ulf if alpha > 0 else 0  # the final layer's logits (distillation)
        if dtype == "bf16":  # autocast keeps a bf16 copy of every (gathered) head matrix for backward
            per_head += s.head_total * 2
        base = hidden + final_h + per_head
        phases["loss"] = base + final + ul + ((n - 1) * keep + work - folded) * u + folded * uf + cat_w
        phases["backward"] = base + max((n * keep + bwd) * u, (keep + bwd) * u + grads * (n - 1) // n, u + grads)
        phases["validation"] = hidden + final_h + ul + (1 + copy) * u
    else:
        c = min(chunk, N)
        u, uf = c * Ve * 4, c * V * 4  # one fp32 chunk buffer of an exit's classes / of the vocabulary
        weight = Ve * H * 4  # one exit's output weight in fp32 (gathered under FSDP)
        rows = N * H * 4  # one exit's flattened input, or its saved gradient
        work = 8 if alpha > 0 else (5 if s.logit_softcap else 3)
        cast = weight // 2 if (own and cb == 2) else 0  # an own head's weight cast to bf16, once per exit
        if alpha > 0 and restricted:  # the final layer's log-probs and probs stay V wide; + the folded target
            chunk_peak = 2 * uf + (work - 2 + 1) * u
        else:
            chunk_peak = work * u  # the weight gradient accumulates in place (addmm_): no (vocab, hidden) temporary
        w32 = weight if (not own and cb == 2) else 0  # the frozen bf16 LM head (its rows) cast to fp32, per exit
        if dtype == "bf16":  # autocast's bf16 copies of the head matrices other than the output embedding
            per_head += (s.head_total - (n * Ve * H if own else 0)) * 2
        base = hidden + final_h + per_head
        phases["loss"] = (base + (N * H * cb if alpha > 0 else 0) + (n + 1) * rows + (n * weight if own else 0)
                          + w32 + cast + chunk_peak + cat_w)
        phases["backward"] = base + n * rows + 2 * bt * H * 4 + grads + (weight if own else 0)
        phases["validation"] = hidden + final_h + bt * H * 4 + rows + 2 * u + (weight // 2 if own and cb == 2 else 0)
    phases["optimizer step"] = hidden + final_h + grads + opt_tmp
    phases["writing the heads (host memory on a GPU)"] = save
    return phases


def _decode_activations(s: ModelShape, dtype: str, b: int, P: int) -> int:
    """The prefill's transient bytes: masks (float + bool) over the prompt, one layer's work, the
    hidden states, and the last position's logits."""
    H, I = s.hidden_size, s.intermediate_size
    hq, hkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    cb = DTYPE_BYTES[dtype]
    return (b * P * P * (cb + 3) + b * P * (4 * H + hq + 2 * hkv + 3 * I) * cb + 2 * b * P * H * cb
            + 2 * b * s.vocab_size * 4)


def _tune_parts(s: ModelShape, dtype: str, alpha: float, b: int, T: int, ranks: int, held: int, chunk: int):
    cb = DTYPE_BYTES[dtype]
    P = s.head_total
    shard = (lambda x: math.ceil(x / ranks)) if ranks > 1 else (lambda x: x)
    phases = _tune_activations(s, dtype, alpha, b, T, ranks, chunk)
    peak_phase = max(phases, key=phases.get)
    parts = {
        "trunk layers": shard(sum(s.layer_params[:held])) * cb,
        "embeddings, final norm, LM head": (s.embedding_params + s.final_norm_params + s.lm_head_params) * cb
        + s.buffer_bytes,
        "head parameters": shard(P) * 4,
        "head gradients": shard(P) * 4,
        "AdamW moments": 2 * shard(P) * 4,
        "FSDP all-gathered copies": (max(s.layer_params[:held] or [0]) * cb + 2 * P * 4) if ranks > 1 else 0,
        # the gradients have their own line; a peak before backward holds none (its value is then the phase's
        # bytes less that line)
        "activations": phases[peak_phase] - shard(P) * 4,
        "KV cache": 0,
    }
    return parts, phases, peak_phase


def plan_memory(s: ModelShape, mode: str = "tune", dtype: str = "fp32", distill: float = 1.0,
                batch_size: int = 8, seq_len: int = 512, ranks: int = 1, mem_per_rank_bytes: int | None = None,
                prompt_len: int = 128, max_new_tokens: int = 128, draft_len: int = 4,
                loss_chunk: int = 256) -> MemoryPlan:
    """The per-rank memory of tuning (`distill`: the resolved alpha; `loss_chunk`: tokens per chunk
    of the exit losses, 0 for whole logits) or decoding the exits of `s`, with the verdict against
    `mem_per_rank_bytes` and the smallest number of ranks that fits (refused with one line when
    none does)."""
    _check_settings(mode, dtype, distill, batch_size, seq_len, ranks, mem_per_rank_bytes, prompt_len, max_new_tokens,
                    loss_chunk)
    cb = DTYPE_BYTES[dtype]
    L, P = s.num_layers, s.head_total
    whole = s.backbone_params * cb + s.buffer_bytes
    # Loading: the backbone as `load_backbone` reads it (tune with --distill 0: partial loading,
    # layers 1..k only; otherwise the whole model), the heads built in the backbone dtype, the
    # stored fp32 heads read beside them, and one head tensor's bytes for the checksum.
    loaded_layers = max(s.exit_layers) if mode == "tune" and distill == 0 else L
    load_peak = whole - sum(s.layer_params[loaded_layers:]) * cb + P * cb + P * 4 + s.head_largest * 4
    notes = []
    phases, peak_phase = {}, ""
    if mode == "tune":
        held = max(s.exit_layers) if distill == 0 else L
        parts, phases, peak_phase = _tune_parts(s, dtype, distill, batch_size, seq_len, ranks, held, loss_chunk)
        if distill > 0:
            notes.append(f"distillation (alpha {distill:g}) needs the final layer's output: the whole trunk is held; "
                         f"--distill 0 holds layers 1-{max(s.exit_layers)} only")
        if loss_chunk:
            c = min(loss_chunk, batch_size * (seq_len - 1))
            notes.append(f"exit losses {loss_chunk} tokens at a time: a few fp32 {c} x {s.vocab_size} buffers "
                         f"({human(c * s.vocab_size * 4)} each) instead of whole logits; each exit keeps its input's "
                         f"gradient" + (" and its output weight's" if s.output_embedding == "copy" else "")
                         + " (fp32) for backward")
        else:
            notes.append("--loss-chunk 0: whole logits, (batch x seq x vocab) buffers per exit")
        if peak_phase not in GRAD_PHASES:
            notes.append(f"the peak falls in the {peak_phase} phase, when no head gradient is allocated "
                         f"(set to None after each step): its activations line is the phase's bytes less the "
                         f"head gradients line")
        if ranks > 1:
            notes.append("ranks > 1: `eetune tune --fsdp` under torchrun (FSDP2 shards the trunk layers and the heads; "
                         "the embeddings, final norm and LM head are replicated)")
            notes.append("each trunk layer reshards after its forward (fully_shard(layer, reshard_after_forward=True)),"
                         " so a rank holds its shard plus one gathered layer")
        notes.append("load peak: " + (f"partial loading reads layers 1-{loaded_layers} only" if loaded_layers < L
                                       else "the whole model is loaded") +
                     "; on a CPU the memory-mapped safetensors pages count once read")
        seq = seq_len
    else:
        held = L
        from eetune.decode.engine import BUCKETS, CAPACITY_STEP
        asked = prompt_len + max_new_tokens + 2 * draft_len + ENGINE_SLACK
        slots = -(-(asked + BUCKETS[-1]) // CAPACITY_STEP) * CAPACITY_STEP
        kv_layers = L + sum(1 for _ in s.exit_layers if s.arch == "layer")  # a `layer` exit has its own cache
        kv = kv_layers * 2 * batch_size * slots * s.num_kv_heads * s.head_dim * cb
        parts = {
            "trunk layers": sum(s.layer_params) * cb,
            "embeddings, final norm, LM head": (s.embedding_params + s.final_norm_params + s.lm_head_params) * cb
            + s.buffer_bytes,
            "head parameters": P * cb,
            "head gradients": 0,
            "AdamW moments": 0,
            "FSDP all-gathered copies": 0,
            "activations": _decode_activations(s, dtype, batch_size, prompt_len),
            "KV cache": kv,
        }
        notes.append(f"KV cache: {kv_layers} layers x 2 x batch {batch_size} x {slots} slots (prompt {prompt_len} + "
                     f"{max_new_tokens} new + {2 * draft_len + ENGINE_SLACK} engine slack, rounded up with room for "
                     f"a padded block to a multiple of {CAPACITY_STEP}) x {s.num_kv_heads} kv heads x {s.head_dim} x "
                     f"{cb} bytes")
        seq = prompt_len + max_new_tokens
    plan = MemoryPlan(
        model=s.name, model_type=s.model_type, num_layers=L, mode=mode, exit_layers=s.exit_layers, arch=s.arch,
        output_embedding=s.output_embedding, dtype=dtype, distill=distill if mode == "tune" else None,
        batch_size=batch_size, seq_len=seq, ranks=ranks, loss_chunk=loss_chunk if mode == "tune" else None,
        trunk_layers=held, parts=parts,
        activation_phases=phases, activation_peak_phase=peak_phase or "prefill", peak_bytes=sum(parts.values()),
        load_peak_bytes=load_peak,
        parameters={"backbone": s.backbone_params, "trunk_layers_held": sum(s.layer_params[:held]),
                    "layers_all": sum(s.layer_params), "embeddings": s.embedding_params,
                    "final_norm": s.final_norm_params, "lm_head": s.lm_head_params, "heads": P,
                    "head_per_exit": dict(s.head_params)},
        mem_per_rank_bytes=mem_per_rank_bytes, exit_vocab=s.exit_vocab, notes=notes)
    if s.exit_vocab is not None:
        C = s.exit_classes
        plan.parameters["exit_classes"] = C
        notes.append(f"exit heads restricted to {s.exit_vocab:,} tokens" + (" + OTHER" if C > s.exit_vocab else "")
                     + f": each projects onto {C:,} rows instead of {s.vocab_size:,} (its parameters"
                     + (", output weight" if s.output_embedding == "copy" else "")
                     + f" and logits ~{C / s.vocab_size:.1%} of a full head's; the projection costs about as much "
                       f"less to run)")
    if mem_per_rank_bytes is not None:
        plan.fits = plan.peak_bytes <= mem_per_rank_bytes
        plan.load_fits = load_peak <= mem_per_rank_bytes
        plan.min_ranks = _min_ranks(s, plan, mem_per_rank_bytes)
    return plan


def _min_ranks(s: ModelShape, plan: MemoryPlan, mem: int) -> int:
    """The smallest number of ranks whose per-rank peak fits `mem`; refuses when none does."""
    need = lambda n: sum(_tune_parts(s, plan.dtype, plan.distill, plan.batch_size, plan.seq_len, n,  # noqa: E731
                                     plan.trunk_layers, plan.loss_chunk)[0].values())
    if plan.mode == "decode":
        if plan.peak_bytes > mem:
            raise EETuneError(f"decoding needs {human(plan.peak_bytes)} ({_biggest(plan)}) but --mem-per-rank is "
                              f"{human(mem)}, and it runs in one process: lower --batch-size, --prompt-len or "
                              f"--max-new-tokens, or use --dtype bf16")
        return 1
    if need(1) <= mem:
        return 1
    floor = need(1 << 40)  # every shardable term spread to nothing: what no number of ranks removes
    if floor > mem:
        parts = _tune_parts(s, plan.dtype, plan.distill, plan.batch_size, plan.seq_len, 1 << 40, plan.trunk_layers,
                            plan.loss_chunk)[0]
        raise EETuneError(f"does not fit in {human(mem)} per rank on any number of ranks: even fully sharded each "
                          f"rank needs {human(floor)} (activations {human(parts['activations'])} at batch "
                          f"{plan.batch_size} x {plan.seq_len} tokens per rank, embeddings and LM head "
                          f"{human(parts['embeddings, final norm, LM head'])}, all-gathered copies "
                          f"{human(parts['FSDP all-gathered copies'])}): lower --batch-size or --seq-len"
                          + (", or --distill 0" if plan.distill else "")
                          + (", or use --dtype bf16" if plan.dtype == "fp32" else ""))
    lo, hi = 2, 2
    while need(hi) > mem:
        lo, hi = hi + 1, hi * 2
    while lo < hi:  # need() does not grow with the ranks beyond 2
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if need(mid) > mem else (lo, mid)
    return lo


def _biggest(plan: MemoryPlan) -> str:
    k = max(plan.parts, key=plan.parts.get)
    return f"{k} {human(plan.parts[k])}"


def _check_settings(mode, dtype, distill, batch_size, seq_len, ranks, mem, prompt_len, max_new_tokens,
                    loss_chunk=0) -> None:
    if mode not in ("tune", "decode"):
        raise EETuneError(f"unknown mode {mode!r}: use tune or decode")
    if dtype not in DTYPE_BYTES:
        raise EETuneError(f"unknown dtype {dtype!r}: use fp32 or bf16")
    if batch_size < 1 or ranks < 1:
        raise EETuneError("--batch-size and --ranks must be at least 1")
    if mode == "tune" and seq_len < 2:
        raise EETuneError("--seq-len must be at least 2")
    if mode == "tune" and not (distill is not None and 0 <= distill <= 1):
        raise EETuneError(f"--distill {distill} is outside [0, 1]")
    if mode == "decode" and (prompt_len < 1 or max_new_tokens < 1):
        raise EETuneError("--prompt-len and --max-new-tokens must be at least 1")
    if mode == "decode" and ranks != 1:
        raise EETuneError("decoding runs in one process: --ranks applies to --mode tune")
    if mem is not None and not mem > 0:
        raise EETuneError("--mem-per-rank must be a positive number of GiB")
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise EETuneError(f"--loss-chunk {loss_chunk}: give a number of tokens >= 1, or 0 for whole logits")


def plan(model: str, exits, mode: str = "tune", arch: str = "norm", output_embedding: str = "copy",
         dtype: str = "fp32", distill: float | None = None, batch_size: int | None = None, seq_len: int = 512,
         ranks: int = 1, mem_per_rank_gib: float | None = None, prompt_len: int = 128,
         max_new_tokens: int = 128, loss_chunk: int | None = None, exit_vocab: int | str | None = None) -> MemoryPlan:
    """`eetune plan`: read `model`'s config, place the exits (`"10,20"`, fractions, or a list of
    layers), count, and plan. `distill=None` is tune's default as `TuneConfig` resolves it;
    `batch_size=None` is 8 blocks per rank for tune (tune's default), 1 prompt for decoding;
    `loss_chunk=None` is tune's (256 tokens; 0: whole logits); `exit_vocab`: heads restricted to
    K tokens + OTHER (`convert --exit-vocab K`; an int, `4k`, or None / `all`: the whole vocabulary)."""
    from eetune.model.config import parse_exit_layers
    from eetune.train.tune import TuneConfig, resolve_defaults

    if mem_per_rank_gib is not None and not (math.isfinite(mem_per_rank_gib) and mem_per_rank_gib > 0):
        raise EETuneError(f"--mem-per-rank {mem_per_rank_gib}: give a positive number of GiB")
    mem = None if mem_per_rank_gib is None else int(mem_per_rank_gib * GIB)
    if distill is None:
        distill = resolve_defaults(TuneConfig(distill=None)).distill
    if batch_size is None:
        batch_size = TuneConfig.batch_size if mode == "tune" else 1
    if loss_chunk is None:
        loss_chunk = TuneConfig.loss_chunk
    _check_settings(mode, dtype, distill, batch_size, seq_len, ranks, mem, prompt_len, max_new_tokens, loss_chunk)
    config, name = read_config(model)
    num_layers = config.get("num_hidden_layers", config.get("n_layer"))
    layers = parse_exit_layers(exits, num_layers) if isinstance(exits, str) else tuple(exits)
    if exit_vocab is not None:
        from eetune.model.heads import parse_exit_vocab
        exit_vocab = parse_exit_vocab(exit_vocab, config["vocab_size"])
    shape = model_shape(config, layers, arch, output_embedding, name=name, exit_vocab=exit_vocab)
    return plan_memory(shape, mode=mode, dtype=dtype, distill=distill, batch_size=batch_size, seq_len=seq_len,
                       ranks=ranks, mem_per_rank_bytes=mem, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                       loss_chunk=loss_chunk)


# --- output -----------------------------------------------------------------------------------
def human(n: int, unit: int | None = None) -> str:
    """Bytes in GiB (from 1 GiB on, or when `unit` is GIB) or MiB."""
    unit = unit or (GIB if n >= GIB else MIB)
    return f"{n / GIB:.2f} GiB" if unit == GIB else f"{n / MIB:.1f} MiB"


def format_plan(p: MemoryPlan) -> str:
    """The plan as a table, one term per line, then the verdict and the notes."""
    exits = ", ".join(map(str, p.exit_layers))
    cb = p.dtype
    lines = [f"eetune plan: {p.model} ({p.model_type}, {p.num_layers} layers), {p.mode}: {p.arch} exit"
             f"{'s' if len(p.exit_layers) > 1 else ''} after layer{'s' if len(p.exit_layers) > 1 else ''} {exits}, "
             f"output embedding {p.output_embedding}"
             + (f", exit vocabulary {p.exit_vocab:,} tokens" if p.exit_vocab is not None else "")]
    if p.mode == "tune":
        lines.append(f"  {cb} backbone, fp32 heads, batch {p.batch_size} x {p.seq_len} tokens per rank, distill "
                     f"{p.distill:g}, " + (f"loss chunk {p.loss_chunk}" if p.loss_chunk else "whole-logit losses")
                     + f", {p.ranks} rank{'s' if p.ranks > 1 else ''}" + (" (FSDP)" if p.ranks > 1 else ""))
    else:
        lines.append(f"  {cb} weights, batch {p.batch_size}, {p.seq_len} tokens (prompt + new)")
    shard = f", 1/{p.ranks} each" if p.ranks > 1 else ""
    labels = {
        "trunk layers": f"trunk: layers 1-{p.trunk_layers} of {p.num_layers} ({cb}{shard})",
        "embeddings, final norm, LM head": f"embeddings, final norm, LM head ({cb})",
        "head parameters": (f"head parameters (fp32{shard})" if p.mode == "tune" else f"head parameters ({cb})"),
        "head gradients": f"head gradients (fp32{shard})",
        "AdamW moments": f"AdamW moments (2 x fp32{shard}; fp32 heads: no master copy)",
        "FSDP all-gathered copies": "FSDP all-gathered: one layer + heads' params and grads",
        "activations": (f"activations, peak phase: {p.activation_peak_phase}" if p.mode == "tune"
                        else "activations (prefill)"),
        "KV cache": "KV cache",
    }
    width = max(len(v) for v in labels.values()) + 2
    unit = GIB if p.peak_bytes >= GIB else MIB  # one unit down the column
    lines.append(f"per rank{'':<{width - 8}}{'bytes':>12}")
    for key, value in p.parts.items():
        if value or key in ("trunk layers", "activations"):
            lines.append(f"  {labels[key]:<{width - 2}}{human(value, unit):>12}")
    lines.append(f"  {'peak':<{width - 2}}{human(p.peak_bytes, unit):>12}")
    lines.append(f"load peak: {human(p.load_peak_bytes)} per rank (" +
                 (f"layers 1-{p.trunk_layers} read" if p.trunk_layers < p.num_layers else "the whole model") +
                 ", then the heads)")
    if p.mem_per_rank_bytes is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"{verdict} in {human(p.mem_per_rank_bytes)} per rank at {p.ranks} rank"
                     f"{'s' if p.ranks > 1 else ''}; smallest number of ranks that fits: {p.min_ranks}"
                     + ("" if p.load_fits else " (loading needs more: see the load peak)"))
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)

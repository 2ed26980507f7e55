"""`eetune export`: one tuned exit as a standalone draft model for other engines.

    eetune export runs/exits --exit 20 --out draft/                  # HF directory
    eetune export runs/exits --exit 20 --out draft.gguf --format gguf

The draft is the backbone's first k layers plus the exit's transform, norm and output projection,
written as an ordinary model of the backbone's own family (no custom code), so vLLM, SGLang,
llama.cpp and transformers' `assistant_model` take it as a separate draft model:

- `norm`: k layers; the model's final norm is the exit's norm, its LM head the exit's projection.
- `mlp`: k + 1 layers; the extra decoder layer has every attention weight at zero (its output
  projection zero, so attention adds exactly 0 to the residual, Gemma's post-attention norm of 0
  included) and the exit's MLP with its norms, so it computes `h + MLP(norm(h))` exactly.
- `layer`: k + 1 layers; the extra layer is the exit's own decoder layer, with the attention type
  (sliding or full) of the backbone's last layer, which it was copied from and runs as.
- `embedding`: refused: every family's final norm (RMSNorm, LayerNorm) rescales the hidden state
  per token, so no weights make it the identity the exit's `W h` needs.
- restricted vocabulary (K ids + OTHER): refused (the families' LM head has no OTHER class) unless
  `other_rows`: a full-vocabulary head whose rows at the K ids are the head's and whose other rows
  all are the OTHER row (see docs/export.md for what that drafts). K = V (no OTHER) is exact.

The draft's logits equal the exit's (tests/test_export.py: within 1e-5 in fp32 for every family).
Writes are atomic: a temporary sibling, renamed into place.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eetune.errors import EETuneError

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16")
# HF model_type -> llama.cpp architecture name, for what transformers' GGUF loader reads back.
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
EXPORT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class ExportResult:
    path: str
    format: str
    exit_layer: int
    arch: str
    num_layers: int  # decoder layers of the draft
    tied: bool  # whether the draft's LM head is its input embedding
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (f"wrote {self.path}: the {self.arch} exit after layer {self.exit_layer} as a {self.num_layers}-layer "
                f"{'GGUF' if self.format == 'gguf' else 'Hugging Face'} draft model{extra}")


# --- the draft as a Hugging Face model -------------------------------------------------------
def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise EETuneError(f"cannot find {type(target).__name__} in {type(root).__name__}")


def _head_projection(head, other_rows: bool) -> torch.Tensor:
    """The exit's output projection as a full-vocabulary (V, H) weight with no bias."""
    V = head.adapter.vocab_size
    with torch.no_grad():
        w, b = head.projection()
        if not head.restricted:
            if b is not None and bool((b != 0).any()):
                raise EETuneError("the LM head has a bias, which the exported model's head cannot hold exactly")
            return w.detach()
        ids = head.vocab_ids.to(w.device)
        K = ids.numel()
        if b is not None and bool((b[:K] != 0).any()):
            raise EETuneError(f"exit {head.layer}'s restricted head has a nonzero bias on its {K} token rows, which the "
                              f"family's bias-free LM head cannot hold: it cannot be exported")
        if head.has_other:
            if not other_rows:
                raise EETuneError(
                    f"exit {head.layer} projects onto {K:,} token ids plus an OTHER class, which the family's LM head "
                    f"(one row per token, no bias) cannot express exactly: re-create the exits without --exit-vocab "
                    f"for an exact draft, or pass --other-rows for a full-vocabulary head whose non-K rows are the "
                    f"OTHER row (lossless drafting, lower acceptance; see docs/export.md)")
            ob = float(b[K])
            if ob < 0:
                raise EETuneError(f"exit {head.layer}'s OTHER class has a negative bias ({ob:.4g}), which --other-rows "
                                  f"cannot hold: the draft would propose non-K tokens where the head picks one of "
                                  f"its K tokens; re-create the exits without --exit-vocab")
            full = w[K][None].expand(V, -1).clone()
        else:
            full = torch.empty(V, w.shape[1], dtype=w.dtype, device=w.device)
        full[ids] = w[:K]
        return full


def _per_layer(values, k: int, extra):
    """A per-layer config list cut to the draft's layers (plus `extra`'s entry for a k+1th)."""
    out = list(values[:k])
    if extra is not None:
        out.append(extra)
    return out


def draft_state(model, layer: int, other_rows: bool = False, dtype: torch.dtype | None = None):
    """(config, state dict, tied) of the draft model for exit `layer` of the `EarlyExitModel`
    `model`; the state dict is in the HF model's own names, its tensors the backbone's and the
    head's (no copies beyond the dtype cast and the zero attention of an `mlp` exit's layer)."""
    bb = model.backbone
    if layer not in model.exit_layers:
        raise EETuneError(f"there is no exit after layer {layer}: the exits are after layers "
                          f"{list(model.exit_layers)}; give --exit one of them")
    head = model.head(layer)
    mt = bb.config.model_type
    if mt not in EXPORT_FAMILIES:
        raise EETuneError(f"cannot export a {mt} model: export knows {', '.join(EXPORT_FAMILIES)}")
    if head.arch == "embedding":
        raise EETuneError(f"an `embedding` exit projects the raw hidden state, but the exported model always applies "
                          f"its final norm ({type(bb.final_norm).__name__}), which rescales each token's hidden state "
                          f"and has no identity setting: only norm, mlp and layer exits can be exported")
    if head.arch == "layer" and getattr(bb.config, "scale_attn_by_inverse_layer_idx", False):
        raise EETuneError("this GPT-2 scales attention by the layer index, so the `layer` exit's copied last layer "
                          "would compute differently at position k+1: it cannot be exported exactly")
    missing = [i + 1 for i in range(layer) if not bb.is_loaded(i)]
    if missing:
        raise EETuneError(f"backbone layer {missing[0]} is not loaded: load the model up to layer {layer}")
    dtype = dtype or bb.lm_head.weight.dtype
    L = bb.num_layers
    extra = head.arch in ("mlp", "layer")
    n = layer + int(extra)

    config = copy.deepcopy(bb.config)
    config.num_hidden_layers = n
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == L:
        # a `layer` exit runs as the last layer it copies; an `mlp` exit's zero attention may be of
        # any kind: the backbone's next one keeps the model's own pattern (what a GGUF loader rebuilds)
        nxt = types[L - 1] if head.arch == "layer" or layer >= L else types[layer]
        config.layer_types = _per_layer(types, layer, nxt if extra else None)
    for name in ("max_window_layers",):  # Qwen2: layers from this index on slide
        if isinstance(getattr(config, name, None), int) and getattr(config, name) > n:
            setattr(config, name, n)
    if not getattr(config, "architectures", None):
        config.architectures = [type(bb.model).__name__]
    config.dtype = dtype

    state: dict[str, torch.Tensor] = {}
    prefix = _module_name(bb.model, bb.layers)
    norm_name = _module_name(bb.model, bb.final_norm)
    own = bb.model.state_dict()
    for name, t in own.items():
        if name.startswith(prefix + "."):
            i = int(name[len(prefix) + 1:].split(".", 1)[0])
            if i < layer:
                state[name] = t
        elif name.startswith(norm_name + ".") or name == "lm_head.weight":
            continue
        else:
            state[name] = t
    if extra:
        ref = bb.layers[layer - 1]
        if head.arch == "layer":
            block = {n_: t for n_, t in head.block.state_dict().items()}
        else:
            block = {}
            for mod, sub in zip(bb.mlp_block(layer - 1), head.mlp):
                mname = _module_name(ref, mod)
                block.update({f"{mname}.{n_}": t for n_, t in sub.state_dict().items()})
            for n_, t in ref.state_dict().items():
                if n_ in block:
                    continue
                if not t.is_floating_point():
                    block[n_] = t
                elif "norm" in n_ or n_.startswith("ln_"):
                    # unused (it normalises the input of an attention whose output is zero); identity
                    one = 0.0 if (bb.norm_is_offset and "ln_" not in n_) or n_.endswith(".bias") else 1.0
                    block[n_] = torch.full_like(t, one)
                else:  # every attention weight and bias: zero, so the branch adds exactly 0
                    block[n_] = torch.zeros_like(t)
        for n_, t in block.items():
            state[f"{prefix}.{layer}.{n_}"] = t
    for n_, t in head.norm.state_dict().items():
        state[f"{norm_name}.{n_}"] = t
    out_w = _head_projection(head, other_rows)
    emb = bb.model.get_input_embeddings().weight
    tied = out_w.shape == emb.shape and torch.equal(out_w.to(emb.dtype), emb)
    config.tie_word_embeddings = bool(tied)
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        config.get_text_config().tie_word_embeddings = bool(tied)
    if not tied:
        state["lm_head.weight"] = out_w
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()) for k, v in state.items()}
    return config, state, bool(tied)


def draft_model(model, layer: int, other_rows: bool = False, dtype: torch.dtype | None = None):
    """The draft for exit `layer` as a transformers `*ForCausalLM` (eval mode, on the backbone's
    device), built from `draft_state`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config, state, tied = draft_state(model, layer, other_rows, dtype)
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    expected = set(hf.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    got = set(state)
    if got != expected:  # a layout this module does not know: refuse rather than write a broken model
        diff = sorted(got ^ expected)
        raise EETuneError(f"cannot build the draft model: tensor {diff[0]} does not match the "
                          f"{type(hf).__name__} layout")
    hf.load_state_dict(state, strict=False, assign=True)
    if tied:
        hf.tie_weights()
    dev = bb_device(model)
    return hf.to(dev).eval().requires_grad_(False)


def bb_device(model) -> torch.device:
    return model.backbone.lm_head.weight.device


# --- writing -----------------------------------------------------------------------------------
def check_out(out: Path, force: bool, kind: str) -> None:
    if out.exists() or out.is_symlink():
        if kind == "dir" and out.is_dir() and not any(out.iterdir()):
            return
        if not force:
            raise EETuneError(f"--out {out} exists{' and is not empty' if out.is_dir() else ''}: give a new path, "
                              f"or --force to replace it")
        if kind == "dir" and not out.is_dir():
            raise EETuneError(f"--out {out} is a file: give a directory path for --format hf")
        if kind == "file" and out.is_dir():
            raise EETuneError(f"--out {out} is a directory: give a .gguf file path for --format gguf")


def export_draft(model, layer: int, out: str | Path, format: str = "hf", force: bool = False,
                 other_rows: bool = False, dtype: torch.dtype | None = None, gguf_type: str = "f32",
                 tokenizer_dir: str | Path | None = None) -> ExportResult:
    """Write the draft model of exit `layer` of the loaded `EarlyExitModel` `model` to `out`:
    a Hugging Face directory (`hf`: config.json, model.safetensors, generation_config.json and the
    backbone's tokenizer files) or one GGUF file (`gguf`). `tokenizer_dir`: where the tokenizer
    files are (default: the backbone's model directory)."""
    if format not in FORMATS:
        raise EETuneError(f"--format {format!r}: give one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise EETuneError(f"--gguf-type {gguf_type!r}: give one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    check_out(out, force, "dir" if format == "hf" else "file")
    tokenizer_dir = tokenizer_dir or getattr(model.backbone, "model_path", None)
    if format == "gguf":
        return _export_gguf(model, layer, out, other_rows, gguf_type, tokenizer_dir)
    hf = draft_model(model, layer, other_rows, dtype)
    notes = []
    from eetune.fsio import replace_dir, staging_dir
    tmp = staging_dir(out)
    try:
        hf.save_pretrained(tmp)
        gen = getattr(model.backbone.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        copied = _copy_tokenizer(tokenizer_dir, tmp)
        if not copied:
            notes.append("no tokenizer files beside the backbone: the draft has none")
        (tmp / "EETUNE_EXPORT.json").write_text(json.dumps(_provenance(model, layer, other_rows), indent=2,
                                                           sort_keys=True) + "\n")
        if out.exists():
            if not force and any(out.iterdir()):
                raise EETuneError(f"--out {out} appeared while exporting: give a new path, or --force")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    head = model.head(layer)
    if head.has_other:
        notes.append(f"restricted head: its {head.vocab_ids.numel():,} token rows kept, every other row is its OTHER "
                     f"row (--other-rows)")
    return ExportResult(str(out), "hf", layer, head.arch, hf.config.num_hidden_layers,
                        bool(hf.config.tie_word_embeddings), notes)


def _provenance(model, layer: int, other_rows: bool) -> dict:
    from eetune.version import __version__
    cfg = model.config
    return {"eetune_version": __version__, "exit_layer": layer, "arch": cfg.arch, "base_model": cfg.base_model,
            "backbone_fingerprint": cfg.backbone_fingerprint, "exit_vocab": cfg.exit_vocab, "other_rows": other_rows}


def _copy_tokenizer(src, dst: Path) -> list[str]:
    if not src or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied


def export(exits_dir: str | Path, layer: int, out: str | Path, format: str = "hf", force: bool = False,
           other_rows: bool = False, dtype: str = "fp32", gguf_type: str = "f32",
           device: str = "cpu") -> ExportResult:
    """`eetune export`: load the exits directory (its backbone only up to the exit) and write exit
    `layer` as a draft model (`export_draft`)."""
    from eetune.model.backbone import _resolve_dtype
    from eetune.model.config import ExitConfig
    from eetune.model.early_exit import EarlyExitModel

    exits_dir = Path(exits_dir)
    if not exits_dir.is_dir():
        raise EETuneError(f"exits directory not found: {exits_dir}: give a directory written by `eetune convert` "
                          f"or `eetune tune`")
    if format not in FORMATS:
        raise EETuneError(f"--format {format!r}: give one of {', '.join(FORMATS)}")
    config = ExitConfig.load(exits_dir)
    if layer not in config.exit_layers:
        raise EETuneError(f"there is no exit after layer {layer} in {exits_dir}: its exits are after layers "
                          f"{list(config.exit_layers)}; give --exit one of them")
    if config.arch == "embedding":
        raise EETuneError("an `embedding` exit projects the raw hidden state, but the exported model always applies "
                          "its final norm, which rescales each token's hidden state and has no identity setting: only "
                          "norm, mlp and layer exits can be exported")
    if config.model_type and config.model_type not in EXPORT_FAMILIES:
        raise EETuneError(f"cannot export a {config.model_type} model: export knows {', '.join(EXPORT_FAMILIES)}")
    if format == "gguf" and config.model_type and config.model_type not in GGUF_ARCHS:
        raise EETuneError(_gguf_family_refusal(config.model_type))
    check_out(Path(out), force, "dir" if format == "hf" else "file")
    model = EarlyExitModel.from_pretrained(exits_dir, dtype=dtype, device=device, partial=True)
    return export_draft(model, layer, out, format=format, force=force, other_rows=other_rows,
                        dtype=_resolve_dtype(dtype), gguf_type=gguf_type)


# --- GGUF ----------------------------------------------------------------------------------------
def _gguf_family_refusal(model_type: str) -> str:
    return (f"--format gguf writes {', '.join(sorted(GGUF_ARCHS))} models (what transformers' GGUF loader reads back "
            f"exactly), not {model_type}: use --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def _gguf_tokenizer(tokenizer_dir) -> dict:
    """tokenizer.ggml.* of a byte-level BPE tokenizer (tokenizer.json), as llama.cpp's
    convert_hf_to_gguf.py writes a "gpt2"-model vocabulary."""
    path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if path is None or not path.is_file():
        raise EETuneError(f"--format gguf needs the backbone's tokenizer.json (llama.cpp checks that the draft's "
                          f"vocabulary matches the target's), and {tokenizer_dir or 'the backbone'} has none: put the "
                          f"tokenizer beside the model, or use --format hf")
    tok = json.loads(path.read_text(encoding="utf-8"))
    m = tok.get("model") or {}
    pre = tok.get("pre_tokenizer") or {}
    pres = [pre] + list(pre.get("pretokenizers", [])) if pre else []
    if m.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        raise EETuneError(f"--format gguf writes byte-level BPE vocabularies (GPT-2, SmolLM, Qwen, Llama 3) and the "
                          f"tokenizer in {tokenizer_dir} is {m.get('type', '?')} without a ByteLevel pre-tokenizer: "
                          f"use --format hf and llama.cpp's convert_hf_to_gguf.py")
    vocab = dict(m["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until seen
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 1  # NORMAL
    for i, a in added.items():
        types[i] = 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges", [])]
    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        t = tcfg.get(f"{role}_token")
        if isinstance(t, dict):
            t = t.get("content")
        if isinstance(t, str) and t in vocab:
            ids[role] = vocab[t]
    chat = tcfg.get("chat_template")
    tpl = Path(tokenizer_dir) / "chat_template.jinja"
    if chat is None and tpl.is_file():
        chat = tpl.read_text(encoding="utf-8")
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "chat_template": chat,
            "add_bos": bool(tcfg.get("add_bos_token", False))}


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture (its convert_hf_to_gguf.py `permute`;
    transformers' GGUF loader reverses it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "full_attention" in rp:
        rp = rp["full_attention"]
    return float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _export_gguf(model, layer: int, out: Path, other_rows: bool, gguf_type: str, tokenizer_dir) -> ExportResult:
    import gguf
    import numpy as np

    mt = model.backbone.config.model_type
    if mt not in GGUF_ARCHS:
        raise EETuneError(_gguf_family_refusal(mt))
    rp = getattr(model.backbone.config, "rope_parameters", None) or {}
    kinds = {v.get("rope_type", "default") for v in rp.values()} if isinstance(rp, dict) and all(
        isinstance(v, dict) for v in rp.values()) and rp else {rp.get("rope_type", "default") if rp else "default"}
    if kinds - {"default"}:
        raise EETuneError(f"the model uses {'/'.join(sorted(kinds - {'default'}))} rope scaling, which transformers' "
                          f"GGUF loader does not read back: use --format hf")
    tk = _gguf_tokenizer(tokenizer_dir)
    config, state, tied = draft_state(model, layer, other_rows, torch.float32)
    arch = GGUF_ARCHS[mt]
    _check_gguf_config(config, arch, tk, tied)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    from eetune.fsio import atomic_write

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name("eetune draft")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(_rope_theta(config))
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        if arch == "llama":
            w.add_rope_dimension_count(head_dim)
        else:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if arch == "gemma3":
            w.add_sliding_window(config.sliding_window)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tk["tokens"])
        w.add_token_types(tk["types"])
        w.add_token_merges(tk["merges"])
        for role, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                         ("pad", w.add_pad_token_id)):
            if role in tk["ids"]:
                fn(tk["ids"][role])
        w.add_add_bos_token(tk["add_bos"])
        if tk["chat_template"]:
            w.add_chat_template(tk["chat_template"])
        for hf_name, t in state.items():
            base, _, suffix = hf_name.rpartition(".")
            name = name_map.get_name(base)
            if name is None:
                raise EETuneError(f"cannot name tensor {hf_name} in llama.cpp's {arch} layout: use --format hf")
            t = t.float()
            if arch == "llama" and name.endswith("attn_q"):
                t = _llama_permute(t, n_head)
            elif arch == "llama" and name.endswith("attn_k"):
                t = _llama_permute(t, n_kv)
            if arch == "gemma3" and "norm" in name:
                t = t + 1  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
            arr = t.cpu().numpy()
            if gguf_type == "f16" and arr.ndim > 1:  # llama.cpp keeps 1-D tensors (norms, biases) in F32
                arr = arr.astype(np.float16)
            w.add_tensor(f"{name}.{suffix}", arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(out, write)  # a temporary sibling, fsynced, renamed into place
    head = model.head(layer)
    notes = [gguf_type.upper()]
    return ExportResult(str(out), "gguf", layer, head.arch, config.num_hidden_layers, tied, notes)


# Config fields transformers' GGUF loader rebuilds from defaults rather than from the file: the
# draft must have the loader's values, or the GGUF would load as another model.
_CHECKED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "hidden_act", "hidden_activation", "attention_bias", "mlp_bias",
            "layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping",
            "attn_logit_softcapping", "rope_parameters", "use_sliding_window", "vocab_size", "tie_word_embeddings")


def _check_gguf_config(config, arch: str, tk: dict, tied: bool) -> None:
    """Refuse, in one line, a draft whose GGUF would not load back as the same model: rebuild the
    config the way transformers' GGUF loader does (the file's keys over the class defaults) and
    compare what decides the computation."""
    from transformers import AutoConfig

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    read = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings, "rope_theta": _rope_theta(config),
            "vocab_size": config.vocab_size, "tie_word_embeddings": tied}
    if arch == "llama":
        read["head_dim"] = head_dim
    if arch == "gemma3":
        read["head_dim"] = head_dim
        read["sliding_window"] = config.sliding_window
    if len(tk["tokens"]) != config.vocab_size:
        raise EETuneError(f"the tokenizer has {len(tk['tokens']):,} tokens but the model's vocabulary {config.vocab_size:,}:"
                          f" llama.cpp takes one token per row; use --format hf")
    model_type = "gemma3_text" if arch == "gemma3" else arch
    try:
        rebuilt = AutoConfig.for_model(model_type, **read)
    except Exception as e:  # noqa: BLE001 - one line
        raise EETuneError(f"cannot rebuild the config a GGUF loader would read ({str(e).splitlines()[0]}): use "
                          f"--format hf") from None
    a, b = config.to_dict(), rebuilt.to_dict()
    for key in _CHECKED:
        if key in a and a.get(key) != b.get(key):
            raise EETuneError(f"this {model_type} model's {key} ({a.get(key)!r}) is not what transformers' GGUF loader "
                              f"rebuilds from the file ({b.get(key)!r}), so the GGUF would load as another model: "
                              f"use --format hf")

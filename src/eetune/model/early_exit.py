"""`EarlyExitModel`: a frozen backbone plus exit heads, and the exits directory on disk.

    from eetune import EarlyExitModel, load_backbone
    backbone = load_backbone("smollm2-135m")
    model = EarlyExitModel.convert(backbone, exit_layers=(10, 20), arch="mlp")
    out = model(input_ids)                 # out.exit_logits[10], out.exit_logits[20]
    out = model(input_ids, final=True)     # ... and out.final_logits (full depth)
    model.save_pretrained("exits/")        # exit_config.json + exit_heads.safetensors
    model = EarlyExitModel.from_pretrained("exits/")   # loads and checks the backbone

Without `final=True` the trunk stops at the deepest exit: no layer past it runs. Only head
parameters are trainable; the backbone is frozen and kept in eval mode. A model starts in eval
mode (as Hugging Face's `from_pretrained` returns one): heads with dropout (a `layer` exit, or a
GPT-2 `mlp` exit, copies modules that have some) use it only after `model.train()`, which
`eetune tune` sets for its training steps; validation (`eetune.train.tune`), gate fitting and
`generate` run in eval mode (`eval_mode`) and put the previous mode back.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from eetune.model.backbone import Adapter, ReleasedLayer, fingerprint, load_backbone  # noqa: F401 (ReleasedLayer re-exported)
from eetune.model.config import CONFIG_NAME, WEIGHTS_NAME, ExitConfig
from eetune.errors import EETuneError
from eetune.model.heads import ExitHead, check_vocab_ids


@dataclass
class ExitOutput:
    exit_logits: dict[int, torch.Tensor]  # exit layer (1-based) -> (B, T, C): C = V, or K (+ OTHER) for a
    #                                        restricted head (ExitHead.predict / to_vocab read them)
    final_logits: torch.Tensor | None = None  # full-depth logits when asked for
    exit_hidden: dict[int, torch.Tensor] | None = None  # trunk hidden states at each exit


def positions_from_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor,
                        past: int = 0) -> torch.Tensor:
    """Token positions (B, T): 0.. for real tokens, -1 for padding (left or right)."""
    if attention_mask is None:
        B, T = input_ids.shape
        return torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1 + past
    return pos.masked_fill(attention_mask == 0, -1)


class EarlyExitModel(nn.Module):
    def __init__(self, backbone: Adapter, config: ExitConfig, heads: nn.ModuleList):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.heads = heads
        # Optional extras of the exits directory: a gate per exit (eetune.train.gates, trained by
        # `tune --gates`) and the vocabulary ranked by frequency in the tuning data (for
        # self-spec's `--draft-vocab K`). Both are saved beside the heads.
        self.gates = nn.ModuleDict()
        self.vocab_by_frequency: torch.Tensor | None = None
        # What a decoder keeps between requests (eetune.decode.engine: caches, recorded CUDA
        # graphs); dropped by free_decode_state(), and whenever layers are released.
        self.decode_state: dict | None = None
        # The backbone is held, not registered: parameters() and state_dict() are the heads only.
        backbone.model.requires_grad_(False)
        backbone.model.eval()
        self.eval()  # inference until told otherwise (tuning calls train() for its steps)

    def free_decode_state(self) -> None:
        """Drop the decoder's kept caches and recorded graphs (their memory comes back)."""
        if self.decode_state is not None:
            self.decode_state = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def convert(cls, backbone: Adapter, exit_layers, arch: str = "norm", init: str = "copy",
                output_embedding: str = "copy", exit_vocab_ids: torch.Tensor | None = None,
                exit_vocab_source: dict | None = None) -> "EarlyExitModel":
        """Attach fresh exit heads (architecture augmentation, stage 1 of EE-Tuning).
        `exit_vocab_ids`: restrict every head to these K token ids plus OTHER (`restrict_vocab`)."""
        if arch == "embedding" and output_embedding == "shared":
            raise EETuneError("an `embedding` exit with a shared output embedding has no trainable parameters (it is "
                              "the frozen LM head on the raw hidden state): use --output-embedding copy, or --arch "
                              "norm, mlp or layer")
        deepest = max(exit_layers)  # the fingerprint covers what a partial load of these exits holds
        config = ExitConfig(
            exit_layers=tuple(exit_layers), num_layers=backbone.num_layers, arch=arch, init=init,
            output_embedding=output_embedding, base_model=getattr(backbone, "source", ""),
            revision=getattr(backbone, "revision", None), model_type=backbone.config.model_type,
            backbone_fingerprint=fingerprint(backbone.model, layers=deepest), fingerprint_layers=deepest)
        heads = nn.ModuleList(ExitHead(backbone, k, arch, init, output_embedding) for k in config.exit_layers)
        model = cls(backbone, config, heads)
        if exit_vocab_ids is not None:
            model.restrict_vocab(exit_vocab_ids, exit_vocab_source)
        return model

    def restrict_vocab(self, ids: torch.Tensor, source: dict | None = None) -> None:
        """Restrict every exit head to the token ids `ids` (K of them, most useful first) plus
        OTHER (`ExitHead.restrict_vocab`: the K rows of each head's projection, a fresh OTHER row;
        the transforms are kept) and record K and `source` (how the ids were ranked) in the config.
        The heads' stored calibration and gates no longer describe them and are dropped."""
        for head in self.heads:
            head.restrict_vocab(ids)
        self.config = self.config.replace(exit_vocab=int(torch.as_tensor(ids).numel()), exit_vocab_source=source,
                                          calibration=None, gates=None)
        self.gates = nn.ModuleDict()
        self.free_decode_state()

    @property
    def exit_vocab(self) -> int | None:
        """K of restricted-vocabulary heads, or None (every head projects onto the whole vocabulary)."""
        return self.config.exit_vocab

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.config.exit_layers

    def head(self, layer: int) -> ExitHead:
        return self.heads[self.config.exit_layers.index(layer)]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.model.eval()  # the frozen trunk never leaves eval mode
        return self

    # --- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                final: bool = False, return_hidden: bool = False) -> ExitOutput:
        """Logits of every exit for every position (teacher-forced, no cache).

        The trunk runs without gradient and stops at the deepest exit unless `final` asks for
        the full-depth logits too; gradients reach the heads only.
        """
        bb = self.backbone
        positions = positions_from_mask(attention_mask, input_ids)
        with torch.no_grad():
            h = bb.embed(input_ids, positions)
            ctx = bb.context(h, positions)
        done, hiddens, logits = 0, {}, {}
        for head in self.heads:
            with torch.no_grad():
                h = bb.run_layers(h, done, head.layer, ctx)
            done = head.layer
            hiddens[head.layer] = h
            logits[head.layer] = head(h, ctx)
        final_logits = None
        if final:
            if self.released_from is not None:
                raise EETuneError(f"backbone layers from {self.released_from + 1} on are not loaded (partial "
                                  f"loading, or released): final logits need the full backbone; reload the model")
            with torch.no_grad():
                h = bb.run_layers(h, done, bb.num_layers, ctx)
                final_logits = bb.logits(bb.final_norm(h))
        return ExitOutput(logits, final_logits, hiddens if return_hidden else None)

    # --- memory economy --------------------------------------------------------------------
    @property
    def released_from(self) -> int | None:
        """The first backbone layer (0-based) not in memory (partial loading, or released), or None."""
        return next((i for i in range(self.backbone.num_layers) if not self.backbone.is_loaded(i)), None)

    def release_unused_layers(self, start: int | None = None) -> int:
        """Free the backbone layers past the deepest exit (the paper's partial loading): a run
        that needs no final logits never runs them, so it need not hold them. The layer list
        keeps its length (placeholders), so layer numbering and per-layer attention types stay
        as they were; `forward(final=True)` is refused afterwards. `start=0` frees every layer
        (hidden states served from a cache). Returns how many were freed."""
        self.free_decode_state()  # kept caches and recorded graphs read these layers
        deepest = max(self.config.exit_layers) if start is None else start
        layers = self.backbone.layers
        freed = 0
        for i in range(deepest, len(layers)):
            if not isinstance(layers[i], ReleasedLayer):
                layers[i] = ReleasedLayer(i, type(layers[i]))
                freed += 1
        return freed

    # --- parameters --------------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        trainable = sum(p.numel() for p in self.heads.parameters() if p.requires_grad)
        heads_total = sum(p.numel() for p in self.heads.parameters())
        backbone = sum(p.numel() for p in self.backbone.model.parameters())
        per_exit = {h.layer: sum(p.numel() for p in h.parameters()) for h in self.heads}
        return {"trainable": trainable, "heads": heads_total, "frozen_backbone": backbone, "per_exit": per_exit}

    # --- the exits directory -----------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write exit_config.json and exit_heads.safetensors atomically: a temporary sibling
        directory is filled, then renamed over `directory`. An existing directory is replaced
        only if it is an exits directory (or empty)."""
        write_exits_dir(directory, self.config, self.heads.state_dict(), self.extra_tensors())

    # --- gates and the ranked vocabulary -------------------------------------------------------
    def gate(self, layer: int):
        """The gate of exit `layer`, or None."""
        return self.gates[str(layer)] if str(layer) in self.gates else None

    @property
    def has_gates(self) -> bool:
        return all(str(k) in self.gates for k in self.exit_layers)

    def set_gates(self, gates: dict) -> None:
        """Attach gates {exit layer: ExitGate}."""
        for k, g in gates.items():
            if k not in self.exit_layers:
                raise EETuneError(f"gate for layer {k}, which is not an exit ({list(self.exit_layers)})")
            self.gates[str(k)] = g

    def extra_tensors(self) -> dict:
        """Gates and ranked vocabulary as flat safetensors entries (saved beside the heads)."""
        out = {}
        for k, g in self.gates.items():
            out[f"{GATE_PREFIX}{k}.weight"] = g.weight
            out[f"{GATE_PREFIX}{k}.bias"] = g.bias
        if self.vocab_by_frequency is not None:
            out[VOCAB_KEY] = self.vocab_by_frequency
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Adapter | None = None,
                        dtype: str | torch.dtype = "fp32", device: str = "cpu",
                        partial: bool = False) -> "EarlyExitModel":
        """Load an exits directory onto `backbone` (default: the base model its config names),
        refusing a backbone whose weights differ from the ones the exits were made for.

        `partial=True` loads the base model only up to the deepest exit (`load_backbone(...,
        up_to_layer=k)`): enough for the exits' logits, not for the final layer's. Exits whose
        fingerprint covers more layers (made before partial loading) load those too."""
        directory = Path(directory)
        config = ExitConfig.load(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise EETuneError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: re-create it with `eetune convert`")
        if backbone is None:
            if not config.base_model:
                raise EETuneError(f"{directory}/{CONFIG_NAME} names no base model: pass the backbone explicitly")
            up_to = None
            if partial:
                covered = config.num_layers if config.fingerprint_layers is None else config.fingerprint_layers
                up_to = max(max(config.exit_layers), covered)
            backbone = load_backbone(config.base_model, dtype=dtype, revision=config.revision, device=device,
                                     up_to_layer=up_to)
        if backbone.num_layers != config.num_layers:
            raise EETuneError(f"backbone has {backbone.num_layers} layers but the exits in {directory} were made for "
                              f"{config.num_layers}: load them on their base model {config.base_model!r}")
        covered = config.fingerprint_layers
        if covered is not None and any(not backbone.is_loaded(i) for i in range(covered)) or \
                covered is None and config.backbone_fingerprint and backbone.released_count():
            raise EETuneError(f"the backbone lacks layers the fingerprint of {directory} covers "
                              f"({covered or config.num_layers}): load more of the model")
        fp = fingerprint(backbone.model, layers=covered)
        if config.backbone_fingerprint and fp != config.backbone_fingerprint:
            raise EETuneError(f"backbone weights do not match the exits in {directory} (fingerprint {fp} != "
                              f"{config.backbone_fingerprint}): load them on their base model {config.base_model!r}")
        state = read_heads(weights)
        extra = {k: state.pop(k) for k in list(state) if k.startswith(GATE_PREFIX) or k == VOCAB_KEY}
        heads = nn.ModuleList()
        for i, k in enumerate(config.exit_layers):
            ids = state.get(f"{i}.vocab_ids")
            if (ids is None) != (config.exit_vocab is None) or ids is not None and ids.numel() != config.exit_vocab:
                raise EETuneError(f"{weights} does not match its config (exit_vocab {config.exit_vocab}, exit {k} has "
                                  f"{'no' if ids is None else ids.numel()} vocabulary ids): re-create the exits "
                                  f"directory")
            if ids is not None:
                try:
                    check_vocab_ids(ids, backbone.vocab_size)
                except EETuneError as e:
                    raise EETuneError(f"{directory}: {e}") from None
            heads.append(ExitHead(backbone, k, config.arch, "copy", config.output_embedding, structure_only=True,
                                  vocab_ids=ids))
        expected = heads.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise EETuneError(f"{weights} does not match its config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}): re-create the exits directory")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise EETuneError(f"{weights}: tensor {k} has shape {tuple(v.shape)} but this backbone needs "
                                  f"{tuple(expected[k].shape)}: load the exits on their base model "
                                  f"{config.base_model!r} or re-create them")
        heads.load_state_dict(state)
        dev = next(backbone.model.parameters()).device
        heads.to(device=dev)
        model = cls(backbone, config, heads)
        model.load_extra_tensors(extra, directory)
        return model

    def load_extra_tensors(self, extra: dict, source="") -> None:
        from eetune.model.gates import ExitGate
        dev = next(self.backbone.model.parameters()).device
        for key, t in extra.items():
            if key == VOCAB_KEY:
                if t.ndim != 1 or t.numel() == 0 or int(t.max()) >= self.backbone.vocab_size or int(t.min()) < 0:
                    raise EETuneError(f"{source}: the ranked vocabulary does not fit this backbone's vocabulary of "
                                      f"{self.backbone.vocab_size}: re-create it with `eetune tune --gates`")
                self.vocab_by_frequency = t.to(device=dev, dtype=torch.long)
                continue
            k, part = key[len(GATE_PREFIX):].rsplit(".", 1)
            if not k.isdigit() or int(k) not in self.exit_layers or part not in ("weight", "bias"):
                raise EETuneError(f"{source}: unexpected tensor {key!r}: re-create the exits directory")
            if k not in self.gates:
                self.gates[k] = ExitGate(self.backbone.hidden_size, device=dev)
            with torch.no_grad():
                getattr(self.gates[k], part).copy_(t.to(dev))
        self.gates.requires_grad_(False)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every submodule of `modules` in eval mode inside the block (no dropout), and afterwards
    each one back in the mode it had before, submodule by submodule (a model whose parts were in
    different modes gets exactly those back). An `EarlyExitModel`'s backbone stays in eval mode
    throughout (`EarlyExitModel.train`)."""
    saved: dict[nn.Module, bool] = {}
    for m in modules:
        for sub in m.modules():
            saved.setdefault(sub, sub.training)
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for sub, mode in saved.items():
            sub.training = mode


GATE_PREFIX = "gate."  # gate.<layer>.weight / .bias in exit_heads.safetensors
VOCAB_KEY = "vocab_by_frequency"  # token ids, most frequent in the tuning data first


def write_exits_dir(directory: str | Path, config: ExitConfig, state: dict, extra: dict | None = None) -> None:
    """Write `config` and the head tensors `state` (plus gates / ranked vocabulary `extra`) as an
    exits directory, atomically."""
    from eetune.fsio import replace_dir, staging_dir

    directory = Path(directory)
    check_output_dir(directory)
    tmp = staging_dir(directory)  # also removes what a crashed earlier write left beside it
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in {**state, **(extra or {})}.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "eetune": "exit_heads",
                                                              "sha256": tensors_digest(tensors)})
        (tmp / CONFIG_NAME).write_text(config.to_json())
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensors_digest(tensors: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (stored in the heads file's
    metadata when written, checked when read: a flipped bit in the data is caught)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_heads(path: Path) -> dict:
    """The tensors of an `exit_heads.safetensors`, refusing (one line each) a file that cannot be
    parsed (truncated, empty, a damaged header), whose content does not match the checksum it was
    written with, or that holds NaN or infinite values."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise EETuneError(f"{path} is unreadable ({first}): it is truncated or corrupt; re-create the exits "
                          f"directory (eetune convert / tune) or copy it again") from None
    want = meta.get("sha256")
    if want is not None and tensors_digest(state) != want:
        raise EETuneError(f"{path} does not match the checksum it was written with: the file is corrupt; copy it "
                          f"again or re-create the exits directory")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise EETuneError(f"{path}: tensor {k} holds NaN or infinite values: tune again (lower --lr) or "
                              f"re-create the exits directory")
    return state


def is_exits_dir(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file()


def check_output_dir(directory: Path) -> None:
    """An output path may be new, empty, or an exits directory (then replaced); nothing else."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise EETuneError(f"output {directory} exists and is a file: choose a new directory")
        if any(directory.iterdir()) and not is_exits_dir(directory):
            raise EETuneError(f"output directory {directory} exists and is not an exits directory: "
                              f"choose a new or empty directory")


# --- the stored calibration (written by eetune.measure.calibrate, read when decoding) --------
def heads_digest(model, gates: bool = False) -> str:
    """A digest of the exit heads' weights (and the gates' with `gates`), canonicalised to bf16 so
    that the same heads loaded in another dtype give the same digest: which heads a calibration
    was measured on. Cached on the model until a tensor is replaced or changed in place."""
    tensors = {f"head.{k}": v for k, v in model.heads.state_dict().items()}
    if gates:
        for k, g in model.gates.items():
            tensors.update({f"gate.{k}.{n}": v for n, v in g.state_dict().items()})
    key = (gates, tuple((n, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype))
                        for n, t in sorted(tensors.items())))
    cached = getattr(model, "_eetune_heads_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.int16).numpy().tobytes())
    digest = "sha256:" + h.hexdigest()[:32]
    model._eetune_heads_digest = (key, digest)
    return digest


def calibrated_thresholds(model, confidence: str) -> tuple[dict | None, str]:
    """The stored calibration's thresholds {exit layer: t} for decoding with `confidence`, and
    "calibrated"; (None, "default ...") when there is none, it was made for another confidence
    measure, or on other heads (or gates). A malformed calibration is a one-line error."""
    cal = model.config.calibration
    if not cal:
        return None, "default"
    if cal.get("confidence") != confidence:
        return None, f"default (the stored calibration is for --confidence {cal.get('confidence')})"
    raw = cal.get("thresholds")
    try:
        chosen = {int(k): float(t) for k, t in raw.items()}
        ok = set(chosen) == set(model.exit_layers) and all(t >= 0 and not math.isnan(t) for t in chosen.values())
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        raise EETuneError(f"the calibration in exit_config.json is malformed (thresholds {raw!r}): run `eetune "
                          f"calibrate` again, remove it, or pass --threshold")
    if cal.get("heads_digest") != heads_digest(model, gates=confidence == "gate"):
        return None, ("default (the stored calibration was measured on other heads or gates: run `eetune calibrate` "
                      "again)")
    return chosen, "calibrated"

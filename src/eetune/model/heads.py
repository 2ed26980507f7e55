"""Exit heads: the small modules attached after backbone layers, and their initialisation.

`h` is the hidden state after backbone layer k (1-based). The four architectures of the
EE-Tuning paper, each ending in an output projection to the vocabulary ("output embedding"):

- `embedding`: logits = W_out h
- `norm`:      logits = W_out norm(h)
- `mlp`:       h' = h + MLP(norm_mlp(h)),   logits = W_out norm(h')
- `layer`:     h' = TransformerLayer(h),    logits = W_out norm(h')   (own KV cache when decoding)

Initialisation `copy` (default): norm <- the backbone's final norm, W_out <- the LM head, the
MLP branch (with its norms) <- that of layer k itself, the `layer` exit <- the backbone's last
decoder layer. `random`: weights normal(0, 0.02), biases 0, norms at identity (w = 1, or w = 0
for Gemma's `(1 + w)` RMSNorm).

Output embedding `copy` gives each exit its own trainable copy of the LM head; `shared` reuses
the frozen backbone LM head, which is not a parameter of the head and is not saved with it.

**Restricted vocabulary** (`vocab_ids`, K token ids): the head projects onto those K tokens plus
one OTHER class that stands for the rest of the vocabulary, so its projection costs K/V of the
full one. Its classes are the K ids in the given order, then OTHER (class K; absent when K is the
whole vocabulary, so K = V is today's head with its rows permuted). The K rows start as the LM
head's rows of those ids (`copy`: the head's own trainable copy; `shared`: gathered once from the
frozen LM head, not saved); the OTHER row (weight and bias) is trainable and starts at zero. A
token leaves at such an exit only when OTHER does not win (`predict`), and the id it emits is
`vocab_ids[class]`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from eetune.model.backbone import Adapter, LayerCache, LayerContext
from eetune.errors import EETuneError

ARCHS = ("embedding", "norm", "mlp", "layer")
INITS = ("copy", "random")
OUTPUT_EMBEDDINGS = ("copy", "shared")


def _reset_random(module: nn.Module, norm_is_offset: bool, std: float = 0.02) -> None:
    """Re-initialise a copied module: Linear/Conv1D/Embedding weights ~ N(0, std), biases 0,
    norm weights at identity."""
    for sub in module.modules():
        name = type(sub).__name__.lower()
        own = dict(sub.named_parameters(recurse=False))
        if "norm" in name:
            if "weight" in own:
                nn.init.constant_(own["weight"], 0.0 if (norm_is_offset and "layernorm" not in name) else 1.0)
            if "bias" in own:
                nn.init.zeros_(own["bias"])
            continue
        for pname, p in own.items():
            if pname == "bias":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)


class ExitHead(nn.Module):
    """One exit after backbone layer `layer` (1-based)."""

    def __init__(self, adapter: Adapter, layer: int, arch: str, init: str, output_embedding: str,
                 structure_only: bool = False, vocab_ids: torch.Tensor | None = None):
        """`structure_only`: the weights are about to be overwritten (loading saved heads), so a
        `layer` exit on a backbone whose last layer is not loaded gets a fresh layer to hold them.
        `vocab_ids`: restrict the output projection to these token ids plus OTHER (see above)."""
        super().__init__()
        self.register_buffer("vocab_ids", None)  # a restricted vocabulary's token ids (restrict_vocab)
        self._derived = None
        self.layer, self.arch, self.output_embedding = layer, arch, output_embedding
        self._adapter = [adapter]  # a list: not registered as a submodule, never saved
        offset = adapter.norm_is_offset
        if arch in ("norm", "mlp", "layer"):
            self.norm = copy.deepcopy(adapter.final_norm)
        if arch == "mlp":
            self.mlp = nn.ModuleList(copy.deepcopy(m) for m in adapter.mlp_block(layer - 1))
        if arch == "layer":
            last = adapter.num_layers - 1
            if adapter.is_loaded(last):
                self.block = copy.deepcopy(adapter.layers[last])
            elif structure_only or init == "random":
                self.block = adapter.build_layer(last)
            else:
                raise EETuneError(f"a `layer` exit copies the backbone's last layer ({last + 1}), which is not "
                                  f"loaded: load it too (convert does), or use --init random")
        if output_embedding == "copy":
            head = adapter.lm_head
            self.out = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False,
                                 dtype=head.weight.dtype, device=head.weight.device)
            with torch.no_grad():
                self.out.weight.copy_(head.weight)
        if init == "random":
            _reset_random(self, offset)
        self.requires_grad_(True)
        if vocab_ids is not None:
            self.restrict_vocab(vocab_ids)

    # --- restricted vocabulary -------------------------------------------------------------------
    @property
    def restricted(self) -> bool:
        return self.vocab_ids is not None

    @property
    def has_other(self) -> bool:
        """Whether the head has an OTHER class (a restricted vocabulary smaller than the model's)."""
        return self.vocab_ids is not None and self.vocab_ids.numel() < self.adapter.vocab_size

    @property
    def num_classes(self) -> int:
        """Width of the head's logits: V, or K (+ 1 for OTHER)."""
        if self.vocab_ids is None:
            return self.adapter.vocab_size
        return self.vocab_ids.numel() + int(self.has_other)

    def restrict_vocab(self, ids: torch.Tensor) -> None:
        """Make this head project onto the token ids `ids` (K distinct ids of the model's
        vocabulary) plus OTHER: the K rows of its current projection (its own copy, tuned or not,
        or the frozen LM head's), and a fresh OTHER row at zero. The transform is kept."""
        V = self.adapter.vocab_size
        ids = check_vocab_ids(ids, V).to(self.adapter.lm_head.weight.device)
        if self.vocab_ids is not None:
            raise EETuneError(f"exit {self.layer} is already restricted to {self.vocab_ids.numel()} tokens: convert "
                              f"the exits again to choose another vocabulary")
        ref = self.adapter.lm_head.weight
        K, H = ids.numel(), ref.shape[1]
        # the head's own dtype (heads may be kept in fp32 over a bf16 backbone)
        dtype = self.out.weight.dtype if self.output_embedding == "copy" else \
            next((p.dtype for p in self.parameters() if p.is_floating_point()), ref.dtype)
        if self.output_embedding == "copy":
            with torch.no_grad():
                rows = self.out.weight[ids]
            self.out = nn.Linear(H, K, bias=False, dtype=dtype, device=ref.device)
            with torch.no_grad():
                self.out.weight.copy_(rows)
        self.register_buffer("vocab_ids", ids.clone(), persistent=True)
        if K < V:
            self.other_weight = nn.Parameter(torch.zeros(H, dtype=dtype, device=ref.device))
            self.other_bias = nn.Parameter(torch.zeros(1, dtype=dtype, device=ref.device))
        self._derived = None

    def _vocab_tables(self) -> dict:
        """Derived, never saved: the shared head's K rows and bias, and id -> class (K: OTHER)."""
        d = getattr(self, "_derived", None)
        ref = self.adapter.lm_head.weight
        key = (self.vocab_ids.data_ptr(), self.vocab_ids._version, self.vocab_ids.device, ref.data_ptr(), ref.dtype,
               ref.device)
        if d is None or d["key"] != key:
            ids = self.vocab_ids.to(ref.device)
            b = getattr(self.adapter.lm_head, "bias", None)
            vmap = torch.full((self.adapter.vocab_size,), ids.numel(), dtype=torch.long, device=ref.device)
            vmap[ids] = torch.arange(ids.numel(), device=ref.device)
            d = self._derived = {"key": key, "vocab_map": vmap, "bias": None if b is None else b.detach()[ids],
                                 "rows": ref.detach()[ids] if self.output_embedding == "shared" else None,
                                 "proj": None}
        return d

    def vocab_map(self) -> torch.Tensor:
        """(V,) the class of every token id: its index among `vocab_ids`, or K (OTHER) outside them."""
        return self._vocab_tables()["vocab_map"]

    def classes_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> this head's classes (outside the restricted vocabulary: OTHER)."""
        if self.vocab_ids is None:
            return token_ids
        return self.vocab_map().to(token_ids.device)[token_ids]

    def tokens_of(self, classes: torch.Tensor) -> torch.Tensor:
        """This head's classes -> token ids; OTHER -> -1."""
        if self.vocab_ids is None:
            return classes
        ids = self.vocab_ids.to(classes.device)
        K = ids.numel()
        return torch.where(classes < K, ids[classes.clamp(max=K - 1)], torch.full_like(classes, -1))

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max softmax probability, top-1 token id) per row of this head's logits (..., C); the
        token is -1 where OTHER wins (the head does not know the token: it must go deeper)."""
        lf = logits.float()
        conf = lf.softmax(-1).amax(-1)
        return conf, self.tokens_of(lf.argmax(-1))

    def to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the model's whole vocabulary (..., V), for choosing or sampling a token that
        leaves here: the K tokens' logits at their ids, -inf elsewhere (OTHER is not a token)."""
        if self.vocab_ids is None:
            return logits
        K = self.vocab_ids.numel()
        out = torch.full((*logits.shape[:-1], self.adapter.vocab_size), float("-inf"), dtype=logits.dtype,
                         device=logits.device)
        return out.index_copy_(-1, self.vocab_ids.to(logits.device), logits[..., :K])

    @property
    def adapter(self) -> Adapter:
        return self._adapter[0]

    def out_weight(self) -> torch.Tensor:
        """The output projection's weight (C, H): the LM head (or this exit's copy), or for a
        restricted vocabulary its K rows then the OTHER row."""
        return self.projection()[0]

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (C, H), bias (C,) or None) of the output projection. Restricted heads build
        theirs from the K rows and the OTHER row; without gradient it is cached until a tensor it
        is made from changes (in place or replaced)."""
        if self.vocab_ids is None:
            w = self.out.weight if self.output_embedding == "copy" else self.adapter.lm_head.weight
            return w, getattr(self.adapter.lm_head, "bias", None)
        d = self._vocab_tables()
        rows = self.out.weight if self.output_embedding == "copy" else d["rows"]
        if not self.has_other:
            return rows, d["bias"]
        ow, ob = self.other_weight, self.other_bias
        grad = torch.is_grad_enabled() and (rows.requires_grad or ow.requires_grad or ob.requires_grad)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (rows, ow, ob))
        if not grad and d["proj"] is not None and d["proj"][0] == key:
            return d["proj"][1], d["proj"][2]
        w = torch.cat([rows, ow[None].to(rows.dtype)], 0)
        bias = d["bias"]
        b = torch.cat([torch.zeros(rows.shape[0], dtype=ob.dtype, device=ob.device) if bias is None
                       else bias.to(ob.dtype), ob], 0)
        if not grad:
            d["proj"] = (key, w, b)
        return w, b

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (..., C) of the exit's normed hidden state `z` (with the model's soft-capping)."""
        w, b = self.projection()
        return self.adapter.logits(z, w, b)

    def transform(self, hidden: torch.Tensor, ctx: LayerContext | None = None,
                  cache: LayerCache | None = None) -> torch.Tensor:
        """The exit's hidden state just before the output projection."""
        h = hidden
        if self.arch == "mlp":
            branch = h
            for m in self.mlp:
                branch = m(branch)
            h = h + branch
        elif self.arch == "layer":
            last = self.adapter.num_layers - 1
            h = self.adapter.call_layer(self.block, last, h, ctx, cache, last)
        if self.arch != "embedding":
            h = self.norm(h)
        return h

    def forward(self, hidden: torch.Tensor, ctx: LayerContext | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        return self.project(self.transform(hidden, ctx, cache))


def check_vocab_ids(ids, vocab_size: int) -> torch.Tensor:
    """`ids` as a 1-D long tensor of distinct token ids of a `vocab_size` vocabulary, or a
    one-line refusal."""
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point():
        raise EETuneError(f"an exit vocabulary must be a non-empty list of token ids, got shape {tuple(ids.shape)}: "
                          f"re-create the exits with --exit-vocab K")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise EETuneError(f"the exit vocabulary holds token ids outside this model's vocabulary of {vocab_size} "
                          f"(max {int(ids.max())}): the exits were made for another model; re-create them")
    if torch.unique(ids).numel() != ids.numel():
        raise EETuneError("the exit vocabulary repeats token ids: re-create the exits with --exit-vocab K")
    return ids


def parse_exit_vocab(spec, vocab_size: int) -> int | None:
    """`--exit-vocab K`: an integer 1..V (`2k`, `4096`), `all`/the vocabulary size for the full
    vocabulary (None). Anything else is a one-line error."""
    text = str(spec).strip().lower()
    if text in ("all", "full"):
        return None
    mult = 1
    if text.endswith("k"):
        text, mult = text[:-1], 1024
    try:
        k = int(text) * mult
    except ValueError:
        raise EETuneError(f"--exit-vocab {spec!r} is not a number: give a token count such as 4096 or 4k, or "
                          f"`all`") from None
    if k < 1:
        raise EETuneError(f"--exit-vocab {spec!r} must be at least 1: give a token count such as 4096, or `all`")
    if k > vocab_size:
        raise EETuneError(f"--exit-vocab {spec!r} is larger than the model's vocabulary of {vocab_size}: give at "
                          f"most {vocab_size}, or `all`")
    return k

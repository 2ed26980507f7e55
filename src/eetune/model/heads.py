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
                 structure_only: bool = False):
        """`structure_only`: the weights are about to be overwritten (loading saved heads), so a
        `layer` exit on a backbone whose last layer is not loaded gets a fresh layer to hold them."""
        super().__init__()
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

    @property
    def adapter(self) -> Adapter:
        return self._adapter[0]

    def out_weight(self) -> torch.Tensor:
        return self.out.weight if self.output_embedding == "copy" else self.adapter.lm_head.weight

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
        return self.adapter.logits(self.transform(hidden, ctx, cache), self.out_weight())

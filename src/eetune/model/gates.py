"""The exit gate module: a logistic probe on an exit's input hidden state that predicts whether
the exit's top-1 token equals the final layer's (CALM's learned early-exit classifier). Decoding
with `confidence="gate"` runs it before an exit's head, and the head only where it fires.
Fitting gates is `eetune.train.gates`; they are stored in exit_heads.safetensors as
`gate.<layer>.weight` / `.bias`.

The probe reads the hidden state divided by its root mean square (no learned scale): the
residual stream of many models carries a few huge coordinates and a norm that grows with depth,
which a raw linear probe would have to fight. Its output is `sigmoid(w . h/rms(h) + b)`.
"""

from __future__ import annotations

import torch
from torch import nn


class ExitGate(nn.Module):
    """`p(exit k's top-1 == final top-1 | h)`, a logistic probe on the RMS-normalised hidden state."""

    def __init__(self, hidden_size: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(1, device=device))

    @staticmethod
    def features(h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """Gate logits for hidden states (..., H) -> (...)."""
        return self.features(h) @ self.weight + self.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Gate probability in [0, 1] for hidden states (..., H) -> (...)."""
        return torch.sigmoid(self.logit(h))

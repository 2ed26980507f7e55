"""Gates: learned exit decisions (CALM's "early-exit classifier", for decoder LMs).

A gate is a linear probe on an exit's *input* hidden state (the trunk's hidden state after
layer k) that predicts whether the exit's top-1 token equals the final layer's top-1 token.
Decoding with `--confidence gate` evaluates the gate first and runs the exit's head (its MLP and
its vocabulary projection) only when the gate fires, so a token that does not leave pays one
dot product at that exit instead of a 49,152-row matrix product.

The probe reads the hidden state divided by its root mean square (no learned scale): the
residual stream of many models carries a few huge coordinates and a norm that grows with
depth, which a raw linear probe would have to fight. On a fixed input this is still a linear
function of the direction of `h`; the gate's output is `sigmoid(w . h/rms(h) + b)`.

Training (`train_gates`, behind `eetune tune --gates` and `--gates-only`) keeps backbone and
heads frozen and fits the probes by logistic regression on labels from the final layer;
`gate_report` measures them on held-out blocks against the exit's own max-softmax confidence.

    from eetune.gates import train_gates, gate_report
    summary = train_gates(model, train_blocks, val_blocks)   # attaches model.gates
    report = gate_report(model, other_blocks)                 # coverage / precision per threshold
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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


# --- training and reporting ------------------------------------------------------------------
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

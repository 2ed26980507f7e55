"""Few-row products on the CPU: the same `x @ W^T`, computed as `(W @ x^T)^T`.

Decoding multiplies a handful of rows (one token, a self-spec round's draft chain under
verification, exited tokens climbing on) by large frozen weights. On the CPU, `F.linear` takes
MKL's paths for so few rows, and on this project's 2-core machine (AMD EPYC, MKL 2024.2, fp32)
they are slow in two ways, measured by `benchmarks/row_products.py`:

- one row is a matrix-vector product that runs on one thread;
- 2-5 rows cost 2-4x one row (Gemma-3's 262k-row LM head: 66 ms for one row, 170-230 ms for
  three to five), so verifying a draft chain paid the head several times over.

`W @ x^T` with at least two columns is a gemm that splits W's rows across the threads and reads
W once for all columns: one row (padded to two) then costs 0.7-1.0x, and five rows about 1.2x
what one row did. Only the order of summation differs from `F.linear` (results agree to ~1e-6
relative; `tests/test_rows.py` holds them to it).

`few_rows(model)` turns it on for the backbone's `nn.Linear` layers (their class is swapped to
`FewRowsLinear`, a subclass with the same parameters) and for `Adapter.logits` while the engine
decodes, and restores them after; nested and concurrent users (the server's threads) are
counted. Off the CPU, for other dtypes than fp32 and above `MAX_ROWS` rows (`MAX_ROWS_LARGE`
for weights of an LM head's size) it is `F.linear`.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

MAX_ROWS = 5  # measured: at 8 rows F.linear is as fast on the decoder layers' weights ...
MAX_ROWS_LARGE = 8  # ... but not on an LM head's (LARGE: at least 16M elements)
LARGE = 1 << 24
_lock = threading.Lock()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as `(weight @ x^T)^T` when x holds 1..MAX_ROWS rows of fp32
    on the CPU (MAX_ROWS_LARGE for an LM head's size; one row is padded to two: the gemm, not the single-thread gemv)."""
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    most = MAX_ROWS_LARGE if weight.numel() >= LARGE else MAX_ROWS
    if (not 0 < n <= most or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32):
        return nn.functional.linear(x, weight, bias)
    x2 = x.reshape(n, x.shape[-1])
    if n == 1:
        x2 = torch.cat([x2, x2])
    y = torch.mm(weight, x2.t()).t()[:n]  # x2.t() is column-major: MKL reads it as is
    y = y.contiguous()  # HF code views the outputs
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class FewRowsLinear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` above (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def few_rows(model):
    """While inside, the backbone's `nn.Linear` layers and its `logits` use `linear` (on the CPU
    only: on other devices nothing changes). Counted per backbone, so nested and concurrent
    users share one switch and the last one out restores plain `nn.Linear`."""
    bb = model.backbone if hasattr(model, "backbone") else model
    if bb.lm_head.weight.device.type != "cpu":
        yield
        return
    with _lock:
        bb._few_rows = getattr(bb, "_few_rows", 0) + 1
        if bb._few_rows == 1:
            _swap(bb.model, nn.Linear, FewRowsLinear)
    try:
        yield
    finally:
        with _lock:
            bb._few_rows -= 1
            if bb._few_rows == 0:
                _swap(bb.model, FewRowsLinear, nn.Linear)


def _swap(module: nn.Module, old: type, new: type) -> None:
    for m in module.modules():
        if type(m) is old:
            m.__class__ = new

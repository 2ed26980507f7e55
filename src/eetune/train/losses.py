"""Exit losses computed a chunk of tokens at a time, so the (tokens x vocabulary) logits are never
held whole.

A tuning step's memory is dominated by vocabulary-sized buffers: for every exit its logits, their
log-softmax and the gradient of both, each `tokens x vocabulary` floats (2048 tokens x 49,152 on
SmolLM2 are 400 MB apiece), and with distillation the final layer's logits and log-probabilities
too. `chunked_exit_loss` computes, for `chunk` rows at a time, the exit's logits from its hidden
state and output weight, the loss (cross-entropy, the paper's dynamic token weighting, KL from
the final layer's distribution computed from its own hidden state, or a mix) and at once the
loss's gradients with respect to the hidden state and the output weight, which backward then
only scales. The FLOPs are those of an ordinary forward and backward (no recomputation); the
memory is one chunk's few buffers plus the two gradients.

`exit_loss_reference` is the slow, obvious version (whole logits, autograd), kept to test this
one against (tests/test_losses.py): same loss and gradients within float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            dtype: torch.dtype) -> torch.Tensor:
    """Logits in fp32 of hidden states `h` (n, H) under an output projection computed in `dtype`
    (the compute dtype, as autocast would), with the model's final-logit soft-capping."""
    z = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


class _ChunkedExitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias, softcap, alpha, dynamic, chunk,
                dtype):
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        with torch.autocast(h.device.type, enabled=False):  # casts are explicit: `dtype` for the logits
            return _ChunkedExitLoss._forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias,
                                             softcap, alpha, dynamic, chunk, dtype)

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias, softcap, alpha, dynamic, chunk,
                 dtype):
        n = h.shape[0]
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        ce_total = torch.zeros((), dtype=torch.float64, device=h.device)
        w_c = weight.to(dtype)  # cast once per exit, not per chunk
        fw_c = final_weight.to(dtype) if alpha > 0 else None
        for a in range(0, n, chunk):
            hc, t = h[a:a + chunk], targets[a:a + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            z = project(hc, w_c, bias, softcap, dtype)
            lse = torch.logsumexp(z, -1)
            p = torch.exp(z - lse[:, None])
            ce = lse - z[rows, t]
            ce_total += ce.sum(dtype=torch.float64)
            g = p.clone()
            g[rows, t] -= 1.0  # d ce / d z
            if dynamic:  # the exit's detached confidence weights each token's CE
                conf = torch.exp(z.amax(-1) - lse)
                part = (conf * ce).sum(dtype=torch.float64)
                g *= conf[:, None]
            else:
                part = ce.sum(dtype=torch.float64)
            part = (1 - alpha) * part
            g *= 1 - alpha
            if alpha > 0:
                log_pf = torch.log_softmax(project(final_h[a:a + chunk], fw_c, final_bias, softcap, dtype), -1)
                pf = torch.exp(log_pf)
                part = part + alpha * (pf * (log_pf - (z - lse[:, None]))).sum(dtype=torch.float64)
                g += alpha * (p - pf)  # d KL(final || exit) / d z
                del log_pf, pf
            g /= n
            if softcap is not None:
                g *= 1 - (z / softcap) ** 2  # through z = c tanh(u / c)
            total += part
            grad_h[a:a + chunk] = g.to(dtype) @ w_c  # in the compute dtype, as autocast's backward
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc.float())  # in place: no second vocab x hidden buffer
            del z, p, g, lse
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w = grad_w is not None
        ce_mean = (ce_total / n).float()
        ctx.mark_non_differentiable(ce_mean)
        return (total / n).float(), ce_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_loss * grad_h).to(ctx.h_dtype)
        gw = (grad_loss * grad_w).to(ctx.w_dtype) if ctx.has_w else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def chunked_exit_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      final_h: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
                      final_bias: torch.Tensor | None = None, softcap: float | None = None, alpha: float = 0.0,
                      dynamic: bool = False, chunk: int = 256,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, plain mean CE) of one exit over `h` (n, H), the exit's hidden states
    just before its output projection `weight` (V, H) (+ frozen `bias`), and next tokens `targets`
    (n,). With `alpha > 0` the loss is (1 - alpha) CE + alpha KL(final || exit), the final layer's
    distribution computed from its normed hidden states `final_h` (n, H) and the LM head
    `final_weight`/`final_bias`. `dynamic`: each token's CE is scaled by the exit's detached
    max-softmax probability. Only `h` and `weight` get gradients."""
    if alpha > 0 and (final_h is None or final_weight is None):
        raise ValueError("distillation (alpha > 0) needs the final layer's hidden states and LM head")
    loss, ce = _ChunkedExitLoss.apply(h, weight, bias, targets, final_h, final_weight, final_bias, softcap,
                                      float(alpha), bool(dynamic), int(chunk), dtype)
    return loss, ce


def exit_loss_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        final_h: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
                        final_bias: torch.Tensor | None = None, softcap: float | None = None, alpha: float = 0.0,
                        dynamic: bool = False, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same loss, whole: every logit materialised and differentiated by autograd."""
    z = project(h, weight, bias, softcap, dtype)
    ce = F.cross_entropy(z, targets, reduction="none")
    if dynamic:
        with torch.no_grad():
            conf = torch.exp(z.amax(-1) - torch.logsumexp(z, -1))
        loss = (conf * ce).mean()
    else:
        loss = ce.mean()
    if alpha > 0:
        ref = F.log_softmax(project(final_h, final_weight, final_bias, softcap, dtype), -1)
        kl = F.kl_div(F.log_softmax(z, -1), ref, log_target=True, reduction="sum") / z.shape[0]
        loss = (1 - alpha) * loss + alpha * kl
    return loss, ce.mean().detach()


@torch.no_grad()
def chunked_eval(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 reference_top1: torch.Tensor | None, softcap: float | None = None, chunk: int = 256,
                 dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """(summed next-token CE, number of rows whose top-1 equals `reference_top1`) over `h` (n, H),
    a chunk of rows at a time."""
    ce_sum, agree = 0.0, 0
    for a in range(0, h.shape[0], chunk):
        z = project(h[a:a + chunk], weight, bias, softcap, dtype)
        ce_sum += F.cross_entropy(z, targets[a:a + chunk], reduction="sum").item()
        if reference_top1 is not None:
            agree += (z.argmax(-1) == reference_top1[a:a + chunk]).sum().item()
    return ce_sum, agree

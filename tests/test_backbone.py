"""Backbone adapters against the HF models' own forward passes, for every supported family."""

import copy

import pytest
import torch

from eetune.model.backbone import LayerCache, adapter_for, fingerprint
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel, positions_from_mask

from conftest import L, V, tiny_backbone, tiny_model


def hf_reference(bb, ids, mask=None):
    out = bb.model(ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states


def test_norm_exit_after_last_layer_reproduces_backbone(family):
    bb = tiny_backbone(family)
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(1))
    ref_logits, _ = hf_reference(bb, ids)
    model = EarlyExitModel.convert(bb, [L], arch="norm", init="copy", output_embedding="copy")
    got = model(ids).exit_logits[L]
    assert (got - ref_logits).abs().max().item() <= 1e-5


def test_layer_exit_after_second_to_last_layer_reproduces_backbone(family):
    # A copied `layer` exit after layer L-1 is the backbone's last layer + final norm + head.
    bb = tiny_backbone(family)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(2))
    ref_logits, _ = hf_reference(bb, ids)
    model = EarlyExitModel.convert(bb, [L - 1], arch="layer", output_embedding="shared")
    got = model(ids).exit_logits[L - 1]
    assert (got - ref_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["embedding", "norm", "mlp"])
def test_exit_logits_match_reference_from_hidden_states(family, arch):
    bb = tiny_backbone(family)
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
    _, hs = hf_reference(bb, ids)
    model = EarlyExitModel.convert(bb, [1, 3], arch=arch)
    out = model(ids, return_hidden=True)
    cap = getattr(bb.config, "final_logit_softcapping", None)
    for k in (1, 3):
        h = hs[k]  # HF: output of layer k (k < L is never normed)
        assert torch.allclose(out.exit_hidden[k], h, atol=1e-5)
        if arch == "mlp":  # the feed-forward branch of layer k, taken from the HF model itself
            branch = h
            for m in bb.mlp_block(k - 1):
                branch = m(branch)
            h = h + branch
        if arch != "embedding":
            h = bb.final_norm(h)
        ref = h @ bb.lm_head.weight.T
        if cap is not None:
            ref = torch.tanh(ref / cap) * cap
        assert (out.exit_logits[k] - ref).abs().max().item() <= 1e-5


def test_trunk_stops_at_deepest_exit(family):
    bb = tiny_backbone(family)
    calls = [0] * L
    for i, layer in enumerate(bb.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    model = EarlyExitModel.convert(bb, [1, 2], arch="mlp")
    model(torch.randint(0, V, (1, 5)))
    assert calls == [1, 1, 0, 0]
    model(torch.randint(0, V, (1, 5)), final=True)
    assert calls == [2, 2, 1, 1]


def test_left_padding_matches_unpadded(family):
    bb = tiny_backbone(family)
    ids = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = EarlyExitModel.convert(bb, [2, L]).forward(ids).exit_logits
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    got = EarlyExitModel.convert(bb, [2, L]).forward(padded, attention_mask=mask).exit_logits
    for k in (2, L):
        assert (got[k][:, pad:] - ref[k]).abs().max().item() <= 1e-5


def test_cached_chunks_match_full_sequence(family):
    """Running the layers chunk by chunk with a LayerCache equals one pass over the whole
    sequence (longer than the sliding windows of the tiny Mistral/Gemma configs)."""
    bb = tiny_backbone(family)
    T = 17
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    pos = positions_from_mask(None, ids)
    h = bb.embed(ids, pos)
    full = bb.run_layers(h, 0, L, bb.context(h, pos))
    cache = LayerCache(L)
    outs = []
    for a, b in [(0, 7), (7, 8), (8, 12), (12, 17)]:
        p = pos[:, a:b]
        hc = bb.embed(ids[:, a:b], p)
        outs.append(bb.run_layers(hc, 0, L, bb.context(hc, p), cache))
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5
    assert all(cache.length(i) == T for i in range(L))


def test_cache_layers_may_hold_different_lengths():
    bb = tiny_backbone("llama")
    ids = torch.randint(0, V, (1, 6))
    pos = positions_from_mask(None, ids)
    cache = LayerCache(L)
    h = bb.embed(ids, pos)
    bb.run_layers(h, 0, 2, bb.context(h, pos), cache)
    assert [cache.length(i) for i in range(L)] == [6, 6, 0, 0]


def test_unsupported_architecture_is_refused():
    from transformers import BertConfig, BertForMaskedLM
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(EETuneError, match="unsupported architecture 'BertForMaskedLM'"):
        adapter_for(bert)


def test_fingerprint_is_stable_and_sensitive():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) == fingerprint(copy.deepcopy(a).to(torch.bfloat16))  # same weights loaded in bf16
    c = tiny_model("llama", seed=1)
    assert fingerprint(a) != fingerprint(c)
    with torch.no_grad():
        b.model.layers[2].mlp.up_proj.weight.mul_(1.5)
    assert fingerprint(a) != fingerprint(b)

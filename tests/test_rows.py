"""eetune.model.rows: few-row products as `(W @ x^T)^T` on the CPU against `F.linear` (the slow,
obvious reference), the switch that turns them on for a backbone, and the engine decoding with
them against the reference decoder (which never uses them)."""

import threading

import pytest
import torch
from torch import nn

from eetune.decode import DecodeOptions, generate
from eetune.model import rows
from eetune.model.early_exit import EarlyExitModel

from conftest import peaky_backbone
from reference import reference_generate


@pytest.mark.parametrize("shape", [(1, 7), (2, 7), (3, 7), (5, 7), (1, 1, 7), (2, 3, 7), (1, 4, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out", [3, 50])
def test_linear_equals_f_linear(shape, bias, out):
    g = torch.Generator().manual_seed(sum(shape) + out)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out, shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    y = rows.linear(x, w, b)
    ref = nn.functional.linear(x, w, b)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.view(*shape[:-1], out)  # HF code views projection outputs: they must be contiguous


def test_large_weights_take_more_rows_and_small_ones_fall_back(monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[0].shape) or real_mm(*a))
    small = torch.randn(4, 6)
    rows.linear(torch.randn(rows.MAX_ROWS + 1, 6), small)
    assert calls == []  # beyond MAX_ROWS: F.linear
    monkeypatch.setattr(rows, "LARGE", small.numel())
    y = rows.linear(x := torch.randn(rows.MAX_ROWS_LARGE, 6), small)
    assert calls == [small.shape]
    torch.testing.assert_close(y, nn.functional.linear(x, small))
    calls.clear()
    rows.linear(torch.randn(rows.MAX_ROWS_LARGE + 1, 6), small)
    assert calls == []


@pytest.mark.parametrize("case", ["bf16", "empty", "int"])
def test_other_inputs_are_f_linear(case, monkeypatch):
    monkeypatch.setattr(torch, "mm", lambda *a: pytest.fail("rows.linear took the mm path"))
    if case == "bf16":
        x, w = torch.randn(2, 6, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.bfloat16)
    elif case == "empty":
        x, w = torch.randn(0, 6), torch.randn(4, 6)
    else:
        x, w = torch.randn(2, 6), torch.randn(4, 6)
        x = x.double()
        w = w.double()
    torch.testing.assert_close(rows.linear(x, w), nn.functional.linear(x, w))


def linear_classes(bb):
    return {type(m) for m in bb.model.modules() if isinstance(m, nn.Linear)}


def test_few_rows_swaps_and_restores_nested_and_across_threads():
    model = EarlyExitModel.convert(peaky_backbone("llama"), [1, 3], arch="norm")
    bb = model.backbone
    assert linear_classes(bb) == {nn.Linear}
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    with rows.few_rows(model):
        assert linear_classes(bb) == {rows.FewRowsLinear}
        inside = threading.Event()
        leave = threading.Event()

        def other():
            with rows.few_rows(model):
                inside.set()
                leave.wait(5)
        t = threading.Thread(target=other)
        t.start()
        inside.wait(5)
        with rows.few_rows(model):
            pass
        assert linear_classes(bb) == {rows.FewRowsLinear}  # the thread is still inside
    assert linear_classes(bb) == {rows.FewRowsLinear}
    leave.set()
    t.join()
    assert linear_classes(bb) == {nn.Linear}  # the last one out restored them
    assert all(torch.equal(v, bb.model.state_dict()[k]) for k, v in state.items())


def test_few_rows_restores_after_an_error():
    model = EarlyExitModel.convert(peaky_backbone("llama"), [1, 3], arch="norm")
    with pytest.raises(RuntimeError):
        with rows.few_rows(model):
            raise RuntimeError("boom")
    assert linear_classes(model.backbone) == {nn.Linear}


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_engine_with_few_rows_equals_reference(family, monkeypatch):
    """Every decoding product of the engine within rows.linear's reach (monkeypatched wider so
    the prefill takes it too), logits and tokens against the reference decoder's F.linear."""
    monkeypatch.setattr(rows, "MAX_ROWS", 64)
    calls = []
    real = rows.linear
    monkeypatch.setattr(rows, "linear", lambda *a: calls.append(1) or real(*a))
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 3], arch="mlp")
    prompt = [5, 17, 33, 2, 9, 41, 8]
    for kw in ({"mode": "full"}, {"mode": "early-exit", "threshold": 0.6},
               {"mode": "self-spec", "threshold": 0.3, "draft_len": 3}):
        opts = DecodeOptions(max_new_tokens=12, record_logits=True, **kw)
        g = generate(model, [prompt], opts)
        ref = reference_generate(model, [prompt], opts)
        assert g.rows[0].ids == ref.rows[0].ids, kw
        assert [t.exit_layer for t in g.rows[0].tokens] == [t.exit_layer for t in ref.rows[0].tokens], kw
        for (s1, _, x1), (s2, _, x2) in zip(g.step_logits, ref.step_logits):
            assert s1 == s2 and (x1 - x2).abs().max().item() <= 1e-4, kw
    assert calls, "rows.linear was never called"
    assert linear_classes(model.backbone) == {nn.Linear}

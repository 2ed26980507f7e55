"""The graph engine (graphs.py) against the reference engine (decode.py): same tokens, logits
within tolerance, every mode and family, batches, gates, `layer` exits, joins past the largest
recorded bucket, graphs reused across requests. On a CPU the static-shape functions run
unrecorded; where CUDA is present the same checks run on the GPU with recorded graphs (fp32:
same greedy tokens as the reference; bf16: logits within a stated tolerance; self-spec
identical to full)."""

import pytest
import torch

from eetune import graphs
from eetune.decode import DecodeOptions, generate
from eetune.gates import ExitGate
from eetune.model import EarlyExitModel

from conftest import FAMILIES, H, L, V, peaky_backbone
from test_engine import PROMPTS, assert_same, ids_of

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
BF16_TOL = 0.1  # bf16 logits of the graph engine vs the reference engine, same device (|logits| ~ 10)


def model_on(family, exits=(1, 3), arch="mlp", device="cpu", dtype=torch.float32, scale=8.0):
    bb = peaky_backbone(family, scale=scale)
    bb.model.to(device=device, dtype=dtype)
    return EarlyExitModel.convert(bb, list(exits), arch=arch)


def mixing_threshold(model, prompt, n=30, layer=1, q=0.5):
    """A max-prob threshold at a quantile of exit `layer`'s confidence along the full output."""
    from eetune.decode import confidence
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=n)).rows[0].ids
    ids = torch.tensor([prompt + full], device=model.backbone.lm_head.weight.device)
    conf = confidence(model(ids).exit_logits[layer][0, len(prompt):], "max-prob")
    return conf.float().quantile(q).item()


def pair(model, prompts, **kw):
    opts = dict(kw, record_logits=True)
    g = generate(model, prompts, DecodeOptions(engine="graphs", **opts))
    opts.pop("compile", None)
    ref = generate(model, prompts, DecodeOptions(engine="reference", **opts))
    return g, ref


def gated(model, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    dev = model.backbone.lm_head.weight.device
    gates = {}
    for k in model.exit_layers:
        gate = ExitGate(H, device=dev)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(H, generator=g).to(dev))
            gate.bias.fill_(bias)
        gates[k] = gate
    model.set_gates(gates)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_equal_reference_every_mode(family, device):
    model = model_on(family, device=device)
    thr = mixing_threshold(model, PROMPTS[0])
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1 and a left-padded batch
        full, ref = pair(model, prompts, mode="full", max_new_tokens=20)
        assert_same(full, ref)
        g, ref = pair(model, prompts, mode="early-exit", threshold=thr, max_new_tokens=30)
        assert_same(g, ref)
        assert {t.exit_layer for r in g.rows for t in r.tokens} >= {1, L}  # exits mixed
        g, ref = pair(model, prompts, mode="self-spec", threshold=0.3, draft_len=3, max_new_tokens=20)
        assert ids_of(g) == ids_of(ref) == ids_of(full)
        assert g.drafted > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["norm", "layer"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_graphs_other_heads(family, arch, device):
    model = model_on(family, (1, 2), arch=arch, device=device)
    thr = mixing_threshold(model, PROMPTS[2], q=0.4)
    assert_same(*pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=24))
    g, ref = pair(model, PROMPTS, mode="self-spec", threshold=0.2, draft_len=4, max_new_tokens=16)
    assert ids_of(g) == ids_of(ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_graphs_gate_mode(family, device):
    model = gated(model_on(family, device=device))
    g, ref = pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.6, max_new_tokens=30)
    assert_same(g, ref)
    assert len({t.exit_layer for r in g.rows for t in r.tokens}) >= 2
    g, ref = pair(model, PROMPTS, mode="self-spec", confidence="gate", threshold=0.4, max_new_tokens=20)
    assert ids_of(g) == ids_of(ref)


def test_graphs_gate_skips_the_head_when_it_does_not_fire():
    model = gated(model_on("llama"), bias=-50.0)
    calls = []
    for head in model.heads:
        for sub in head.mlp:
            sub.register_forward_pre_hook(lambda m, a: calls.append("mlp"))
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=0.5,
                                               max_new_tokens=8, engine="graphs"))
    assert calls == [] and all(t.exit_layer == L for r in g.rows for t in r.tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_graphs_other_confidences_and_options(device):
    """margin / entropy, the screened max-prob and the gate prefilter (uncaptured decisions),
    sampling with a seed, the draft vocabulary."""
    model = model_on("qwen2", device=device)
    model.vocab_by_frequency = torch.arange(V, device=device).flip(0)
    for conf in ("margin", "entropy"):
        assert_same(*pair(model, PROMPTS, mode="early-exit", confidence=conf, threshold=0.3, max_new_tokens=20))
    thr = mixing_threshold(model, PROMPTS[0])
    assert_same(*pair(model, PROMPTS, mode="early-exit", threshold=thr, screen_vocab=30, max_new_tokens=20))
    gated(model, seed=3)
    assert_same(*pair(model, PROMPTS, mode="early-exit", threshold=thr, gate_filter=0.5, max_new_tokens=20))
    for mode, kw in (("full", {}), ("early-exit", {"threshold": 0.5}), ("self-spec", {"threshold": 0.2})):
        g, ref = pair(model, PROMPTS, mode=mode, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=16, **kw)
        assert ids_of(g) == ids_of(ref), mode
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20)))
    for k in (1, 10, V):
        g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_vocab=k,
                                                   max_new_tokens=20, engine="graphs"))
        assert ids_of(g) == full, k


def test_graphs_exit_after_last_layer():
    for arch in ("mlp", "layer"):
        model = model_on("llama", (1, L), arch=arch)
        assert_same(*pair(model, PROMPTS, mode="early-exit", threshold=0.6, max_new_tokens=16))
        g, ref = pair(model, PROMPTS, mode="self-spec", threshold=0.3, draft_exit=1, max_new_tokens=12)
        assert ids_of(g) == ids_of(ref)


def test_joins_past_the_largest_bucket_run_unrecorded(monkeypatch):
    """KV recomputation joins more tokens than the largest recorded bucket: those segments run
    the same function unrecorded, with the same result."""
    monkeypatch.setattr(graphs, "BUCKETS", (1, 2))
    model = model_on("llama", (1, 3))
    thr = mixing_threshold(model, PROMPTS[0], q=0.3)
    seen = []
    orig = graphs.GraphEngine._segment_fn

    def spy(self, lo, hi, x, Q, *a):
        seen.append(Q)
        return orig(self, lo, hi, x, Q, *a)
    monkeypatch.setattr(graphs.GraphEngine, "_segment_fn", spy)
    g, ref = pair(model, [PROMPTS[0]], mode="early-exit", threshold=thr, max_new_tokens=40)
    assert_same(g, ref)
    assert max(seen[1:]) > 2  # some join ran past the buckets (seen[0] is the prompt)


def test_replayed_decisions_match_the_lean_engine():
    """Benchmarks force exit decisions (early-exit) and rounds (self-spec): the graph engine
    takes exactly the recorded decisions, as the lean engine does."""
    model = gated(model_on("llama", (1, 2)))
    trace = (L, 1, 2, 1, 1, L, 2, L, 1, L, L, 1)
    for conf in ("gate", "max-prob"):
        kw = dict(mode="early-exit", confidence=conf, threshold=0.5, max_new_tokens=len(trace), replay=trace)
        g = generate(model, [PROMPTS[0]], DecodeOptions(engine="graphs", **kw))
        lean = generate(model, [PROMPTS[0]], DecodeOptions(engine="lean", **kw))
        assert [t.exit_layer for t in g.rows[0].tokens] == list(trace)
        assert ids_of(g) == ids_of(lean)
    rounds = ((3, 2), (3, 0), (3, 3), (2, 1))
    kw = dict(mode="self-spec", threshold=0.0, draft_len=3, draft_exit=2, max_new_tokens=12, replay=rounds)
    g = generate(model, [PROMPTS[0]], DecodeOptions(engine="graphs", **kw))
    lean = generate(model, [PROMPTS[0]], DecodeOptions(engine="lean", **kw))
    assert g.round_log == lean.round_log and ids_of(g) == ids_of(lean)
    # gates that never fire: the recorded rounds still stand, in both engines (review finding: the
    # lean engine ANDed the recorded decision with the gate's)
    gated(model, bias=-50.0)
    kw.update(confidence="gate", threshold=0.5)
    g = generate(model, [PROMPTS[0]], DecodeOptions(engine="graphs", **kw))
    lean = generate(model, [PROMPTS[0]], DecodeOptions(engine="lean", **kw))
    assert lean.round_log[:4] == list(rounds) and g.round_log == lean.round_log and ids_of(g) == ids_of(lean)


def test_graph_state_is_reused_and_renewed():
    """A second request of the same geometry reuses the recorded functions (and their caches),
    whatever its prompt; other options or other heads build what they need."""
    model = model_on("llama")
    generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=0.5, max_new_tokens=10, engine="graphs"))
    state = model._eetune_graphs
    n = len(state.graphs)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    assert_same(*pair(model, prompts, mode="early-exit", threshold=0.5, max_new_tokens=10))
    assert model._eetune_graphs is state and len(state.graphs) >= n
    assert_same(*pair(model, prompts, mode="early-exit", confidence="entropy", threshold=0.2, max_new_tokens=10))
    model.heads[0] = type(model.heads[0])(model.backbone, 1, "norm", "copy", "shared")
    assert_same(*pair(model, prompts, mode="early-exit", threshold=0.5, max_new_tokens=10))
    assert model._eetune_graphs is not state


def test_compiled_segments_equal_reference():
    """--compile: the segments are fused by torch.compile before being recorded (on a CPU,
    inductor's C++ backend runs them unrecorded); same tokens and logits as the reference."""
    model = model_on("llama")
    for kw in ({"mode": "full"}, {"mode": "early-exit", "threshold": 0.5}):
        assert_same(*pair(model, [PROMPTS[0]], max_new_tokens=10, compile=True, **kw))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_graphs_bf16_on_cuda(family):
    """bf16 on the GPU: the graph engine's logits stay within BF16_TOL of the reference engine's
    wherever both took the same path, and self-spec equals full token for token."""
    model = model_on(family, device="cuda", dtype=torch.bfloat16)
    for mode, kw in (("full", {}), ("early-exit", {"threshold": 0.5})):
        g, ref = pair(model, PROMPTS, mode=mode, max_new_tokens=16, **kw)
        n = 0
        for (s1, l1, x1), (s2, l2, x2) in zip(g.step_logits, ref.step_logits):
            if not torch.equal(l1, l2):
                break  # a near-tie decided differently: later steps no longer compare
            assert (x1.float() - x2.float()).abs().max().item() <= BF16_TOL, (mode, s1)
            n += 1
        assert n >= 4, mode
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=16, engine="graphs"))
    spec = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.2, max_new_tokens=16,
                                                  engine="graphs"))
    assert ids_of(spec) == ids_of(full)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphs_are_recorded_on_cuda():
    model = model_on("llama", device="cuda")
    generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=0.5, max_new_tokens=8, engine="graphs"))
    recorded = [g for g in model._eetune_graphs.graphs.values() if g.graph is not None]
    assert recorded and len(recorded) == len(model._eetune_graphs.graphs)


def test_recorded_functions_never_read_the_device(monkeypatch):
    """A CUDA graph cannot record a host read (`.item()`, `.tolist()`, `bool(tensor)`): every
    function the engine records must run without one, in every mode, family and head kind."""
    inside = []
    for name in ("item", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def guard(self, *a, _orig=orig, _name=name, **k):
            if inside:
                raise AssertionError(f"host read {_name} inside a recorded function")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, guard)
    orig_init = graphs.Graph.__init__

    def init(self, fn, capture):
        def watched():
            inside.append(1)
            try:
                return fn()
            finally:
                inside.pop()
        orig_init(self, watched, capture)
    monkeypatch.setattr(graphs.Graph, "__init__", init)
    for family, arch in (("llama", "mlp"), ("gemma3", "layer"), ("gpt2", "norm"), ("mistral", "mlp")):
        model = gated(model_on(family, (1, 2), arch=arch))
        for kw in ({"mode": "full"}, {"mode": "early-exit", "threshold": 0.5},
                   {"mode": "early-exit", "confidence": "gate", "threshold": 0.5},
                   {"mode": "self-spec", "threshold": 0.2}):
            generate(model, PROMPTS, DecodeOptions(engine="graphs", max_new_tokens=12, **kw))
        assert model._eetune_graphs.graphs


def test_auto_engine_is_graphs_on_a_gpu_and_lean_elsewhere():
    from eetune.decode import resolve_engine
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_engine(DecodeOptions(), cuda) == "graphs"
    assert resolve_engine(DecodeOptions(), cpu) == "lean"
    assert resolve_engine(DecodeOptions(compile=True), cpu) == "graphs"
    assert resolve_engine(DecodeOptions(mode="self-spec", draft_exit="auto"), cuda) == "lean"
    assert resolve_engine(DecodeOptions(engine="reference"), cuda) == "reference"
    model = model_on("llama")
    g = generate(model, [PROMPTS[0]], DecodeOptions(max_new_tokens=3))
    assert g.engine == "lean"
    with pytest.raises(Exception, match="--draft-exit auto runs the lean engine"):
        generate(model, [PROMPTS[0]], DecodeOptions(mode="self-spec", draft_exit="auto", compile=True))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_lean_engine_on_cuda(family):
    """The lean engine's tests run on the CPU; on a GPU it must give the reference's tokens too."""
    model = model_on(family, device="cuda")
    thr = mixing_threshold(model, PROMPTS[0])
    for kw in ({"mode": "full"}, {"mode": "early-exit", "threshold": thr}, {"mode": "self-spec", "threshold": 0.3}):
        opts = dict(kw, max_new_tokens=16, record_logits=True)
        lean = generate(model, PROMPTS, DecodeOptions(engine="lean", **opts))
        ref = generate(model, PROMPTS, DecodeOptions(engine="reference", **opts))
        assert ids_of(lean) == ids_of(ref), kw


def test_a_new_token_ranking_reaches_recorded_functions():
    """Review finding: the draft and screen vocabulary rows were cached on the model and not
    refreshed when `vocab_by_frequency` changed (as `tune` re-ranks it) between requests."""
    model = model_on("qwen2")
    model.vocab_by_frequency = torch.arange(V).flip(0)
    thr = mixing_threshold(model, PROMPTS[0])
    screen = dict(mode="early-exit", threshold=thr, screen_vocab=30, max_new_tokens=30)
    draft = dict(mode="self-spec", threshold=0.0, draft_vocab=20, max_new_tokens=20, temperature=0.8, seed=3)
    assert_same(*pair(model, PROMPTS, **screen))
    assert_same(*pair(model, PROMPTS, **draft))
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    assert_same(*pair(model, PROMPTS, **screen))
    g, ref = pair(model, PROMPTS, **draft)
    lean = generate(model, PROMPTS, DecodeOptions(engine="lean", **draft))
    assert ids_of(g) == ids_of(ref) == ids_of(lean) and g.drafted == lean.drafted


def test_padding_queries_do_not_move_a_dynamic_rotary_scaling():
    """Review finding: padding queries of a bucketed join carried positions past the last real
    token, and dynamic/longrope rotary scalings (which look at the largest position) changed
    the real tokens' rotations."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from conftest import COMMON
    from eetune.backbone import adapter_for
    cfg = LlamaConfig(**dict(COMMON, max_position_embeddings=40), rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    torch.manual_seed(0)
    bb = adapter_for(AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False))
    bb.source, bb.revision, bb.model_path = "tiny-dynamic-rope", None, None
    with torch.no_grad():
        bb.lm_head.weight.mul_(8.0)
    model = EarlyExitModel.convert(bb, [1, 3], arch="mlp")
    prompt = [(7 * i + 3) % V for i in range(28)]
    for thr in (0.3, 0.5, 0.7):
        assert_same(*pair(model, [prompt], mode="early-exit", threshold=thr, max_new_tokens=12))


def test_graph_state_follows_the_weights_and_is_freed():
    """Review findings: the state was keyed by module ids only (parameters stored anew kept stale
    graphs) and outlived `release_unused_layers` (graphs over freed layers, caches held while
    tuning)."""
    model = model_on("llama")
    kw = dict(mode="early-exit", threshold=0.5, max_new_tokens=10)
    assert_same(*pair(model, PROMPTS, **kw))
    state = model._eetune_graphs
    proj = model.heads[0].mlp[-1].down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 3.0, requires_grad=False)
    assert_same(*pair(model, PROMPTS, **kw))
    assert model._eetune_graphs is not state
    model.release_unused_layers()
    assert model._eetune_graphs is None


def test_a_function_that_cannot_be_recorded_runs_unrecorded_with_a_warning():
    """Recording fails for a module that reads the device (a host sync); that segment then runs
    without a graph, with the same results, and says so once. (On this CPU the recording itself
    fails, which exercises the same path.)"""
    calls = []

    def fn():
        calls.append(1)
        return {"x": torch.ones(2) * len(calls)}
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        g = graphs.Graph(fn, capture=True)
    assert g.graph is None and torch.equal(g()["x"], torch.full((2,), float(len(calls))))

"""The lm-evaluation-harness model type `eetune` (eetune.measure.lmeval) on tiny tasks defined from local
files (no hub, no network): multiple choice and rolling loglikelihoods equal a direct
computation from the Hugging Face model's own forward pass (and lm-eval's own HFLM), through the
final layer or an exit; generate_until equals our `generate`, stop strings included; the
`eetune lm-eval` command runs lm-eval's CLI end to end; bad model_args give one clear error."""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'eetune[eval]')")

import torch  # noqa: E402
from tune_helpers import ENV, make_world, one_thread  # noqa: E402,F401 (one_thread: autouse fixture)

from eetune.decode import generate  # noqa: E402
from eetune.errors import EETuneError  # noqa: E402
from eetune.measure.lmeval import EETuneLM, harness_argv  # noqa: E402

QUESTIONS = [  # (context, choices, label); multi-token choices test the sums
    ("w1 w2 w3 w4", ["w5", "w7 w8", "w9 w10 w11"], 0),
    ("w10 w13 w16", ["w19", "w20", "w3 w3"], 1),
    ("w40 w41 w42 w43 w44 w45", ["w46 w47", "w50", "w0"], 2),
    ("w30 w35 w40 w45", ["w8", "w7 w7", "w7 w9"], 1),  # the model's own greedy continuation is "w7 w7 ..."
]
PROMPTS = ["w1 w2 w3", "w30 w35 w40 w45", "w7"]
DOCS = [" ".join(f"w{(5 + 3 * i) % 96}" for i in range(40)), "w2 w4 w6 w8 w10", "w9"]
MAX_GEN = 8


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(name, data, cache, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}metadata:\n  version: 1.0\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    w = make_world(root)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    w["hf"] = AutoModelForCausalLM.from_pretrained(w["model"]).eval()
    w["tok"] = AutoTokenizer.from_pretrained(w["model"])
    w["lm"] = EETuneLM.create_from_arg_obj({"exits": str(w["mlp"]), "batch_size": 2, "device": "cpu"})
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "hf-datasets-cache"
    mc = write_jsonl(root / "mc.jsonl", [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS])
    (tasks / "mc.yaml").write_text(task_yaml("eetune_mc", mc, cache, (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in DOCS])
    (tasks / "ppl.yaml").write_text(task_yaml("eetune_ppl", docs, cache, (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    # generate_until stops at a word the model really produces for the first prompt (its 3rd new token)
    full = generate(w["lm"].model, PROMPTS, tokenizer=w["tok"], mode="full", max_new_tokens=MAX_GEN)
    w["stop"] = full.rows[0].text.split()[2]
    gen = write_jsonl(root / "gen.jsonl", [{"prompt": p, "answer": "w1"} for p in PROMPTS])
    (tasks / "gen.yaml").write_text(task_yaml("eetune_gen", gen, cache, (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: ['{w['stop']}']\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    w["tasks"] = tasks
    return w


def evaluate(world, model, tasks, model_args=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm, log_samples=True,
                           bootstrap_iters=0, device="cpu")


def direct_logprob(world, ctx_ids, cont_ids, exit_layer=None):
    """Sum of log-softmax over the continuation tokens: the HF model's own forward (final
    layer), or our model's exit logits."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        if exit_layer is None:
            logits = world["hf"](input_ids=ids).logits[0]
        else:
            logits = world["lm"].model(ids).exit_logits[exit_layer][0]
    lp = torch.log_softmax(logits.double(), -1)
    n = len(ctx_ids)
    return sum(float(lp[n - 1 + i, t]) for i, t in enumerate(cont_ids))


def encode(world, text):
    return world["tok"](text, add_special_tokens=False)["input_ids"]


def test_multiple_choice_equals_hf_forward(world):
    out = evaluate(world, "eetune", ["eetune_mc"], {"exits": str(world["mlp"]), "batch_size": 2})
    assert out["results"]["eetune_mc"]["acc,none"] is not None
    assert out["config"]["eetune"]["logits_from"] == "final" and out["config"]["eetune"]["exit_layers"] == [1, 3]
    samples = out["samples"]["eetune_mc"]
    assert len(samples) == len(QUESTIONS)
    greedy_seen = []
    for s in samples:
        q, choices, _ = QUESTIONS[s["doc_id"]]
        for choice, (ll, greedy) in zip(choices, [r[0] for r in s["resps"]]):
            ctx, cont = encode(world, q), encode(world, " " + choice)
            assert abs(float(ll) - direct_logprob(world, ctx, cont)) < 1e-4
            with torch.no_grad():
                logits = world["hf"](input_ids=torch.tensor([ctx + cont])).logits[0]
            assert bool(greedy) == (logits[len(ctx) - 1:-1].argmax(-1).tolist() == cont)
            greedy_seen.append(bool(greedy))
    assert any(greedy_seen) and not all(greedy_seen)


def test_exit_logits_and_hflm_agree(world):
    """logits_from=K scores with exit K; the final layer's scores equal lm-eval's own HFLM's on the
    same requests (loglikelihood and rolling windows of a short max_length)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reqs = [Instance("loglikelihood", {}, (q, " " + c), i) for i, (q, cs, _) in enumerate(QUESTIONS) for c in cs]
    reqs.append(Instance("loglikelihood", {}, (DOCS[0], " w3 w4"), 98))  # cut from the left at max_length
    reqs.append(Instance("loglikelihood", {}, ("", "w3 w4"), 99))  # empty context: the prefix token stands in
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(DOCS)]
    exit_lm = EETuneLM(exits=str(world["mlp"]), logits_from=1, device="cpu", batch_size=3)
    for (ll, _), r in zip(exit_lm.loglikelihood(reqs[:-2]), reqs):
        ctx, cont = encode(world, r.args[0]), encode(world, r.args[1])
        assert abs(ll - direct_logprob(world, ctx, cont, exit_layer=1)) < 1e-4
    short = EETuneLM(exits=str(world["mlp"]), device="cpu", batch_size=4, max_length=16)
    hf = HFLM(pretrained=str(world["model"]), device="cpu", batch_size=4, max_length=16)
    for ours, theirs in zip(short.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert abs(ours[0] - theirs[0]) < 1e-4 and ours[1] == theirs[1]
    ours, theirs = short.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
    assert all(abs(a - b) < 1e-4 for a, b in zip(ours, theirs))


def test_rolling_equals_hf_forward(world):
    out = evaluate(world, world["lm"], ["eetune_ppl"])
    assert out["results"]["eetune_ppl"]["word_perplexity,none"] > 1
    eos = world["tok"].eos_token_id  # no BOS in this tokenizer: EOS is the prefix
    for s in out["samples"]["eetune_ppl"]:
        ids = encode(world, DOCS[s["doc_id"]])
        assert abs(float(s["resps"][0][0]) - direct_logprob(world, [eos], ids)) < 1e-4


def test_generate_until_equals_generate(world):
    tok, model = world["tok"], world["lm"].model
    out = evaluate(world, world["lm"], ["eetune_gen"])
    assert "exact_match,none" in out["results"]["eetune_gen"]
    got = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["eetune_gen"]}
    want = generate(model, PROMPTS, tokenizer=tok, mode="full", max_new_tokens=MAX_GEN, stop=[world["stop"]])
    unstopped = generate(model, PROMPTS, tokenizer=tok, mode="full", max_new_tokens=MAX_GEN)
    assert [got[i] for i in range(len(PROMPTS))] == [r.text for r in want.rows]
    assert world["stop"] not in got[0] and len(got[0]) < len(unstopped.rows[0].text)  # `until` honoured
    info = out["config"]["eetune"]
    assert info["mode"] == "full" and info["mean_layers_per_token"] == 4
    # self-spec is lossless: the same text; early-exit: what our engine gives with those settings
    spec = EETuneLM(exits=str(world["norm"]), mode="self-spec", threshold=0.0, draft_len=3, device="cpu")
    early = EETuneLM(exits=str(world["norm"]), mode="early-exit", threshold=0.05, device="cpu", batch_size=2)
    reqs = _gen_requests(world)
    assert spec.generate_until(reqs) == [r.text for r in want.rows]
    ee = generate(early.model, PROMPTS, tokenizer=tok, mode="early-exit", threshold=0.05, max_new_tokens=MAX_GEN,
                              stop=[world["stop"]])
    assert early.generate_until(reqs) == [r.text for r in ee.rows]
    assert early.get_model_info()["eetune"]["mean_layers_per_token"] < 4  # exits were taken


def _gen_requests(world):
    from lm_eval.api.instance import Instance
    kw = {"until": [world["stop"]], "max_gen_toks": MAX_GEN, "do_sample": False}
    return [Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(PROMPTS)]


def test_bad_model_args_one_error(world):
    good = str(world["mlp"])
    cases = [("", "exits=DIR is required"), ("pretrained=gpt2", "unknown pretrained"),
             (f"exits={good},colour=red", "unknown colour"), (f"exits={good},mode=fast", "mode='fast'"),
             (f"exits={good},logits_from=2", "logits_from=2"), (f"exits={good},threshold=-1", "threshold"),
             (f"exits={good},dtype=int4", "dtype='int4'"), (f"exits={good},batch_size=0", "batch_size"),
             (f"exits={good},max_length=100000", "max_length=100000"), ("exits=/no/such/dir", "no such directory"),
             (f"exits={good},device=cuda:7", "device")]
    if torch.cuda.is_available():
        cases.pop()
    for args, words in cases:
        with pytest.raises(EETuneError, match="lm-eval model_args") as e:
            EETuneLM.create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})
        assert words in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
    # the command line's own default device (cuda:0) falls back to the CPU; model_args win over it
    lm = EETuneLM.create_from_arg_string(f"exits={good},batch_size=5", {"batch_size": 1, "device": "cuda:0"})
    assert lm.batch_size == 5 and (lm.device.type == "cuda") == torch.cuda.is_available()


def test_harness_argv_defaults_to_eetune():
    assert harness_argv(["--tasks", "x"]) == ["--model", "eetune", "--tasks", "x"]
    assert harness_argv(["run", "--tasks", "x"]) == ["run", "--model", "eetune", "--tasks", "x"]
    assert harness_argv(["--model", "hf", "--tasks", "x"]) == ["--model", "hf", "--tasks", "x"]
    assert harness_argv(["ls", "tasks"]) == ["ls", "tasks"]


def lm_eval_cli_in_this_process(monkeypatch):
    """lm-eval's CLI run in this process: its task index limited to the --include_path tasks (it
    indexes its ~15k built-in task configs first otherwise: ~16 s of CPU, lm-eval's own work), and
    its log handlers, which may hold the stderr capture of an earlier test (closed since: writing
    to it prints a "--- Logging error ---" traceback of the logging module), pointed at this
    test's stderr."""
    import functools
    import logging

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                monkeypatch.setattr(h, "stream", sys.stderr)


def test_cli_end_to_end(world, tmp_path, monkeypatch, capsys):
    """`eetune lm-eval ...` (lm-eval's own CLI, the model type registered), offline: run through
    eetune's main() here (`lm_eval_cli_in_this_process`); `python -m eetune.measure.lmeval` as a
    process of its own (run as a script, the module registers the model type once)."""
    from eetune.cli import main

    lm_eval_cli_in_this_process(monkeypatch)
    out = tmp_path / "out"
    code = main(["lm-eval", "--model_args", f"exits={world['norm']},mode=self-spec,threshold=0.2,batch_size=4",
                 "--tasks", "eetune_mc,eetune_gen", "--include_path", str(world["tasks"]), "--device", "cpu",
                 "--output_path", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "eetune_mc" in printed.out and "eetune_gen" in printed.out
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert data["config"]["model"] == "eetune" and data["config"]["eetune"]["mode"] == "self-spec"
    assert set(data["results"]) == {"eetune_mc", "eetune_gen"}
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    helped = subprocess.run([sys.executable, "-m", "eetune.measure.lmeval", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert helped.returncode == 0 and "lm-eval" in helped.stdout


def _without_logging_errors(text: str) -> str:
    """stderr less any "--- Logging error ---" block (the logging module's report of a handler that
    failed to write, through "Arguments: ..."): not an error of ours, and a traceback of its own."""
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("--- Logging error ---"):
            skipping = True
        elif skipping and line.startswith("Arguments:"):
            skipping = False
            continue
        if not skipping:
            out.append(line)
    return "\n".join(out)


def test_cli_bad_model_args_one_line(world, monkeypatch, capsys):
    """A bad model_arg through `eetune lm-eval` / `python -m eetune.measure.lmeval`: one line, exit code 2.
    (lm-eval's CLI indexes its ~15k built-in task configs first: here it sees our tasks only.)"""
    from eetune.measure import lmeval
    from eetune.cli import main

    lm_eval_cli_in_this_process(monkeypatch)
    args = ["--model_args", f"exits={world['norm']},bogus=1", "--tasks", "eetune_mc",
            "--include_path", str(world["tasks"]), "--device", "cpu"]
    assert main(["lm-eval", *args]) == 2
    err = _without_logging_errors(capsys.readouterr().err).strip().splitlines()
    assert err[-1].startswith("eetune: error: lm-eval model_args: unknown bogus") and "Traceback" not in "".join(err)
    assert lmeval.main(args) == 2
    assert "eetune lm-eval: error: lm-eval model_args: unknown bogus" in capsys.readouterr().err


# --- restricted-vocabulary exit heads (K tokens + OTHER) ---------------------------------------
from conftest import V  # noqa: E402

from eetune.measure.lmeval import exit_log_probs  # noqa: E402


def _restricted_dir(world, tmp_path, ids):
    """The mlp exits restricted to `ids`, with an OTHER row that wins at some positions."""
    from eetune.model.early_exit import EarlyExitModel
    model = EarlyExitModel.from_pretrained(world["mlp"])
    model.restrict_vocab(ids)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for head in model.heads:
            if head.has_other:
                head.other_weight.copy_(torch.randn(head.other_weight.shape, generator=g))
                head.other_bias.fill_(2.0)
    out = tmp_path / "exits-k"
    model.save_pretrained(out)
    return out, model


def test_exit_log_probs_is_a_distribution_over_the_vocabulary():
    from eetune.model.early_exit import EarlyExitModel
    from conftest import tiny_backbone
    bb = tiny_backbone("llama")
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:30]
    head = EarlyExitModel.convert(bb, [1], arch="norm", exit_vocab_ids=ids).head(1)
    g = torch.Generator().manual_seed(1)
    exit_logits, final_logits = 3 * torch.randn(2, 5, 31, generator=g), 3 * torch.randn(2, 5, V, generator=g)
    lp = exit_log_probs(head, exit_logits, final_logits)
    assert lp.shape == (2, 5, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 5))
    # by hand: a token of the K keeps its own probability; one outside gets OTHER's mass, shared as the final layer
    pe, pf = exit_logits.double().softmax(-1), final_logits.double().softmax(-1)
    outside = [t for t in range(V) if t not in ids.tolist()]
    for t in (int(ids[0]), int(ids[29]), outside[0], outside[-1]):
        want = pe[..., ids.tolist().index(t)] if t in ids.tolist() else \
            pe[..., 30] * pf[..., t] / pf[..., outside].sum(-1)
        torch.testing.assert_close(lp[..., t].exp().double(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(EETuneError, match="final layer"):
        exit_log_probs(head, exit_logits)
    # K = V (a permutation, no OTHER): the unrestricted log-softmax, back in token order
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(2))
    phead = EarlyExitModel.convert(bb, [1], arch="norm", exit_vocab_ids=perm).head(1)
    full = 3 * torch.randn(4, V, generator=g)
    torch.testing.assert_close(exit_log_probs(phead, full[:, perm]), full.log_softmax(-1))
    unrestricted = EarlyExitModel.convert(bb, [1], arch="norm").head(1)
    torch.testing.assert_close(exit_log_probs(unrestricted, full), full.log_softmax(-1))


def test_restricted_exit_scores_with_the_deeper_distribution(world, tmp_path):
    """logits_from=K with a restricted exit: each continuation token scored by `exit_log_probs`
    (the exit's own probability for its K tokens, OTHER's mass shared as the final layer ranks the
    rest), computed here from our model's own forward."""
    from lm_eval.api.instance import Instance

    ids = torch.arange(0, V, 3)  # every third token id
    d, model = _restricted_dir(world, tmp_path, ids)
    lm = EETuneLM(exits=str(d), logits_from=1, device="cpu", batch_size=3)
    assert lm.get_model_info()["eetune"]["exit_vocab"] == ids.numel()
    reqs = [Instance("loglikelihood", {}, (q, " " + c), i) for i, (q, cs, _) in enumerate(QUESTIONS) for c in cs]
    outside = 0
    for (ll, greedy), r in zip(lm.loglikelihood(reqs), reqs):
        ctx, cont = encode(world, r.args[0]), encode(world, r.args[1])
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            out = model(x, final=True)
        lp = exit_log_probs(model.head(1), out.exit_logits[1][0], out.final_logits[0]).double()
        n = len(ctx)
        assert abs(ll - sum(float(lp[n - 1 + i, t]) for i, t in enumerate(cont))) < 1e-4
        assert greedy == (lp[n - 1:n - 1 + len(cont)].argmax(-1).tolist() == cont)
        outside += sum(t % 3 != 0 for t in cont)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert outside > 0  # some scored tokens lie outside the head's vocabulary

"""Check `eetune plan` against measured memory: tune steps and decoding, tiny and default model.

    .venv/bin/python benchmarks/plan_check.py                    # tiny model and smollm2-135m (minutes)
    .venv/bin/python benchmarks/plan_check.py --models tiny      # seconds

Each case runs in a fresh process: import torch, transformers (with the model's modelling
module), safetensors and eetune, warm up autograd and AdamW, read VmRSS (the baseline) and reset
the peak (`/proc/self/clear_refs` = 5). The load peak is read when loading is done (tune: just
before its parallel wrapping; decode: after `EarlyExitModel.from_pretrained`) and the peak reset
again; the steady-state peak is read at the end (tune: steps, validation, writing the heads;
decode: prefill and generation). Both are compared with `eetune.measure.plan.plan`'s `load_peak_bytes`
and `peak_bytes`, computed from the model's config.json only. A tune run's steady state is also
split into the plan's phases (the peak is reset at each boundary: trunk, loss, backward,
optimizer step, validation, writing the heads; each phase's largest peak over the steps) and
compared with the plan's persistent terms plus that phase's bytes (setup, between steps and
finishing have no counterpart; validation runs one held-out block where the plan assumes a batch).

Cases: a tiny random Llama (hidden 384, vocab 40000, 4 layers; the vocabulary-sized buffers are
tens of MiB, and a 256-token chunk's fp32 buffer, 39 MiB, is above the 32 MiB beyond which glibc
always maps large allocations, as SmolLM2's 48 MiB is: below it, freed buffers stay in glibc's
heap and the RSS measures the allocator) with a norm exit after layer 2, tuned with `--distill 0`
and 1, each with the default chunked exit losses and with `--loss-chunk 0` (whole logits), and
decoded; the embedded default model (SmolLM2-135M, prepared through eetune.model.defaults) with norm
exits after layers 10 and 20 tuned with `--distill 0` and the default chunked losses, with own
output embeddings at batch 2 x 256 (as benchmarks/tune_cost.py) and with the shared LM head at
batch 4 x 512, and decoded with early exit. Prints one JSON line and writes it with machine,
versions and settings to benchmarks/results/plan-check-cpu.json (or --out).

On a CPU the backbone's safetensors pages are memory-mapped and count in RSS once read; tune
(partial loading or not) therefore holds what it has read of the file, which `plan` does not
model beyond the layers the step keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
TINY = dict(vocab_size=40000, hidden_size=384, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit("needs /proc/self/status (Linux)")


def recorded_model(model: str) -> str:
    """The model as the results record it: an alias as given; the tiny model, built in a temporary
    directory, by its name only (no path of the machine that ran it)."""
    return Path(model).name if Path(model).is_absolute() else model


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


# --- one measured case (a fresh process) -------------------------------------------------------
def child(spec: dict) -> None:
    import torch
    import transformers  # noqa: F401 - part of the baseline
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - part of the baseline
    import transformers.models.llama.modeling_llama  # noqa: F401 - part of the baseline
    import safetensors.torch  # noqa: F401 - part of the baseline

    import eetune.train.data  # noqa: F401
    import eetune.decode.api  # noqa: F401
    import eetune.decode.engine  # noqa: F401
    import eetune.train.tune as tune_mod
    from eetune.decode import generate
    from eetune.model.early_exit import EarlyExitModel

    torch.set_num_threads(spec["threads"])
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(2, 8)).sum().backward()
    opt.step()
    base = status_bytes("VmRSS")
    reset_peak()
    marks = {}
    t0 = time.perf_counter()
    if spec["mode"] == "tune":
        phases = split_phases(tune_mod, base)
        wrap = tune_mod._wrap_parallel

        def loaded(*a, **k):  # called once the model is loaded and unused layers dropped
            marks["load_peak"] = status_bytes("VmHWM") - base
            reset_peak()
            phases["on"] = True
            return wrap(*a, **k)
        tune_mod._wrap_parallel = loaded
        cfg = tune_mod.TuneConfig(data=spec["data"], steps=spec["steps"], seq_len=spec["seq_len"],
                                  batch_size=spec["batch_size"], lr=1e-5, val_blocks=1,
                                  max_blocks=spec["batch_size"] * spec["steps"], progress=False,
                                  distill=spec["distill"], loss_chunk=spec["loss_chunk"])
        summary = tune_mod.tune(spec["exits"], spec["out"], cfg)
        marks["trunk_layers_held"] = summary.get("trunk_layers_held")
    else:
        model = EarlyExitModel.from_pretrained(spec["exits"])
        marks["load_peak"] = status_bytes("VmHWM") - base
        reset_peak()
        g = torch.Generator().manual_seed(0)
        V = model.backbone.vocab_size
        prompts = torch.randint(3, V, (spec["batch_size"], spec["prompt_len"]), generator=g).tolist()
        generate(model, prompts, mode="early-exit", threshold=0.9, max_new_tokens=spec["max_new_tokens"])
    if spec["mode"] == "tune":
        phases["mark"](None)
        marks["steady_peak"] = max(phases["peaks"].values())
        marks["phase_peaks"] = phases["peaks"]
    else:
        marks["steady_peak"] = status_bytes("VmHWM") - base
    marks["seconds"] = time.perf_counter() - t0
    marks["baseline"] = base
    print("RESULT " + json.dumps(marks))


def split_phases(tune_mod, base: int) -> dict:
    """Reset the peak at the boundaries of a tune step's phases (as eetune.measure.plan names them) and
    keep each phase's largest peak above `base`: patches tune's trunk, validate and
    write_exits_dir, Tensor.backward and the optimizer's step."""
    import torch

    import eetune.model.early_exit as model_mod

    state = {"on": False, "current": "setup", "peaks": {}}

    def mark(next_phase):  # the current phase ends: record its peak, reset, start the next
        if state["on"]:
            name = state["current"]
            state["peaks"][name] = max(state["peaks"].get(name, 0), status_bytes("VmHWM") - base)
            reset_peak()
        state["current"] = next_phase
    state["mark"] = mark

    def around(before, after, fn):
        def wrapped(*a, **k):
            if before and not state.get("inside"):
                mark(before)
            out = fn(*a, **k)
            if after and not state.get("inside"):
                mark(after)
            return out
        return wrapped

    tune_mod.trunk = around("trunk", "loss", tune_mod.trunk)
    backward = torch.Tensor.backward
    torch.Tensor.backward = around("backward", "optimizer step", backward)  # the step: clipping and AdamW

    validate = tune_mod.validate

    def validating(*a, **k):
        mark("validation")
        state["inside"] = True  # its trunk calls are part of it
        try:
            return validate(*a, **k)
        finally:
            state["inside"] = False
            mark("finishing")
    tune_mod.validate = validating
    model_mod.write_exits_dir = around("writing the heads", "finishing", model_mod.write_exits_dir)
    make_optimizer = tune_mod._optimizer

    def optimizer(*a, **k):
        named, opt = make_optimizer(*a, **k)
        opt.step = around(None, "between steps", opt.step)
        return named, opt
    tune_mod._optimizer = optimizer
    return state


def spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{spec['case']} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- set-up, prediction, comparison -------------------------------------------------------------
def make_tiny(work: Path) -> tuple[Path, Path, Path]:
    """A tiny random Llama directory with a word-level tokenizer, documents over its words, and
    norm exits after layer 2."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from eetune.cli import main as cli

    model_dir = work / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[EOS]"] = 96
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]").save_pretrained(model_dir)
    docs = work / "docs"
    docs.mkdir()
    r = random.Random(0)
    for d in range(60):
        a, step = r.randrange(96), r.choice([1, 3, 5])
        (docs / f"{d:03d}.txt").write_text(" ".join(f"w{(a + step * i) % 96}" for i in range(r.randrange(50, 150))))
    exits = work / "tiny-exits"
    assert cli(["convert", "--model", str(model_dir), "--exits", "2", "--arch", "norm", "--out", str(exits)]) == 0
    return model_dir, exits, docs


def cases(models: list[str], work: Path, args) -> list[dict]:
    from eetune.cli import main as cli

    out = []
    common = {"threads": args.threads}
    if "tiny" in models:
        model_dir, exits, docs = make_tiny(work)
        for distill in (0.0, 1.0):
            for chunk in (256, 0):
                out.append({**common, "case": f"tiny tune distill {distill:g} loss-chunk {chunk}", "mode": "tune",
                            "model": str(model_dir), "exit_spec": "2", "arch": "norm", "output_embedding": "copy",
                            "exits": str(exits), "data": str(docs), "steps": 3, "seq_len": 128, "batch_size": 4,
                            "distill": distill, "loss_chunk": chunk,
                            "out": str(work / f"tiny-out-{distill:g}-{chunk}")})
        out.append({**common, "case": "tiny decode", "mode": "decode", "model": str(model_dir), "exit_spec": "2",
                    "arch": "norm", "output_embedding": "copy", "exits": str(exits), "batch_size": 1,
                    "prompt_len": 128, "max_new_tokens": 32})
    if "default" in models:
        from eetune.model import defaults
        defaults.default_model_dir()  # prepared (downloaded and converted once) outside the measurement
        exits, shared = work / "default-exits", work / "default-exits-shared"
        for emb, path in (("copy", exits), ("shared", shared)):
            assert cli(["convert", "--model", "smollm2-135m", "--exits", "10,20", "--arch", "norm",
                        "--output-embedding", emb, "--out", str(path)]) == 0
        out.append({**common, "case": "smollm2-135m tune distill 0 copy 2x256", "mode": "tune",
                    "model": "smollm2-135m", "exit_spec": "10,20", "arch": "norm", "output_embedding": "copy",
                    "exits": str(exits), "data": "default", "steps": 3, "seq_len": 256, "batch_size": 2,
                    "distill": 0.0, "loss_chunk": 256, "out": str(work / "default-out")})
        out.append({**common, "case": "smollm2-135m tune distill 0 shared 4x512", "mode": "tune",
                    "model": "smollm2-135m", "exit_spec": "10,20", "arch": "norm", "output_embedding": "shared",
                    "exits": str(shared), "data": "default", "steps": 3, "seq_len": 512, "batch_size": 4,
                    "distill": 0.0, "loss_chunk": 256, "out": str(work / "default-out-shared")})
        out.append({**common, "case": "smollm2-135m decode", "mode": "decode", "model": "smollm2-135m",
                    "exit_spec": "10,20", "arch": "norm", "output_embedding": "copy", "exits": str(exits),
                    "batch_size": 1, "prompt_len": 256, "max_new_tokens": 32})
    return out


def predict(spec: dict):
    from eetune.measure.plan import plan
    if spec["mode"] == "tune":
        return plan(spec["model"], spec["exit_spec"], arch=spec["arch"], output_embedding=spec["output_embedding"],
                    distill=spec["distill"], batch_size=spec["batch_size"], seq_len=spec["seq_len"],
                    loss_chunk=spec["loss_chunk"])
    return plan(spec["model"], spec["exit_spec"], mode="decode", arch=spec["arch"],
                output_embedding=spec["output_embedding"], batch_size=spec["batch_size"],
                prompt_len=spec["prompt_len"], max_new_tokens=spec["max_new_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,default", help="comma-separated: tiny, default")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each measured process (default 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan-check-cpu.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return child(json.loads(args.one))
    import torch
    import transformers

    import eetune
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
               "eetune": eetune.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
    settings = {"models": models, "threads": args.threads, "dtype": "fp32", "tiny_config": TINY,
                "measure": "VmHWM above VmRSS after imports and warm-up, fresh process; load and steady state "
                           "split by resetting the peak (clear_refs 5) when loading is done"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan_check-") as tmp:
        for spec in cases(models, Path(tmp), args):
            p = predict(spec)
            m = spawn(spec)
            measured = max(m["load_peak"], m["steady_peak"])
            predicted = max(p.load_peak_bytes, p.peak_bytes)
            phases = {}
            if spec["mode"] == "tune":  # each phase: the persistent terms (gradients apart) plus its bytes
                persistent = p.peak_bytes - p.parts["activations"] - p.parts["head gradients"]
                plan_phase = {k.split(" (")[0]: v for k, v in p.activation_phases.items()}
                phases = {k: {"predicted_mb": round((persistent + plan_phase[k]) / MIB, 1) if k in plan_phase
                              else None, "measured_mb": round(v / MIB, 1)} for k, v in m["phase_peaks"].items()}
            rows.append({
                "case": spec["case"], "mode": spec["mode"], "model": recorded_model(spec["model"]),
                "exits": spec["exit_spec"],
                "settings": {k: v for k, v in spec.items() if k not in ("exits", "out", "case", "model", "data")},
                "loss_chunk": spec.get("loss_chunk"),
                "predicted_peak_mb": round(p.peak_bytes / MIB, 1),
                "measured_steady_peak_mb": round(m["steady_peak"] / MIB, 1),
                "steady_ratio": round(p.peak_bytes / m["steady_peak"], 3),
                "predicted_load_peak_mb": round(p.load_peak_bytes / MIB, 1),
                "measured_load_peak_mb": round(m["load_peak"] / MIB, 1),
                "load_ratio": round(p.load_peak_bytes / m["load_peak"], 3),
                "predicted_overall_mb": round(predicted / MIB, 1), "measured_overall_mb": round(measured / MIB, 1),
                "overall_ratio": round(predicted / measured, 3),
                "predicted_parts_mb": {k: round(v / MIB, 1) for k, v in p.parts.items()},
                "activation_peak_phase": p.activation_peak_phase, "phases": phases,
                "trunk_layers_planned": p.trunk_layers,
                "trunk_layers_held": m.get("trunk_layers_held"), "baseline_rss_mb": round(m["baseline"] / MIB, 1),
                "seconds": round(m["seconds"], 1)})
            print(f"{spec['case']}: steady predicted {rows[-1]['predicted_peak_mb']} MiB, measured "
                  f"{rows[-1]['measured_steady_peak_mb']} MiB (ratio {rows[-1]['steady_ratio']}); load predicted "
                  f"{rows[-1]['predicted_load_peak_mb']}, measured {rows[-1]['measured_load_peak_mb']}",
                  file=sys.stderr)
            for k, v in phases.items():
                print(f"    {k:<20} predicted {v['predicted_mb']}, measured {v['measured_mb']}", file=sys.stderr)
    result = {"benchmark": "plan_check", "machine": machine, "settings": settings, "results": rows}
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

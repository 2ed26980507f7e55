"""Fresh processes without the import bill: children forked from one server process that has
imported eetune's command line, tuning and the tiny Llama's modules once (multiprocessing's
`forkserver`). `python -m eetune.cli` spends ~10 s of a 2-core CPU importing torch, transformers
and what they pull in before it does anything; a child of this server starts tuning in under a
second. Use it where a test needs a process of its own (to kill it, or to measure its memory),
not where the command line's start-up itself is under test (console scripts, Ctrl-C, a closed
pipe, torchrun, a server's start-up line: those run `python -m eetune.cli`)."""

import multiprocessing
import os
import sys

PRELOAD = ["eetune.cli", "eetune.train.tune", "eetune.train.data", "eetune.model.early_exit",
           "eetune.model.backbone", "eetune.fsio", "transformers.models.llama.modeling_llama", "safetensors.torch"]


def context():
    """The multiprocessing context whose children fork from the preloaded server (started on the
    first child; the server's environment is this process's: conftest's one OpenMP thread). The
    server is one per pytest process: the first caller's preload list is the one it imports."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def cli_quietly(argv):
    """A child's target: `eetune ARGV` as the console script runs it (exit status: main's return
    value), its output discarded."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from eetune.cli import main
    sys.exit(main([str(a) for a in argv]))


def run(target, *args, timeout=300):
    """Run `target(*args)` in a forked child and wait for it: its exit status."""
    proc = context().Process(target=target, args=args)
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"{target.__name__}{args} did not finish in {timeout} s")
    return proc.exitcode


def tune_peak_rss(settings: dict, result: str) -> None:
    """A child's target: the peak RSS (bytes) of `tune` above the child's baseline after its imports
    and a warm-up of autograd and AdamW (their first use allocates too), written as JSON to `result`
    (or the traceback of what failed). `settings`: docs, exits, out, batch, seq, distill, chunk."""
    import json
    import re
    import traceback

    def status(key):
        return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - part of the baseline
        import transformers.models.llama.modeling_llama  # noqa: F401
        import eetune.train.data, eetune.model.early_exit  # noqa: E401,F401
        from eetune.train.tune import TuneConfig, tune

        torch.set_num_threads(1)
        lin = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(lin.parameters())
        lin(torch.ones(2, 8)).sum().backward()
        opt.step()
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
        a = settings
        cfg = TuneConfig(data=a["docs"], steps=2, seq_len=a["seq"], batch_size=a["batch"], lr=1e-4, val_blocks=1,
                         max_blocks=2 * a["batch"], progress=False, distill=a["distill"], loss_chunk=a["chunk"])
        tune(a["exits"], a["out"], cfg)
        out = {"peak": status("VmHWM") - base}
    except BaseException:  # noqa: BLE001 - reported to the test
        out = {"error": traceback.format_exc()}
    with open(result, "w") as f:
        json.dump(out, f)


def killed_inside_atomic_write(path: str) -> None:
    """A child's target: `fsio.atomic_write(path)`, SIGKILLed inside it (its temporary file written,
    `path` not yet replaced), as a kill of `tune` inside a checkpoint's latest.json write is."""
    import signal
    from pathlib import Path

    from eetune.fsio import atomic_write

    def write(tmp):
        Path(tmp).write_text("{\"half\": ")
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(path, write)

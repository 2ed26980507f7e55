"""Serving load benchmark: `eetune serve` under N concurrent streaming clients, per mode.

    .venv/bin/python benchmarks/serve_load.py --concurrency 1,2,4,8 --modes full,self-spec,early-exit,auto

Starts one `eetune serve` process on 127.0.0.1 (the committed SmolLM2-135M exits by default, or
`--exits DIR`), then for every mode and concurrency level runs that many clients at once, each
sending `--requests` streamed completions (greedy, `--max-tokens` each, the mode in the eetune
extension). Per level: throughput (completion tokens / wall seconds), time to first token p50/p95
and inter-token latency p50/p95 (gaps between streamed chunks; a self-spec round's tokens can
arrive as one chunk), errors. Prints one JSON line and writes it, with machine and versions, to
benchmarks/results/serve_load-<tag>.json. Used to find the batch size above which early exit /
self-spec stop paying (the server's --ee-max-batch): compare a mode's throughput with `full`'s
at each level, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

PROMPTS = [
    "The Amazon rainforest is the largest tropical rainforest in the world. It",
    "Explain in two sentences why the sky is blue.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "The history of the printing press begins",
    "List three uses of copper and say why each works.",
    "Once upon a time, in a small village by the sea,",
    "What is the difference between weather and climate?",
    "Summarize the plot of a detective story in one paragraph.",
]


def _repo_relative(path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT.parent))
    except ValueError:
        return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 5)


async def one_request(client, url: str, model: str, prompt: str, mode: str, max_tokens: int, chat: bool) -> dict:
    ext = {"mode": mode}
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "eetune": ext}
        path = "/v1/chat/completions"
    else:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "eetune": ext}
        path = "/v1/completions"
    t0 = time.perf_counter()
    first, last, gaps, info = None, None, [], None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code} {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"error": data["error"]["message"]}
            info = data.get("eetune") or info
            ch = data["choices"][0] if data.get("choices") else {}
            piece = ch.get("text") or (ch.get("delta") or {}).get("content")
            if piece:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    n = len(info["token_ids"]) if info else 0
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": n,
            "resolved": info["mode"] if info else None, "exit": info.get("mean_exit_layer") if info else None}


async def level(url: str, model: str, mode: str, conc: int, requests: int, max_tokens: int, chat: bool,
                timeout: float) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(c):
            out = []
            for k in range(requests):
                prompt = PROMPTS[(c * requests + k) % len(PROMPTS)]
                try:
                    out.append(await one_request(client, url, model, prompt, mode, max_tokens, chat))
                except Exception as e:  # counted, not fatal
                    out.append({"error": f"{type(e).__name__}: {e}"})
            return out
        t0 = time.perf_counter()
        res = [r for rs in await asyncio.gather(*(worker(c) for c in range(conc))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    toks = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    exits = [r["exit"] for r in ok if r.get("exit") is not None]
    return {"mode": mode, "concurrency": conc, "requests": len(res), "errors": len(res) - len(ok),
            "error_sample": next((r["error"] for r in res if "error" in r), None),
            "tokens": toks, "seconds": round(wall, 3), "tokens_per_s": round(toks / wall, 2) if wall else None,
            "ttft_p50": _pct([r["ttft"] for r in ok], 0.5), "ttft_p95": _pct([r["ttft"] for r in ok], 0.95),
            "itl_p50": _pct(gaps, 0.5), "itl_p95": _pct(gaps, 0.95),
            "resolved_modes": sorted({r["resolved"] for r in ok if r["resolved"]}),
            "mean_exit_layer": round(sum(exits) / len(exits), 3) if exits else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", default=str(ROOT / "exits" / "smollm2-mlp-10-20-h100"),
                    help="exits directory to serve (default: the committed SmolLM2-135M exits, on the embedded model)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="concurrent clients per level (default 1,2,4,8)")
    ap.add_argument("--modes", default="full,self-spec,early-exit,auto", help="modes to measure")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default 64)")
    ap.add_argument("--ee-max-batch", type=int, default=1, help="the server's --ee-max-batch (auto mode)")
    ap.add_argument("--threshold", type=float, default=None, help="the server's --threshold (default: calibrated)")
    ap.add_argument("--no-chat", action="store_true", help="plain completions instead of chat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request at most")
    ap.add_argument("--tag", default=None, help="results file tag (default: the device)")
    args = ap.parse_args(argv)
    import httpx
    import torch
    import transformers

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from eetune.cli import main; sys.exit(main(sys.argv[1:]))", "serve",
           args.exits, "--port", str(port), "--max-batch", str(max(levels)), "--max-queue", str(4 * max(levels)),
           "--ee-max-batch", str(args.ee_max_batch), "--device", args.device, "--dtype", args.dtype,
           "--max-context", "2048"]
    if args.threshold is not None:
        cmd += ["--threshold", str(args.threshold)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("server did not start in 600 s")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        chat = not args.no_chat
        asyncio.run(level(url, model, "full", 1, 1, 8, chat, args.timeout))  # warm-up outside the timings
        rows = []
        for mode in modes:
            for conc in levels:
                row = asyncio.run(level(url, model, mode, conc, args.requests, args.max_tokens, chat, args.timeout))
                rows.append(row)
                print(f"{mode:>10} x{conc:<3} {row['tokens_per_s']} tok/s  ttft p50 {row['ttft_p50']}  "
                      f"itl p50 {row['itl_p50']}  errors {row['errors']}", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    dev = torch.device(args.device)
    cpu = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
    import fastapi
    import uvicorn
    out = {"benchmark": "serve_load", "machine": machine, "torch": torch.__version__,
           "transformers": transformers.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
           "python": platform.python_version(), "exits": _repo_relative(args.exits), "dtype": args.dtype,
           "max_tokens": args.max_tokens, "requests_per_client": args.requests, "ee_max_batch": args.ee_max_batch,
           "chat": chat, "date": time.strftime("%Y-%m-%d %H:%M"), "levels": rows}
    line = json.dumps(out)
    print(line)
    tag = args.tag or (dev.type if dev.type != "cuda" else "cuda")
    path = ROOT / "results" / f"serve_load-{tag}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(line + "\n")
    print(f"wrote {_repo_relative(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""`eetune serve`: the official `openai` client against a real server process (completions and chat,
streamed and not, greedy output identical to offline generation per mode), bad requests, a full
queue, a client that disconnects, SIGTERM draining, a load of concurrent clients; and the
scheduler in-process (a request that joins mid-flight decodes as it would alone)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import FAMILIES, peaky_backbone, save_peaky_model_dir, word_tokenizer  # noqa: E402
from eetune.cli import main  # noqa: E402
from eetune.decode import DecodeOptions, generate  # noqa: E402
from eetune.model.early_exit import EarlyExitModel  # noqa: E402

# A chat template over the word-level vocabulary: turns become "w90 <content>", the reply starts after "w91".
CHAT_TEMPLATE = "{% for m in messages %}w90 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w91{% endif %}"
THRESHOLD = 0.5  # early exit at a fixed threshold (exits 2 and 3 of 4 fire at it on this model)
CALIBRATED = 0.3  # the threshold `eetune calibrate` "stored" in the exits directory
PROMPTS = ["w1 w2 w3", "w5 w9", "w11 w12 w13 w14 w15 w16 w17", "w40 w41 w42 w43", "w7", "w60 w3 w33 w2",
           "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30", "w8 w8 w8"]
MODES = {"full": {"mode": "full"}, "early-exit": {"mode": "early-exit", "threshold": THRESHOLD},
         "self-spec": {"mode": "self-spec", "threshold": THRESHOLD}}
N = 12  # max_tokens of most requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    src = save_peaky_model_dir(d / "peaky")
    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(src)
    exits = d / "exits"
    assert main(["convert", "--model", str(src), "--exits", "2,3", "--arch", "mlp", "--out", str(exits)]) == 0
    from eetune.measure.calibrate import store_calibration
    from eetune.model.backbone import load_tokenizer
    from eetune.model.early_exit import heads_digest
    model = EarlyExitModel.from_pretrained(exits)  # a stored calibration: the server's default early-exit threshold
    store_calibration(exits, {"confidence": "max-prob", "thresholds": {2: CALIBRATED, 3: CALIBRATED},
                              "heads_digest": heads_digest(model)})
    model = EarlyExitModel.from_pretrained(exits)
    return {"dir": exits, "model": model, "tok": load_tokenizer(model.backbone), "tmp": d, "refs": {}}


def offline(world, prompt: str, mode: str, chat: bool = False, n: int = N, **kw):
    """What `eetune generate` gives for one prompt (batch 1): (ids, text)."""
    key = (prompt, mode, chat, n, tuple(sorted(kw.items())))
    if key not in world["refs"]:
        opts = dict(MODES[mode], max_new_tokens=n, **kw)
        r = generate(world["model"], [prompt], tokenizer=world["tok"], chat=chat, **opts).rows[0]
        world["refs"][key] = (r.ids, r.text)
    return world["refs"][key]


class Server:
    def __init__(self, world, name, *args):
        self.port = _free_port()
        self.log = open(world["tmp"] / f"{name}.log", "w+")
        code = "import sys; from eetune.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(world["dir"]), "--port",
                                      str(self.port), *map(str, args)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self):
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("server did not start: " + self.output())
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return self

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str) -> float:
        total = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                if key == name or key.startswith(name + "{"):
                    total += float(value)
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def servers(world):
    """Two server processes, started together (start-up is mostly imports): the main one, and a
    slow one with one row, one waiting request and 50 ms per step (a tiny model made slow enough
    to watch a full queue, a disconnect and a drain)."""
    main_server = Server(world, "main", "--max-batch", 16, "--max-queue", 256, "--prefill-chunk", 4)
    slow_server = Server(world, "slow", "--max-batch", 1, "--max-queue", 1, "--step-delay", 0.05, "--mode", "full",
                         "--drain-s", 20)
    try:
        yield main_server.wait_ready(), slow_server.wait_ready()
    finally:
        main_server.stop()
        slow_server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def slow(servers):
    return servers[1]


def _ext(resp) -> dict:
    return resp.model_extra["eetune"]


# --- the openai client against the server -----------------------------------------------------
def test_startup_line_models_and_health(server, world):
    assert f"http://127.0.0.1:{server.port}/v1" in server.output()
    assert [m.id for m in server.client.models.list().data] == [world["dir"].name]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("mode", list(MODES))
def test_completions_equal_offline_generation(server, world, mode):
    model = world["dir"].name
    for prompt in PROMPTS[:4]:
        ids, text = offline(world, prompt, mode)
        r = server.client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                             extra_body={"eetune": MODES[mode]})
        assert _ext(r)["token_ids"] == ids and r.choices[0].text == text, (prompt, mode)
        assert _ext(r)["mode"] == mode and r.usage.completion_tokens == len(ids)
        assert r.choices[0].finish_reason == ("stop" if ids[-1] == 96 else "length")
        pieces, info = [], None
        for chunk in server.client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                                      stream=True, extra_body={"eetune": MODES[mode]}):
            pieces.append(chunk.choices[0].text)
            info = (chunk.model_extra or {}).get("eetune") or info
        assert "".join(pieces) == text and info["token_ids"] == ids
    if mode == "early-exit":  # the threshold makes exits fire: not the full model's output by accident
        layers = [_ext(server.client.completions.create(model=model, prompt=p, max_tokens=N, extra_body={
            "eetune": MODES[mode]}))["mean_exit_layer"] for p in PROMPTS[:4]]
        assert min(layers) < 4
    if mode == "self-spec":
        r = server.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=N,
                                             extra_body={"eetune": MODES[mode]})
        assert _ext(r)["accepted"] > 0 and _ext(r)["token_ids"] == offline(world, PROMPTS[0], "full")[0]


def test_the_default_early_exit_threshold_is_the_stored_calibration(server, world):
    """As `eetune generate --mode early-exit` without --threshold: the calibrated threshold."""
    differs = False
    for prompt in PROMPTS[:4]:
        ids = generate(world["model"], [prompt], tokenizer=world["tok"], mode="early-exit", max_new_tokens=N)
        assert ids.threshold_source == "calibrated"
        r = server.client.completions.create(model=world["dir"].name, prompt=prompt, max_tokens=N,
                                             extra_body={"eetune": {"mode": "early-exit"}})
        assert _ext(r)["token_ids"] == ids.rows[0].ids
        differs |= ids.rows[0].ids != generate(world["model"], [prompt], tokenizer=world["tok"], mode="early-exit",
                                               threshold=0.9, max_new_tokens=N).rows[0].ids
    assert differs  # the calibrated threshold, not the default 0.9, decided


def test_chat_completions_equal_offline_generation(server, world):
    model = world["dir"].name
    for mode in MODES:
        ids, text = offline(world, PROMPTS[1], mode, chat=True)
        r = server.client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                  max_tokens=N, extra_body={"eetune": MODES[mode]})
        assert r.choices[0].message.content == text and _ext(r)["token_ids"] == ids and r.object == "chat.completion"
        stream = server.client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                       max_tokens=N, stream=True, extra_body={"eetune": MODES[mode]},
                                                       stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == len(ids)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_stop_strings_and_seeded_sampling_equal_offline(server, world):
    from eetune.decode import generate_text
    model = world["dir"].name
    full_text = offline(world, PROMPTS[0], "full")[1]
    stop = full_text.split()[2]
    ref = generate_text(world["model"], world["tok"], [PROMPTS[0]], DecodeOptions(mode="full", max_new_tokens=N),
                        stop=(stop,)).rows[0].text
    r = server.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=N, stop=[stop],
                                         extra_body={"eetune": {"mode": "full"}})
    assert r.choices[0].text == ref and stop not in ref and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=N, stop=stop, stream=True, extra_body={"eetune": {"mode": "full"}}))
    assert streamed == ref
    ids, _ = offline(world, PROMPTS[2], "full", temperature=1.0, top_p=0.9, seed=7)
    got = [_ext(server.client.completions.create(
        model=model, prompt=PROMPTS[2], max_tokens=N, temperature=1.0, top_p=0.9, seed=7,
        extra_body={"eetune": {"mode": "full"}}))["token_ids"] for _ in range(2)]
    assert got == [ids, ids]


@pytest.mark.parametrize("body,status,param,code", [
    ('{"model": "M", "prompt": "w1",', 400, None, "invalid_json"),
    ('[1, 2]', 400, None, "invalid_json"),
    ('{"model": "nope", "prompt": "w1"}', 404, "model", "model_not_found"),
    ('{"prompt": "w1"}', 400, "model", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "n": 2}', 400, "n", "unsupported_parameter"),
    ('{"model": "M", "prompt": "w1", "temperature": -1}', 400, "temperature", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "top_p": 0}', 400, "top_p", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "stop": 5}', 400, "stop", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "logprobs": 2}', 400, "logprobs", "unsupported_parameter"),
    ('{"model": "M", "prompt": "w1", "eetune": {"mode": "fast"}}', 400, "eetune.mode", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "eetune": {"threshold": -1}}', 400, "threshold", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "eetune": {"speed": 1}}', 400, "eetune", "invalid_value"),
    ('{"model": "M", "prompt": "w1", "eetune": {"draft_context": 1}}', 400, "eetune.draft_context", "invalid_value"),
    # these exits project onto the whole vocabulary: no draft head to add the prompt's tokens to
    ('{"model": "M", "prompt": "w1", "eetune": {"mode": "self-spec", "draft_context": true}}', 400, "eetune",
     "invalid_value"),
    ('{"model": "M", "prompt": "   "}', 400, "prompt", "invalid_value"),
    ('{"model": "M", "prompt": [999]}', 400, "prompt", "invalid_value"),
    ('{"model": "M", "prompt": "' + "w1 " * 250 + '", "max_tokens": 20}', 400, "max_tokens",
     "context_length_exceeded"),
    ('{"model": "M", "prompt": "' + "w1 " * 300 + '"}', 400, "prompt", "context_length_exceeded"),
])
def test_bad_requests_get_openai_error_bodies(server, world, body, status, param, code):
    r = httpx.post(server.url + "/v1/completions", content=body.replace('"M"', json.dumps(world["dir"].name)),
                   headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"


def test_bad_requests_through_the_client_and_the_server_lives_on(server, world):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="gpt-4", prompt="w1", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=world["dir"].name, messages=[{"role": "user", "content": "w1"}],
                                              n=3)
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=world["dir"].name, messages=[], max_tokens=2)
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/health").status_code == 200 and server.proc.poll() is None


def test_load_many_concurrent_clients_lose_nothing(server, world):
    """32 clients x 4 requests, mixed modes (auto included), streamed and not: no errors, every
    greedy response identical to its offline result; the requests really ran together."""
    model = world["dir"].name
    jobs = []
    for c in range(32):
        for k in range(4):
            prompt = PROMPTS[(c + k) % len(PROMPTS)]
            mode = ["full", "auto", "early-exit", "self-spec"][(c + k) % 4]
            jobs.append((c, prompt, mode, (c + k) % 2 == 0))
    for _, prompt, mode, _ in jobs:  # references first (in this process)
        offline(world, prompt, "full" if mode == "auto" else mode)
    batch_seen = []

    def client(c):
        cl = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = []
        for _, prompt, mode, stream in [j for j in jobs if j[0] == c]:
            ext = {"mode": mode} if mode == "auto" else MODES[mode]
            if stream:
                text, info = "", None
                for ch in cl.completions.create(model=model, prompt=prompt, max_tokens=N, stream=True,
                                                extra_body={"eetune": ext}):
                    text += ch.choices[0].text
                    info = (ch.model_extra or {}).get("eetune") or info
            else:
                r = cl.completions.create(model=model, prompt=prompt, max_tokens=N, extra_body={"eetune": ext})
                text, info = r.choices[0].text, _ext(r)
            out.append((prompt, mode, text, info))
        return out

    stop = threading.Event()

    def watch():
        while not stop.is_set():
            batch_seen.append(server.metric("eetune_batch_size"))
            time.sleep(0.05)

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.time()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = [r for rs in pool.map(client, range(32), timeout=120) for r in rs]
    finally:
        stop.set()
        w.join()
    assert len(results) == 128 and time.time() - t0 < 120
    for prompt, mode, text, info in results:
        ids, ref_text = offline(world, prompt, "full" if mode == "auto" else mode)
        assert info["token_ids"] == ids and text == ref_text, (prompt, mode, info["mode"])
        if mode == "auto":
            assert info["mode"] in ("full", "self-spec")
    assert max(batch_seen) > 1
    assert server.metric('eetune_requests_total{mode="full",status="length"}') > 0
    assert server.metric("eetune_generated_tokens_total") >= sum(len(r[3]["token_ids"]) for r in results)
    assert server.metric("eetune_time_to_first_token_seconds_count") >= 128
    assert 0 < server.metric("eetune_mean_exit_layer") <= 4 and server.metric("eetune_draft_acceptance") > 0
    assert _wait(lambda: server.metric("eetune_batch_size") == 0 and server.metric("eetune_queue_depth") == 0, 5)


# --- faults: a full queue, a client that goes away, SIGTERM -----------------------------------
def _stream(url, body, out: list, lines: int | None = None):
    """Read an SSE stream into `out`; stop (closing the connection) after `lines` data lines."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                if lines is not None and len(out) > lines:
                    return


def _wait(cond, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_full_queue_gets_503_with_retry_after(slow, world):
    body = {"model": world["dir"].name, "prompt": "w1 w2", "max_tokens": 30, "stream": True}  # >= 1.5 s each
    outs = [[], []]
    threads = [threading.Thread(target=_stream, args=(slow.url, body, outs[0]))]
    threads[0].start()
    assert _wait(lambda: slow.metric("eetune_batch_size") == 1)
    threads.append(threading.Thread(target=_stream, args=(slow.url, body, outs[1])))
    threads[1].start()
    assert _wait(lambda: slow.metric("eetune_queue_depth") == 1)
    r = httpx.post(slow.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
    for t in threads:
        t.join(30)
    for out in outs:  # the two admitted requests are whole
        assert out[0] == 200 and out[-1] == "[DONE]"
        assert json.loads(out[-2])["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_client_that_disconnects_frees_its_row(slow, world):
    before = slow.metric('eetune_requests_total{mode="full",status="cancelled"}')
    finished = slow.metric('eetune_requests_total{mode="full",status="length"}')
    out = []
    t0 = time.time()
    _stream(slow.url, {"model": world["dir"].name, "prompt": "w1 w2", "max_tokens": 240, "stream": True}, out,
            lines=3)
    assert out[0] == 200 and len(out) == 4
    # 240 tokens take >= 12 s at 50 ms a step: the request is cancelled, not finished, and its row freed
    assert _wait(lambda: slow.metric('eetune_requests_total{mode="full",status="cancelled"}') == before + 1, 8)
    assert _wait(lambda: slow.metric("eetune_batch_size") == 0, 2) and time.time() - t0 < 11
    assert slow.metric('eetune_requests_total{mode="full",status="length"}') == finished


def test_sigterm_finishes_running_requests_then_exits_0(slow, world):
    out = []
    t = threading.Thread(target=_stream, args=(slow.url, {"model": world["dir"].name, "prompt": "w1 w2",
                                                          "max_tokens": 20, "stream": True}, out))
    t.start()
    assert _wait(lambda: len(out) >= 3)
    slow.proc.send_signal(signal.SIGTERM)
    assert _wait(lambda: _refused(slow.url), 5)  # no new requests once draining
    t.join(30)
    assert slow.proc.wait(30) == 0
    assert out[0] == 200 and out[-1] == "[DONE]"
    final = json.loads(out[-2])
    assert final["choices"][0]["finish_reason"] == "length" and len(final["eetune"]["token_ids"]) == 20


def _refused(url) -> bool:
    try:
        r = httpx.get(url + "/health", timeout=1)
        return r.status_code == 503
    except httpx.HTTPError:
        return True


# --- the scheduler in-process -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_a_request_joining_mid_flight_decodes_as_it_would_alone(family):
    """Batched full rows with chunked prefill, and early-exit / self-spec requests on the solo lane,
    arriving every few steps: every greedy output equals the offline output of its mode (batch 1).
    Mistral has a sliding window of 6 positions (shorter than these sequences); GPT-2 its own adapter."""
    from eetune.serve.scheduler import Job, Scheduler, SchedulerConfig, wait_done
    assert family in FAMILIES
    model = EarlyExitModel.convert(peaky_backbone(family), [1, 2], arch="mlp")
    tok = word_tokenizer()
    prompts = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21] * 2]
    kinds = [("full", None), ("early-exit", 0.6), ("self-spec", 0.5), ("full", None)]
    ref = {}
    for mode, thr in kinds:
        for i, p in enumerate(prompts):
            opts = DecodeOptions(mode=mode, threshold=thr, max_new_tokens=16)
            ref[(mode, i)] = generate(model, [p], opts).rows[0].ids
    sched = Scheduler(model, tok, SchedulerConfig(max_batch=6, prefill_chunk=4, capacity=128))
    jobs = []
    for step in range(30):
        if step % 3 == 0 and len(jobs) < 10:
            k = len(jobs)
            mode, thr = kinds[k % len(kinds)]
            job = Job(prompts[k % 3], DecodeOptions(mode=mode, threshold=thr, max_new_tokens=16), tok)
            job.key = (mode, k % 3)
            sched.submit(job)
            jobs.append(job)
        sched.step()
    wait_done(sched, jobs)
    assert [j.ids for j in jobs] == [ref[j.key] for j in jobs]
    assert all(j.finished_by == "length" and j.slot is None for j in jobs)
    assert sorted(sched.table.free) == list(range(6)) and not sched.live()


def test_draft_context_through_the_frontend_equals_offline():
    """`"draft_context": true` (or `serve --draft-context`): a self-spec request on the solo lane
    drafts with its own prompt's tokens added to the restricted draft head, exactly as offline
    `generate(draft_context=True)`, one request after another with different prompts."""
    from test_draft_context import PROMPTS as CONTEXT_PROMPTS
    from test_draft_context import context_model

    from eetune.serve.metrics import Metrics
    from eetune.serve.scheduler import Job, Scheduler, SchedulerConfig, wait_done
    from eetune.serve.server import Frontend, ServeSettings
    model, _ = context_model("llama", "mlp")  # the prompts' copied tokens are outside the heads' K
    tok = word_tokenizer()
    sched = Scheduler(model, tok, SchedulerConfig(max_batch=2))
    kw = dict(mode="self-spec", threshold=0.0, draft_len=3, max_new_tokens=16)
    more = 0
    for default in (False, True):
        front = Frontend(model, tok, sched, ServeSettings(model_name="m", draft_context=default), Metrics())
        for p in CONTEXT_PROMPTS:
            ext = {"mode": "self-spec", "threshold": 0.0, "draft_len": 3, **({} if default else {"draft_context": True})}
            opts, _, _ = front.options({"eetune": ext, "max_tokens": 16}, len(p), "prompt")
            assert opts.draft_context
            job = Job(p, opts, tok)
            sched.submit(job)
            wait_done(sched, [job])
            eos = opts.eos_token_ids
            ref = generate(model, [p], DecodeOptions(**kw, draft_context=True, eos_token_ids=eos))
            plain = generate(model, [p], DecodeOptions(**kw, eos_token_ids=eos))
            assert job.ids == ref.rows[0].ids == plain.rows[0].ids  # lossless either way
            assert (job.drafted, job.accepted) == (ref.drafted, ref.accepted)
            more += ref.accepted - plain.accepted
    assert more > 0  # the prompts' tokens were drafted and accepted


def test_scheduler_auto_policy_and_cancel():
    """auto: the small-batch mode while at most ee_max_batch rows run, batched full above; a
    cancelled request leaves at the next step and its slot is reused."""
    from eetune.serve.scheduler import Job, Scheduler, SchedulerConfig, wait_done
    model = EarlyExitModel.convert(peaky_backbone("llama"), [2], arch="norm")
    tok = word_tokenizer()
    sched = Scheduler(model, tok, SchedulerConfig(max_batch=3, ee_max_batch=1, auto_mode="self-spec"))
    a, b, c = (Job([1 + i, 2, 3], DecodeOptions(mode="auto", max_new_tokens=40), tok) for i in range(3))
    sched.submit(a)
    sched.step()
    sched.submit(b)
    sched.submit(c)
    sched.step()
    assert (a.mode, b.mode, c.mode) == ("self-spec", "full", "full") and sched.live() == 3
    c.cancel()
    sched.step()
    assert c.finished and c.finished_by == "cancelled" and sched.live() == 2
    d = Job([7, 8], DecodeOptions(mode="full", max_new_tokens=5), tok)
    sched.submit(d)
    wait_done(sched, [a, b, d])
    alone = generate(model, [[7, 8]], DecodeOptions(mode="full", max_new_tokens=5)).rows[0].ids
    assert d.ids == alone and a.ids == generate(model, [[1, 2, 3]], DecodeOptions(max_new_tokens=40)).rows[0].ids
    assert sorted(sched.table.free) == [0, 1, 2]


def test_streamed_pieces_never_split_a_multibyte_character():
    """The scheduler's text increments (TextStream) hold back an incomplete character: the pieces
    add up to the final text and none holds U+FFFD."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from eetune.decode import TokenStat
    from eetune.serve.scheduler import Job, Scheduler, SchedulerConfig
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["plain ascii words only"], vocab_size=260, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    text = "café → naïve 日本 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)
    sched = Scheduler(EarlyExitModel.convert(peaky_backbone("llama"), [2]), tok, SchedulerConfig(max_batch=1))
    pieces, done = [], []
    job = Job([1, 2], DecodeOptions(max_new_tokens=len(ids)), tok,
              sink=lambda kind, data: (pieces if kind == "text" else done).append(data))
    job.mode = "full"
    for i in ids:
        assert sched._deliver(job, [i], [TokenStat(i, 4, float("nan"))])
    sched._finish(job, "length")
    assert "".join(pieces) == job.text == text and not any("\ufffd" in p for p in pieces)
    assert done[0]["token_ids"] == ids


def test_serve_refuses_bad_flags_in_one_line(tmp_path, capsys):
    for argv, match in ((["serve", str(tmp_path)], "is not an exits directory"),
                        (["serve", str(tmp_path), "--max-batch", "0"], "--max-batch must be at least 1"),
                        (["serve", str(tmp_path), "--port", "70000"], "is not a port")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err


def test_serve_draft_context_needs_a_restricted_draft_head(world, capsys):
    capsys.readouterr()
    assert main(["serve", str(world["dir"]), "--draft-context", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--draft-context" in err and "whole vocabulary" in err, err

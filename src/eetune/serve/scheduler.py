"""The continuous-batching scheduler behind `eetune serve`.

One scheduler thread owns the model. Requests (`Job`) wait in a bounded queue and are admitted
at step boundaries into one of two lanes:

- **the batched lane** (`SlotTable`, mode `full`): a slot table of per-request KV caches in one
  static buffer per layer, (slots, kv-heads, capacity, head-dim); each slot has its own length,
  positions and mask. Every scheduler step runs at most one prefill *chunk* (`prefill_chunk`
  tokens of the oldest prompt still being read, batch 1) and then one batched decode step (one
  token) over every slot that is decoding: a request that arrives while others decode joins at
  the next step, a finished or cancelled one leaves it, and a long prompt costs the others one
  chunk per step, not its whole length. The layers are the backbone adapter's own calls
  (`Adapter._call`, as `eetune.decode.engine` runs them); no modelling code is copied.
- **the solo lane** (modes `early-exit` and `self-spec`): each request runs the existing engine
  (`eetune.decode.api.generate_ids`, batch 1, exactly what `eetune generate` runs) in a worker
  thread that hands control back to the scheduler at every emitted token (or self-spec round):
  the engine becomes resumable step by step without being changed, and threads strictly
  alternate, so the model is never used by two at once. Each solo request decodes on its own
  engine state (a pool of `model.decode_state` dictionaries, reused between requests).

`auto` is resolved when a request is admitted: the small-batch mode (`auto_mode`, self-spec by
default) while at most `ee_max_batch` rows would then run, `full` (batched) above; a request
keeps its mode to its end. So every greedy output equals the offline output of its resolved mode.

The scheduler is driven by `run_forever()` in a thread (the server), or by `step()` directly
(the tests). Per request events go to `job.sink(kind, data)`, called from the scheduler thread.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback

import torch

from eetune.decode.api import DecodeOptions, Emitter, TextStream, TokenStat
from eetune.decode.rules import choose
from eetune.model.rows import few_rows

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests (the server answers 503)."""


class Draining(Exception):
    """The scheduler no longer admits requests (shutting down)."""


@dataclasses.dataclass
class SchedulerConfig:
    max_batch: int = 8  # most requests decoding at once (batched slots and solo requests together)
    max_queue: int = 64  # most requests waiting for a row; more get QueueFull (503)
    ee_max_batch: int = 1  # `auto`: early exit / self-spec while at most this many rows run, batched full above
    auto_mode: str = "self-spec"  # what `auto` uses at small batch: self-spec (lossless) or early-exit
    prefill_chunk: int = 256  # prompt tokens read per scheduler step (chunked prefill, batched lane)
    capacity: int = 2048  # cache slots per row: prompt + new tokens of a request must fit
    step_delay: float = 0.0  # tests only: seconds slept after each step (makes a tiny model slow)


class Job:
    """One request as the scheduler sees it: prompt ids, options (mode may be "auto"), stop
    strings, and where its events go. `cancel()` may be called from any thread; the request
    leaves its row at the next step."""

    def __init__(self, prompt_ids: list[int], opts: DecodeOptions, tokenizer, stop=(), sink=None):
        self.prompt_ids = list(prompt_ids)
        self.opts = opts
        self.requested_mode = opts.mode
        self.mode = None  # resolved at admission
        self.tokenizer = tokenizer
        self.stream = TextStream(tokenizer, tuple(stop))
        self.sink = sink or (lambda kind, data: None)
        self.cancelled = False
        self.finished = False
        self.arrival = time.perf_counter()
        self.first_at = None
        self.last_at = None
        self.ids: list[int] = []
        self.tokens: list[TokenStat] = []
        self.text = ""
        self.finished_by = None
        self.drafted = 0
        self.accepted = 0
        self.error = None
        # batched lane
        self.slot = None
        self.prefilled = 0
        self.emitter: Emitter | None = None
        self.gen: torch.Generator | None = None
        self.next_tok = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.finished_by, self.finished_by)

    def info(self) -> dict:
        n = len(self.tokens)
        return {"mode": self.mode, "requested_mode": self.requested_mode, "token_ids": list(self.ids),
                "mean_exit_layer": sum(t.exit_layer for t in self.tokens) / n if n else None,
                "drafted": self.drafted, "accepted": self.accepted, "finished_by": self.finished_by}


class SlotCache:
    """Key/value buffers of `slots` rows of `capacity` positions per layer (HF attention calls
    `update`). A call writes the block's keys at each row's positions `start[r]..` and returns
    the rows' first `kv` positions; the caller's mask hides every position a query must not see
    (stale positions of a slot's earlier request included)."""

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.rows: list[int] = []
        self.rows_t: torch.Tensor | None = None
        self.pos_t: torch.Tensor | None = None  # (R,) write position of a one-token block per row
        self.start: int = 0  # write position of a one-row block
        self.kv = 0

    def update(self, key, value, layer_idx, cache_kwargs=None):
        i = layer_idx
        if i not in self.k:
            shape = (self.slots, key.shape[1], self.capacity, key.shape[3])
            self.k[i] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.v[i] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        K, V = self.k[i], self.v[i]
        if len(self.rows) == 1:
            s, q = self.rows[0], key.shape[2]
            K[s, :, self.start:self.start + q] = key[0]
            V[s, :, self.start:self.start + q] = value[0]
        else:  # one token per row
            K[self.rows_t, :, self.pos_t] = key[:, :, 0]
            V[self.rows_t, :, self.pos_t] = value[:, :, 0]
        a, b = self.rows[0], self.rows[-1] + 1
        if b - a == len(self.rows):  # contiguous rows: a view
            return K[a:b, :, :self.kv], V[a:b, :, :self.kv]
        return K.index_select(0, self.rows_t)[:, :, :self.kv], V.index_select(0, self.rows_t)[:, :, :self.kv]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def is_compileable(self) -> bool:  # pragma: no cover - HF introspection only
        return False


class SlotTable:
    """The batched lane's model calls: prefill chunks into one slot, decode steps over many."""

    def __init__(self, model, slots: int, capacity: int):
        self.model, self.bb = model, model.backbone
        self.L = self.bb.num_layers
        self.slots, self.capacity = slots, capacity
        self.device = next(self.bb.model.parameters()).device
        self.dtype = next(self.bb.model.parameters()).dtype
        self.cache = SlotCache(slots, capacity)
        self.win = [self.bb.layer_window(i) for i in range(self.L)]
        self.windows = sorted(set(self.win), key=lambda w: -1 if w is None else w)
        self.length = [0] * slots  # positions written per slot
        self.free = list(range(slots))

    def take(self) -> int:
        self.free.sort()
        s = self.free.pop(0)
        self.length[s] = 0
        return s

    def release(self, s: int) -> None:
        self.length[s] = 0
        self.free.append(s)

    def _forward(self, rows: list[int], ids: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """Run every layer on `ids` (R, Q) of slots `rows` whose first token goes at position
        starts[r]; returns the full model's logits of each row's last token (R, V)."""
        R, Q = ids.shape
        bb, dev = self.bb, self.device
        st = torch.tensor(starts, dtype=torch.long, device=dev)
        positions = st[:, None] + torch.arange(Q, device=dev)[None, :]  # (R, Q)
        kv = max(starts) + Q
        c = self.cache
        c.rows, c.kv, c.start = rows, kv, starts[0]
        c.rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        c.pos_t = st
        h = bb.embed(ids, positions)
        ctx = bb.context(h, positions)
        keys = torch.arange(kv, device=dev)
        masks = {}
        for w in self.windows:
            if R == 1 and Q == 1 and (w is None or kv <= w):
                masks[w] = None  # one query that may see every written key (as the engine at batch 1)
                continue
            allowed = keys[None, None, :] <= positions[:, :, None]
            if w is not None:
                allowed = allowed & ((positions[:, :, None] - keys[None, None, :]) < w)
            masks[w] = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(
                ~allowed, torch.finfo(self.dtype).min)[:, None]
        with few_rows(bb):  # on the CPU, the engine's few-row products (eetune.model.rows)
            for i in range(self.L):
                out = bb._call(bb.layers[i], i, h, ctx, masks[self.win[i]], c)
                h = out[0] if isinstance(out, tuple) else out
            logits = bb.logits(bb.final_norm(h[:, -1]))
        for r, s in enumerate(rows):
            self.length[s] = starts[r] + Q
        return logits

    def prefill(self, s: int, ids: list[int]) -> torch.Tensor:
        """A chunk of slot s's prompt; the logits (1, V) after its last token."""
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self._forward([s], t, [self.length[s]])

    def decode(self, rows: list[int], toks: list[int]) -> torch.Tensor:
        """One token per slot in `rows`; their logits (R, V)."""
        order = sorted(range(len(rows)), key=lambda r: rows[r])
        srows = [rows[r] for r in order]
        t = torch.tensor([[toks[r]] for r in order], dtype=torch.long, device=self.device)
        logits = self._forward(srows, t, [self.length[s] for s in srows])
        back = torch.empty(len(rows), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(rows))
        return logits[back.to(logits.device)]


class SoloRun:
    """One early-exit / self-spec request on the existing engine, run in a worker thread that
    yields to the scheduler at every emit (`step()` resumes it until its next emit or its end)."""

    def __init__(self, sched: "Scheduler", job: Job):
        self.sched, self.job = sched, job
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.done = False
        self.state = sched._states.pop() if sched._states else None
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="eetune-solo", daemon=True)
        self.thread.start()

    def _main(self):
        from eetune.decode.api import generate_ids
        self.go.acquire()
        model = self.sched.model
        try:
            model.decode_state = self.state  # this request's own caches (the pool's, or new)
            self.result = generate_ids(model, [self.job.prompt_ids], self.job.opts, on_tokens=self._on_tokens)
        except BaseException as e:  # reported by the scheduler thread
            self.error = e
            self.error_tb = traceback.format_exc()
        finally:
            if self.state is None:
                self.state = model.decode_state
            self.done = True
            self.back.release()

    def _on_tokens(self, b, toks, stats):
        if self.state is None:
            self.state = self.sched.model.decode_state
        go_on = self.sched._deliver(self.job, toks, stats)
        self.back.release()  # hand the model back: one step done
        self.go.acquire()
        return go_on and not self.job.cancelled and not self.sched._abort

    def step(self) -> None:
        self.go.release()
        self.back.acquire()


class Scheduler:
    def __init__(self, model, tokenizer, cfg: SchedulerConfig | None = None, metrics=None):
        self.model, self.tokenizer = model, tokenizer
        self.cfg = cfg or SchedulerConfig()
        self.metrics = metrics
        self.L = model.backbone.num_layers
        self.table = SlotTable(model, self.cfg.max_batch, self.cfg.capacity)
        self.device = self.table.device
        self.waiting: collections.deque[Job] = collections.deque()
        self.prefilling: list[Job] = []
        self.decoding: list[Job] = []
        self.solo: list[SoloRun] = []
        self._states: list = []  # engine states free for the next solo request
        self._cv = threading.Condition()
        self.accepting = True
        self._stop = False
        self._abort = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # --- admission -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if not self.accepting:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.cfg.max_queue})")
            self.waiting.append(job)
            self._cv.notify()
        self._gauges()

    def live(self) -> int:
        return len(self.prefilling) + len(self.decoding) + len(self.solo)

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    self._finish(job, "cancelled")
                    continue
                live = self.live()
                if live >= self.cfg.max_batch:
                    return
                self.waiting.popleft()
            try:
                self._start(job, live)
            except Exception as e:  # a request that cannot start fails alone
                traceback.print_exc()
                job.error = f"{type(e).__name__}: {e}"
                self._leave(job, "error")

    def _start(self, job: Job, live: int) -> None:
        """Resolve `auto`, then give the job a slot (full) or a solo run."""
        mode = job.requested_mode
        if mode == "auto":
            mode = self.cfg.auto_mode if live + 1 <= self.cfg.ee_max_batch else "full"
        job.mode = mode
        job.opts = dataclasses.replace(job.opts, mode=mode)
        if mode == "full":
            job.slot = self.table.take()
            job.emitter = Emitter([job.prompt_ids], job.opts, self.device,
                                  on_tokens=lambda b, toks, stats, job=job: self._deliver(job, toks, stats))
            if job.opts.temperature > 0:
                job.gen = torch.Generator(device=self.device)
                if job.opts.seed is not None:
                    job.gen.manual_seed(job.opts.seed)
                else:
                    job.gen.seed()
            self.prefilling.append(job)
        else:
            self.solo.append(SoloRun(self, job))

    # --- one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Admit what fits, then one prefill chunk, one batched decode step and one step of each
        solo request. Returns whether anything ran."""
        self._admit()
        self._gauges()
        if not self.live():
            return False
        self.steps += 1
        for job in [j for j in self.prefilling + self.decoding if j.cancelled]:
            self._leave(job, "cancelled")
        decoding = list(self.decoding)
        try:
            if self.prefilling:
                self._prefill_chunk(self.prefilling[0])
            if decoding:
                self._decode(decoding)
        except Exception as e:  # a failed step fails the batched lane's requests, never the server
            self._fail_batched(e)
        for run in list(self.solo):  # a cancelled one stops at its next emit
            run.step()
            if run.done:
                self.solo.remove(run)
                self._end_solo(run)
        self._gauges()
        if self.cfg.step_delay:
            time.sleep(self.cfg.step_delay)
        return True

    def _prefill_chunk(self, job: Job) -> None:
        chunk = job.prompt_ids[job.prefilled:job.prefilled + self.cfg.prefill_chunk]
        logits = self.table.prefill(job.slot, chunk)
        job.prefilled += len(chunk)
        if job.prefilled < len(job.prompt_ids):
            return
        self.prefilling.remove(job)
        tok = int(choose(logits, job.opts, job.gen)[0])
        self.decoding.append(job)
        self._emit(job, tok)

    def _decode(self, jobs: list[Job]) -> None:
        logits = self.table.decode([j.slot for j in jobs], [j.next_tok for j in jobs])
        greedy = all(j.opts.temperature == 0 for j in jobs)
        toks = logits.argmax(-1).tolist() if greedy else None
        for r, job in enumerate(jobs):
            tok = toks[r] if greedy else int(choose(logits[r:r + 1], job.opts, job.gen)[0])
            self._emit(job, tok)

    def _emit(self, job: Job, tok: int) -> None:
        em = job.emitter
        em.emit(0, [tok], [TokenStat(tok, self.L, float("nan"))])
        job.next_tok = tok
        if em._done[0]:
            self._leave(job, em.rows[0].finished_by)

    def _leave(self, job: Job, why: str) -> None:
        for lane in (self.prefilling, self.decoding):
            if job in lane:
                lane.remove(job)
        if job.slot is not None:
            self.table.release(job.slot)
            job.slot = None
        self._finish(job, why)

    def _fail_batched(self, err: Exception) -> None:
        msg = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        for job in self.prefilling + self.decoding:
            job.error = msg
            self._leave(job, "error")

    def _end_solo(self, run: SoloRun) -> None:
        if run.state is not None:
            self._states.append(run.state)
        job = run.job
        if run.error is not None:
            job.error = f"{type(run.error).__name__}: {run.error}"
            self._finish(job, "error")
            return
        r = run.result.rows[0]
        job.drafted, job.accepted = run.result.drafted, run.result.accepted
        self._finish(job, "cancelled" if job.cancelled else r.finished_by)

    # --- per-request output ----------------------------------------------------------------------
    def _deliver(self, job: Job, toks: list[int], stats: list[TokenStat]) -> bool:
        """New tokens of a request (from either lane): text pieces out, timing; False when a stop
        string ends it."""
        now = time.perf_counter()
        m = self.metrics
        if job.first_at is None:
            job.first_at = now
            if m:
                m.first_token(now - job.arrival)
        elif m:
            m.inter_token((now - job.last_at) / len(toks), len(toks))
        job.last_at = now
        go_on = True
        pieces = []
        for tok, st in zip(toks, stats):
            job.ids.append(tok)
            job.tokens.append(st)
            piece, stopped = job.stream.push(tok)
            pieces.append(piece)
            if stopped:
                go_on = False
                break
        if m:
            m.tokens(job.mode, stats[:len(pieces)], self.L)
        text = "".join(pieces)
        if text:
            job.text += text
            _send(job, "text", text)
        return go_on

    def _finish(self, job: Job, why: str) -> None:
        if job.finished:
            return
        job.finished_by = why
        if why in ("eos", "length"):
            final = self.tokenizer.decode(job.ids, skip_special_tokens=True)
            rest = job.stream.finish(final)
            if rest:
                job.text += rest
                _send(job, "text", rest)
        job.finished = True
        if self.metrics:
            self.metrics.finished(job)
        _send(job, "done", job.info())

    # --- the loop --------------------------------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.gauges(len(self.waiting), self.live())

    def run_forever(self) -> None:
        while True:
            ran = False
            try:
                ran = self.step()
            except Exception:  # never let the loop die
                traceback.print_exc()
            if self._stop and not self.live() and (self._abort or not self.waiting):
                break
            if not ran:
                with self._cv:
                    if not self.waiting and not self._stop:
                        self._cv.wait(timeout=0.05)
        for job in list(self.waiting):
            self._finish(job, "cancelled")
        self.waiting.clear()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run_forever, name="eetune-scheduler", daemon=True)
        self.thread.start()

    def stop_accepting(self) -> None:
        with self._cv:
            self.accepting = False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop: cancel what still runs or waits (their rows leave at the next step), end the loop."""
        with self._cv:
            self.accepting = False
            self._stop = True
            self._abort = True
            for job in self.waiting:
                job.cancel()
            for job in self.prefilling + self.decoding + [r.job for r in self.solo]:
                job.cancel()
            self._cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)


def _send(job: Job, kind: str, data) -> None:
    try:
        job.sink(kind, data)
    except Exception:  # the receiver is gone (its event loop closed): nothing to tell
        pass


def wait_done(sched: Scheduler, jobs: list[Job], max_steps: int = 100000) -> None:
    """Tests: step the scheduler (no thread) until these jobs are finished."""
    for _ in range(max_steps):
        if all(j.finished for j in jobs):
            return
        sched.step()
    raise RuntimeError("jobs did not finish")


__all__ = ["Draining", "Job", "QueueFull", "Scheduler", "SchedulerConfig", "SlotCache", "SlotTable", "SoloRun",
           "wait_done"]

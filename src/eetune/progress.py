"""Progress of long work: a tqdm bar on a terminal, status lines elsewhere (a log file, a pipe,
a batch job: one line at most every 30 s with the step, the loss, tokens/s and an ETA), so that
a run never prints nothing for minutes. Every long loop goes through `progress_display` (or
`progress_iter`): tuning, gate fitting, generated data (`generated:N`), `evaluate`, `calibrate`,
`eval`, `scan` and the exit-vocabulary ranking of `convert`. A loop's `progress` flag says whether
it shows anything (the CLI's --no-progress: nothing); where it does, the stream decides the form.
"""

from __future__ import annotations

import math
import os
import sys
import time

from tqdm.auto import tqdm

from eetune.errors import EETuneError


PROGRESS_INTERVAL_S = 30.0  # seconds between status lines (stderr not a terminal)
PROGRESS_ENV = "EETUNE_PROGRESS_INTERVAL"  # overrides it: seconds (0: after every step), or "off"


def progress_interval() -> float | None:
    """Seconds between status lines: $EETUNE_PROGRESS_INTERVAL, else `PROGRESS_INTERVAL_S`; None
    when the variable says off (or none, no)."""
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    if not raw:
        return PROGRESS_INTERVAL_S
    if raw.lower() in ("off", "none", "no"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or not math.isfinite(value):
        raise EETuneError(f"{PROGRESS_ENV}={raw!r}: give seconds between progress lines (>= 0), or off")
    return value


def _is_terminal(stream) -> bool:
    """Whether a bar redrawn in place shows on `stream`: a terminal, or a Jupyter cell."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.split(".")[0] == "ipykernel"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StatusLines:
    """What replaces a progress bar where stderr is not a terminal (a log file, a pipe, a batch
    job), where a bar redrawn in place either shows nothing or fills the log: one line at most
    every `interval` seconds, e.g.

        tune: step 120/400 (30%), loss 1:3.412 3:2.951, 8,123 tok/s, elapsed 1m02s, ETA 2m25s

    (done/total, the fields of `set_postfix`, the time so far and the estimated time left at
    the rate of this process's steps), and a last line from `close` when any was printed. The
    calls are tqdm's: `update`, `set_postfix`, `close`, and `total` may be changed on the way (a
    loop whose length is an estimate). A total of 0 or None (not known) gives `step 12` with no
    share and no ETA."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, initial: int = 0, file=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval, self.clock = total, desc, unit, interval, clock
        self.n = self.start = initial
        self.t0 = self.last = clock()
        self.fields: dict = {}
        self.printed_at: int | None = None
        self.file = file

    def set_postfix(self, fields: dict | None = None, refresh: bool = False, **kwargs) -> None:
        """tqdm's: the fields as a dict, or as keywords (`set_postfix(epoch=1, loss="2.3")`)."""
        self.fields = {**(fields or {}), **{k: kwargs[k] for k in sorted(kwargs)}}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if self.printed_at is not None and self.printed_at != self.n:
            self._print(self.clock(), done=True)

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.t0
        if self.total:
            parts = [f"{self.desc}: {self.unit} {self.n:,}/{self.total:,} ({100 * self.n / self.total:.0f}%)"]
        else:  # not known
            parts = [f"{self.desc}: {self.unit} {self.n:,}"]
        for key, value in self.fields.items():
            parts.append(f"{value} {key}" if key.endswith("/s") else f"{key} {value}")
        parts.append(f"elapsed {_duration(elapsed)}")
        ran = self.n - self.start
        if done:
            parts.append("done" if not self.total or self.n >= self.total else "stopped")
        elif ran > 0 and self.total:
            parts.append(f"ETA {_duration(elapsed / ran * max(0, self.total - self.n))}")
        else:
            parts.append("ETA unknown")
        return ", ".join(parts)

    def _print(self, now: float, done: bool = False) -> None:
        print(self.line(now, done), file=self.file or sys.stderr, flush=True)
        self.printed_at = self.n


def progress_display(total: int | None, desc: str, unit: str, bar: bool, lines: bool = True, initial: int = 0,
                     leave: bool = True):
    """How a long loop shows its progress: a tqdm bar when `bar` and stderr is a terminal
    (`leave=False`: wiped when done, for a loop inside a longer one); `StatusLines` when stderr
    is not a terminal and `lines` (whether or not `bar`: a run that prints nothing for minutes
    looks hung); else a disabled bar. The verbs pass `bar=lines=progress` (--no-progress: nothing);
    `eetune tune` passes lines=True whatever its --no-progress (EETUNE_PROGRESS_INTERVAL=off stops
    them). Processes other than rank 0 pass neither. `total`: None or 0 when not known."""
    if bar and _is_terminal(sys.stderr):
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=leave)
    interval = progress_interval() if lines and not _is_terminal(sys.stderr) else None
    if interval is not None:
        return StatusLines(total, desc, unit, interval, initial=initial)
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=True)


def progress_iter(items, desc: str, unit: str, progress: bool, total: int | None = None, leave: bool = True):
    """`items` one at a time, the progress shown as `progress_display(bar=progress,
    lines=progress)` counts them (a bar on a terminal, status lines elsewhere, nothing without
    `progress`): what `tqdm(items, disable=not progress)` was. `total`: len(items) by default."""
    if total is None:
        total = len(items)
    bar = progress_display(total, desc, unit, bar=progress, lines=progress, leave=leave)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()

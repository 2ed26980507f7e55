"""Crash-safe file writes: a file appears under its final name whole, or not at all.

`atomic_write(path, write)` calls `write(tmp_path)` on a temporary name in the same directory,
fsyncs the file, gives it the mode of the file it replaces (or the umask's default), renames it
over `path` and fsyncs the directory, so that after a crash (power
loss included) the name holds either the old content or the new, never a torn file. A failure
removes the temporary file. `atomic_write_text` / `atomic_write_json` are the common cases.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or creation inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write `path` through `write(tmp)` (which creates the file `tmp`), durably and atomically.

    The temporary copy is `.NAME.tmp-PID-*`, so that a later write of the same path (`clean_stale`)
    removes the copy a killed writer left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())  # not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data) -> Path:
    """Sorted, indented JSON; NaN and infinities refused (they are not JSON)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


# --- directories ----------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(target: str | Path) -> Path:
    """A new empty directory beside `target` to build its next content in; its name carries
    this process's pid so that `clean_stale` can tell a dead writer's leftovers."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the staging or replaced copies of `target` (`.NAME.tmp-PID-*`, `.NAME.old-PID*`)
    left by processes that no longer run. Returns what was removed."""
    import re
    import shutil

    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. a file system without RENAME_EXCHANGE: fall back


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Publish the finished directory `new` (from `staging_dir`) as `target`, durably: its files
    and itself are fsynced, then it takes `target`'s place. An existing `target` is swapped out
    in one atomic step where the system allows (Linux), so the name never points at nothing and
    never at a half-written directory; elsewhere two renames leave a brief gap. The old content
    is removed afterwards; if a crash prevents that, `clean_stale` removes it on the next write."""
    import shutil

    new, target = Path(new), Path(target)
    for f in new.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(new)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):  # `new` now holds the old content, under its staging name
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


# --- locks ----------------------------------------------------------------------------------
class PidLock:
    """An exclusive lock on a path held by a running process: the file `path` created with
    O_EXCL and holding the holder's pid. A lock whose holder no longer runs is taken over with
    a warning; one held by a live process is refused with a one-line EETuneError naming it."""

    def __init__(self, path: str | Path, what: str, remedy: str):
        self.path, self.what, self.remedy = Path(path), what, remedy
        self.held = False

    def acquire(self) -> "PidLock":
        import sys

        from eetune.errors import EETuneError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise EETuneError(f"{self.what} is in use by another eetune process (pid {pid}, lock "
                                      f"{self.path}): {self.remedy}") from None
                print(f"eetune: warning: taking over the stale lock {self.path} of process {pid or '?'}, which no "
                      f"longer runs", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise EETuneError(f"cannot take the lock {self.path}: remove it if no eetune process is running")

    def release(self) -> None:
        if self.held:
            try:
                if self.path.read_text().strip() == str(os.getpid()):
                    self.path.unlink()
            except OSError:
                pass
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

"""The output folder of `eval` and its `results.jsonl`: checked, claimed, appended, read strictly.

- `claim(out)` checks the folder before any model work (it must be, or be creatable as, a
  writable folder) and holds its lock for the whole run, so two runs on one folder never compute
  (and append) the same cell twice: the second is refused with one clear error. Claims nest
  within a process (the CLI claims, then `run_grid` claims again).
- `append_rows` writes complete lines only, under that lock, in one write; a failed write (disk
  full) is cut back, and a fragment left by a killed run (a last line without its newline) is
  dropped first, so every row starts on its own line.
- `read_rows` skips such a fragment (it is not a row; its cell is computed again), refuses a
  malformed row with the file and line, and keeps the first row of each cell, so a file written
  by concurrent runs of an older version never counts a cell twice.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

RESULTS = "results.jsonl"
LOCK = RESULTS + ".lock"
KEY_FIELDS = ("config", "task", "haystack", "length", "sample")  # one cell of the grid

_HELD: dict[str, list] = {}  # lock path -> [FileLock, nesting depth] held by this process


def row_key(row: dict) -> tuple:
    # one cell per dtype too; rows written before dtype was recorded ran in float32
    return (*(row[k] for k in KEY_FIELDS), row.get("dtype") or "float32")


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is not a folder, if any."""
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def check_out_dir(out: Path) -> Path:
    """Create the output folder if needed and check it can be written; ValueError naming it otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; it must name a folder (for results.jsonl and the report)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_ancestor(out)
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(blocker or out.parent)!r} is a file") from None
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} cannot be created: {e.strerror or e}") from None
    results = out / RESULTS
    if results.exists() and not results.is_file():
        raise ValueError(f"{str(results)!r} exists but is not a file")
    probe = out / f".attnsieve-write-test-{os.getpid()}"
    try:  # write access as this process really has it (os.access misleads for root and read-only mounts)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
        if results.exists():
            os.close(os.open(results, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        raise ValueError(f"--out {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


@contextlib.contextmanager
def claim(out: Path) -> Iterator[Path]:
    """Check `out` and hold its lock until the block ends; refuses (ValueError) if another process holds it."""
    from filelock import FileLock, Timeout

    out = check_out_dir(out)
    path = str((out / LOCK).resolve())
    if path in _HELD:  # this process already claimed the folder
        _HELD[path][1] += 1
        try:
            yield out
        finally:
            _HELD[path][1] -= 1
        return
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(
            f"--out {str(out)!r} is in use by another attnsieve eval (it holds {path}); "
            "wait for it to finish or choose another folder"
        ) from None
    except OSError as e:
        raise ValueError(f"--out {str(out)!r}: cannot lock {path}: {e.strerror or e}") from None
    _HELD[path] = [lock, 1]
    try:
        yield out
    finally:
        del _HELD[path]
        lock.release()


def _holds(out: Path) -> bool:
    return str((Path(out) / LOCK).resolve()) in _HELD


def _check_row(row, path: Path, line_no: int) -> dict:
    if not isinstance(row, dict):
        raise ValueError(
            f"{path}:{line_no}: a results row must be a JSON object, got {type(row).__name__}; "
            "delete that line to compute its cell again"
        )
    missing = [k for k in KEY_FIELDS if k not in row]
    if missing:
        raise ValueError(
            f"{path}:{line_no}: results row lacks {', '.join(missing)}; delete that line to compute its cell again"
        )
    try:
        hash(row_key(row))
    except TypeError:
        raise ValueError(
            f"{path}:{line_no}: results row has a non-scalar {', '.join(KEY_FIELDS)}; "
            "delete that line to compute its cell again"
        ) from None
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file, one per cell (the first one written), without a trailing fragment."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); it is not an attnsieve results file") from None
    lines = text.split("\n")
    lines.pop()  # what follows the last newline: "" or a fragment cut short by a killed run, not a row
    rows, seen = [], set()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{i}: not a JSON row ({e.msg}); delete that line to compute its cell again"
            ) from None
        key = row_key(_check_row(row, path, i))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def _drop_fragment(fd: int) -> int:
    """Cut a trailing line without newline off the file open at `fd`; returns the new size."""
    size = os.fstat(fd).st_size
    end = size
    chunk = 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        if end == size and data.endswith(b"\n"):
            return size
        nl = data.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            os.ftruncate(fd, keep)
            return keep
        end = start
    os.ftruncate(fd, 0)
    return 0


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    """Append `rows` as complete JSON lines, under the output folder's lock (taken here if not held)."""
    if not rows:
        return
    path = Path(path)
    data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    with contextlib.ExitStack() as stack:
        if not _holds(path.parent):
            stack.enter_context(claim(path.parent))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = _drop_fragment(fd)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except BaseException:  # disk full, interrupted: leave no partial row behind
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

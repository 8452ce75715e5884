"""The run directory of ``beyondgrad train``: atomic writes, a log reader that tolerates a
truncated last line, checkpoints.

Files of a run directory: ``config.json`` (every setting), ``cockpit.jsonl`` (the Cockpit's
log, one JSON record per line), ``checkpoint.pt`` (model, optimizer, LR scheduler, Cockpit,
RNG and progress), ``summary.json``, ``dashboard.png``/``.svg``. Every file but the log (which
is appended to, line by line) is written to a temporary file in the same directory and renamed
over the target (``os.replace``), so a kill at any moment leaves the previous version or the new
one, never a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RUN_FILES = (
    "config.json",
    "cockpit.jsonl",
    "checkpoint.pt",
    "summary.json",
    "dashboard.png",
    "dashboard.svg",
)
"""The files ``beyondgrad train`` writes into a run directory."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (not empty, not writable, not a run)."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which then
    replaces ``path`` in one rename. On any error the temporary file is removed and ``path``
    is left as it was. Returns ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, value: Any) -> Path:
    """``json.dumps(value)`` to ``path``, atomically."""
    text = json.dumps(value, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, tensors moved to ``device`` (RNG
    states stay on the CPU)."""
    return torch.load(path, map_location=device, weights_only=True)


def prepare(out: Path, overwrite: bool) -> None:
    """Make ``out`` a fresh run directory: create it and check that it is writable; refuse a
    directory that holds anything unless ``overwrite`` (which removes the run files only).

    Raises:
        RunDirError: not empty (and not ``overwrite``), or not writable.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"--out {out} is not empty: continue that run with `beyondgrad train --resume "
                f"{out}`, replace it with --overwrite, or choose another --out"
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    check_writable(out)


def check_writable(out: Path) -> None:
    """Create ``out`` (with parents) and write and remove a probe file there.

    Raises:
        RunDirError: naming the directory and the system's reason.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {out}: {err.strerror or err}") from None


def log_path(path: str | Path) -> Path:
    """The Cockpit log of a run directory, or ``path`` itself if it is a file."""
    path = Path(path)
    return path / "cockpit.jsonl" if path.is_dir() else path


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``cockpit.jsonl`` log (or of a run directory holding one), partial
    records of one step merged, sorted by step. A truncated last line (a write cut short by a
    kill) is skipped with a warning.

    Raises:
        RunDirError: no log there, a malformed line before the last, or no record at all.
    """
    path = log_path(path)
    if not path.is_file():
        raise RunDirError(f"no Cockpit log at {path} (expected a run directory or its log)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is not a Cockpit log ({err})") from None
    return merge(parse_lines(path, lines))


def parse_lines(path: Path, lines: Sequence[str]) -> list[dict[str, Any]]:
    """JSON records with an integer ``step`` from ``lines``; see :func:`read_log`."""
    records: list[dict[str, Any]] = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            records.append(record)
        elif k == len(numbered) - 1 and records:
            warnings.warn(f"{path}: skipped a truncated last line ({i})", stacklevel=3)
        else:
            raise RunDirError(f"{path} is not a Cockpit log: line {i} is not a JSON record")
    if not records:
        raise RunDirError(f"{path} is not a Cockpit log: it holds no records")
    return records


def merge(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same step merged into one, sorted by step."""
    merged: dict[int, dict[str, Any]] = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(record)
    return [merged[k] for k in sorted(merged)]


def truncate_log(path: Path, before: int) -> None:
    """Keep only the log lines of steps ``< before`` (atomically); drops a truncated line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] < before:
                keep.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


def draw_dashboard(records: Sequence[dict[str, Any]], path: Path, title: str) -> list[Path]:
    """The Cockpit dashboard of ``records`` to ``path`` (PNG) and its ``.svg`` twin, each
    written atomically. Returns both paths."""
    from ..cockpit import draw

    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    written: list[Path] = []
    try:
        for drawn in draw(list(records), tmp, title=title):
            final = path.with_suffix(drawn.suffix)
            os.chmod(drawn, 0o666 & ~_umask())
            os.replace(drawn, final)
            written.append(final)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".svg").unlink(missing_ok=True)
    return written


__all__ = [
    "RUN_FILES",
    "RunDirError",
    "atomic_write",
    "check_writable",
    "draw_dashboard",
    "load_checkpoint",
    "log_path",
    "merge",
    "prepare",
    "read_log",
    "save_checkpoint",
    "truncate_log",
    "write_json",
]

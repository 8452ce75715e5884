"""Where the Cockpit's records go: ``cockpit.jsonl`` (one JSON object per line; a later line
of the same step adds to it) and, optionally, TensorBoard scalars and Weights & Biases."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any


def wandb_module(wanted: bool | None) -> Any:
    """The ``wandb`` module to log to, or None.

    Args:
        wanted: None: ``wandb`` if the program has imported it and a run is active; True:
            required (import it; a run must be active); False: never.

    Raises:
        ImportError: ``wanted=True`` without the package.
        RuntimeError: ``wanted=True`` without an active run.
    """
    if wanted is False:
        return None
    module = sys.modules.get("wandb")
    if wanted and module is None:
        try:
            import wandb as module  # type: ignore[no-redef]
        except ImportError as err:
            raise ImportError("wandb=True needs the wandb package (pip install wandb)") from err
    if module is None or getattr(module, "run", None) is None:
        if wanted:
            raise RuntimeError("wandb=True needs an active run: call wandb.init() first")
        return None
    return module


class RunLog:
    """Appends records to ``log_dir/cockpit.jsonl`` (and TensorBoard scalars, W&B).

    Args:
        log_dir: the run directory (created if needed); None: no file (W&B only).
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
        wandb: the ``wandb`` module to log scalars to (``wandb.log({"cockpit/<key>": value},
            step=step)``), or None.
    """

    def __init__(self, log_dir: Path | None, tensorboard: bool = False, wandb: Any = None):
        self._file: Any = None
        self._tb: Any = None
        self._wandb = wandb
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(log_dir / "cockpit.jsonl", "a")
        if tensorboard:
            if log_dir is None:
                raise ValueError("tensorboard=True needs a log_dir")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "tensorboard=True needs the tensorboard package (pip install tensorboard)"
                ) from err
            self._tb = SummaryWriter(str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (its finite numbers also as scalars ``cockpit/<key>``)."""
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        numbers = {
            f"cockpit/{key}": value
            for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)
        }
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def parse_log(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a ``cockpit.jsonl`` file, in file order.

    A last line that is not a complete record (a write cut short when the run was killed) is
    skipped with a ``RuntimeWarning``; blank lines are ignored.

    Args:
        path: the log file.

    Returns:
        The records (dicts with an integer ``"step"``).

    Raises:
        ValueError: a malformed line before the last one.
    """
    lines = [(i, t) for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip()]
    records: list[dict[str, Any]] = []
    for k, (i, text) in enumerate(lines):
        try:
            record = json.loads(text)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            records.append(record)
        elif k == len(lines) - 1:
            warnings.warn(
                f"{path}: skipped a truncated last line ({i}); the run was probably killed "
                "while writing it",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            raise ValueError(f"{path} is not a Cockpit log: line {i} is not a JSON record")
    return records


__all__ = ["RunLog", "parse_log", "wandb_module"]

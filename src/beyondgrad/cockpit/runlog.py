"""Where the Cockpit's records go: ``cockpit.jsonl`` (one JSON object per line; a later line
of the same step adds to it) and, optionally, TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records to ``log_dir/cockpit.jsonl`` (and TensorBoard scalars).

    Args:
        log_dir: the run directory (created if needed).
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
    """

    def __init__(self, log_dir: Path, tensorboard: bool = False):
        log_dir.mkdir(parents=True, exist_ok=True)
        self._file: Any = open(log_dir / "cockpit.jsonl", "a")
        self._tb: Any = None
        if tensorboard:
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
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"cockpit/{key}", value, record["step"])

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


__all__ = ["RunLog"]

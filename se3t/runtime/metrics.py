"""Run output: JSON-lines metrics, optional TensorBoard, a progress bar on a terminal, messages.

Only rank 0 writes. ``--log_dir DIR`` receives ``metrics.jsonl`` (one JSON object per line, with a ``"kind"``
field: ``config``, ``train_step``, ``train_epoch``, ``validation``, ``benchmark``, ``summary`` ...) and
``summary.json``; TensorBoard event files go to the same directory when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "progress", "setup_console_logging", "log"]

log = logging.getLogger("se3t")


def setup_console_logging(silent: bool = False, rank: int = 0) -> None:
    """Messages go to stderr as plain lines; ``--silent`` and non-zero ranks only show warnings and errors."""
    level = logging.WARNING if (silent or rank != 0) else logging.INFO
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (not the one at setup)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return _jsonable(value.item())
    return str(value)


class MetricsLogger:
    """Appends metric records to ``<log_dir>/metrics.jsonl`` (and TensorBoard when available)."""

    def __init__(self, log_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and log_dir is not None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, kind: str, step: int | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3)}
        if step is not None:
            record["step"] = step
        record.update(_jsonable(fields))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and step is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.write("summary", **summary)
        (self.log_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar (loss, mol/s and ETA) on a terminal; a silent stand-in when quiet or not a TTY."""
    if not enabled or not sys.stderr.isatty():
        return _Quiet()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Quiet()
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, unit="step",
                file=sys.stderr)


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

"""Dashboard drawing off the training step's critical path: a background worker thread.

:class:`Drawer` runs drawing jobs (callables) one at a time in a daemon thread. ``submit``
never waits: it replaces a job still waiting with the newer one (only the latest dashboard
matters) and returns at once, even while a slow draw is under way. ``run`` draws in the
calling thread once the worker is idle (on demand, at the end). The time spent drawing is
summed in :attr:`Drawer.seconds` (and counted in :attr:`Drawer.count`), apart from the steps.

Matplotlib is used through its object API only (``matplotlib.figure.Figure``), never pyplot,
and one job draws at a time, so drawing in a thread is safe. The thread shares the GIL with
training; PyTorch releases it inside its kernels.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

Job = Callable[[], Any]


class Drawer:
    """A background worker for drawing jobs (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._draw_lock = threading.Lock()  # one draw at a time, worker or caller
        self._pending: Job | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        #: seconds spent drawing (worker and :meth:`run`), and the number of draws
        self.seconds = 0.0
        self.count = 0

    def submit(self, job: Job) -> None:
        """Draw ``job`` in the background; returns at once (a job still waiting is dropped)."""
        self._report()
        with self._cond:
            self._pending = job
            if self._thread is None:  # the worker lives while there is work
                self._thread = threading.Thread(
                    target=self._loop, name="beyondgrad-dashboard", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def run(self, job: Job) -> Any:
        """Wait for the background jobs, then run ``job`` here (timed); returns its result."""
        self.wait()
        return self._timed(job)

    def wait(self) -> None:
        """Block until no job is waiting or being drawn; warn about background failures."""
        with self._cond:
            while self._pending is not None or self._busy:
                self._cond.wait()
        self._report()

    def close(self) -> None:
        """Finish the jobs; the worker thread ends (it lives only while there is work)."""
        self.wait()
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._pending is None:  # no more work: the thread ends
                    self._thread = None
                    self._cond.notify_all()
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._timed(job)
            except Exception as err:
                self._errors.append(err)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _timed(self, job: Job) -> Any:
        with self._draw_lock:
            start = time.perf_counter()
            try:
                return job()
            finally:
                self.seconds += time.perf_counter() - start
                self.count += 1

    def _report(self) -> None:
        while self._errors:
            err = self._errors.pop(0)
            warnings.warn(
                f"Cockpit: drawing the dashboard in the background failed: {err!r}",
                RuntimeWarning,
                stacklevel=3,
            )


__all__ = ["Drawer"]

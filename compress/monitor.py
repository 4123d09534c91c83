"""Wall time and peak resident memory of each stage of a run."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil

from compress.memory import release_memory


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval = interval
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


class StageMonitor:
    """Records ``{"name", "wall_s", "peak_rss_mb"}`` for each ``with monitor.stage(name):`` block.

    With ``trim``, each stage ends by handing the heap pages it freed back to the OS
    (:func:`compress.memory.release_memory`), so one stage's garbage does not add to the next
    stage's peak resident memory.
    """

    def __init__(self, trim: bool = True):
        self.stages: list[dict] = []
        self.trim = trim

    @contextmanager
    def stage(self, name: str):
        sampler = _RssSampler()
        sampler.start()
        start = time.perf_counter()
        record = {"name": name}
        try:
            yield record
        finally:
            if self.trim:
                release_memory()
            record["wall_s"] = round(time.perf_counter() - start, 3)
            record["peak_rss_mb"] = round(sampler.stop() / 2**20, 1)
            self.stages.append(record)

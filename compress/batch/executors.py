"""Where job attempts run: the :class:`Executor` protocol, :class:`LocalExecutor` (one spawned
process per attempt, at most ``workers`` at once) and :class:`RayExecutor` (one Ray task per
attempt, with the job's resources); Ray is imported only when that executor is entered."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import traceback
from typing import Any, Callable, Optional, Protocol

from compress.batch.jobs import Batch
from compress.batch.spec import Resources
from compress.errors import CompressError

RAY_MISSING = 'executor: ray needs `pip install ray` (or `pip install -e ".[ray]"`)'


class Executor(Protocol):
    """Runs job attempts somewhere. Used as a context manager around all submissions."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc_info: Any) -> None: ...

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> Any:
        """Start ``function(task)``; return a handle."""

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        """Wait until at least one of ``handles`` finishes; return (handle, outcome dict) for each finished one."""


def limit_torch_threads(threads: int) -> None:
    """Worker initializer: jobs sharing a machine split its cores instead of each using all of them."""
    import torch  # heavy: imported in the worker process, not by whoever loads the batch

    torch.set_num_threads(threads)


class LocalAttempt:
    """One attempt queued on a LocalExecutor: the call to make and, once started, its future and
    the single-process pool that runs it."""

    def __init__(self, function: Callable[[dict], dict], task: dict):
        self.function = function
        self.task = task
        self.pool: Any = None
        self.future: Any = None


class LocalExecutor:
    """Runs each attempt in its own spawned process, at most ``workers`` at once, with the machine's
    cores split between them. A fresh process per attempt means a retry never inherits a broken CUDA
    context or a fragmented heap, and a process that dies (e.g. killed for memory) fails only its
    own job."""

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self._waiting: list[LocalAttempt] = []
        self._running: list[LocalAttempt] = []

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        for attempt in self._running:
            attempt.pool.shutdown(wait=exc_type is None, cancel_futures=True)
        self._waiting, self._running = [], []

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> LocalAttempt:
        attempt = LocalAttempt(function, task)
        self._waiting.append(attempt)
        self._start_waiting()
        return attempt

    def _start_waiting(self) -> None:
        while self._waiting and len(self._running) < self.workers:
            attempt = self._waiting.pop(0)
            attempt.pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=limit_torch_threads, initargs=(self.threads,))
            attempt.future = attempt.pool.submit(attempt.function, attempt.task)
            self._running.append(attempt)

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        running = [attempt for attempt in handles if attempt.future is not None]
        done, _ = concurrent.futures.wait([attempt.future for attempt in running],
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        finished = [attempt for attempt in running if attempt.future in done]
        for attempt in finished:
            attempt.pool.shutdown(wait=True)
            self._running.remove(attempt)
        self._start_waiting()
        return [(attempt, _outcome_of(attempt.future.result, "worker process")) for attempt in finished]


def import_ray():
    """The ray module; a CompressError saying how to install it when it is missing."""
    try:
        import ray  # optional dependency (the ray extra)
    except ImportError:
        raise CompressError(RAY_MISSING) from None
    return ray


class RayExecutor:
    """Runs each attempt as a Ray task with the job's CPUs, GPUs and memory. Connects to the cluster
    at ``address`` (or RAY_ADDRESS), else starts a local one; disconnects (and so stops a local
    cluster it started) afterwards, unless Ray was already initialised by the caller."""

    def __init__(self, address: Optional[str] = None):
        self.address = address
        self._ray = None
        self._owns_connection = False
        self._remote: dict[Callable, Any] = {}

    def __enter__(self) -> "RayExecutor":
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address)  # no address: RAY_ADDRESS, else a new local cluster
            self._owns_connection = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._owns_connection:
            self._ray.shutdown()
            self._owns_connection = False

    def submit(self, function: Callable[[dict], dict], task: dict, resources: Resources) -> Any:
        if function not in self._remote:
            self._remote[function] = self._ray.remote(function)
        options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
        if resources.memory:
            options["memory"] = resources.memory
        return self._remote[function].options(**options).remote(task)

    def next_finished(self, handles: list) -> list[tuple[Any, dict]]:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        return [(ref, _outcome_of(lambda ref=ref: self._ray.get(ref), "Ray task")) for ref in ready]


def _outcome_of(get_result: Callable[[], dict], what: str) -> dict:
    """The outcome a finished handle holds; an error outcome when the worker itself died."""
    try:
        return get_result()
    except Exception as error:
        return {"error": f"{what} failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                "seconds": 0.0}


def make_executor(batch: Batch) -> Executor:
    """The executor the batch names."""
    return RayExecutor(batch.address) if batch.executor == "ray" else LocalExecutor(batch.workers)

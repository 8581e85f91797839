"""One thread owns the engine and runs requests one at a time, in arrival order.

One model in memory decodes one sequence at a time (the fused loop is a single sequence's),
so the server queues requests rather than interleaving them. All MLX work happens on this
thread, loading and warm-up included: MLX streams are per thread (mlx-lm's generation
stream is thread-local). A job's responses go back to the asyncio loop that submitted it; a
job whose client went away is skipped if still queued, or stopped between two rounds if
running, so it frees the model at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, Prompt, RunOptions
from .errors import UserError
from .prompt_cache import PromptCache

END = object()  # the last event of every job


@dataclass
class Job:
    prompt: Prompt
    options: RunOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event: Any) -> None:
        """From the worker thread: a GenerationResponse, an exception, or END."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Counts:
    served: int = 0
    cancelled: int = 0  # skipped or stopped because the client went away
    failed: int = 0  # raised something other than a UserError


class Worker:
    def __init__(self, load: Callable[[], Engine], max_queue: int):
        self._load = load
        self._jobs: queue.Queue[Job] = queue.Queue(max_queue)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine: Engine | None = None
        self.prompt_cache = PromptCache()
        self.counts = Counts()
        self.busy = False

    def start(self) -> Engine:
        """Load (and warm up) on the worker thread; re-raise a load error here."""
        threading.Thread(target=self._main, name="kakeya-worker", daemon=True).start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.engine

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, prompt: Prompt, options: RunOptions) -> Job:
        """Queue a job; queue.Full when `max_queue` jobs already wait."""
        job = Job(prompt, options, asyncio.get_running_loop())
        self._jobs.put_nowait(job)
        return job

    def _main(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as exc:  # handed to start(), which re-raises it
            self._error = exc
        self._ready.set()
        while self._error is None:
            job = self._jobs.get()
            self.busy = True
            self._run(job)
            self.busy = False

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                self.counts.cancelled += 1
                return
            responses = self.engine.generate(job.prompt, options=job.options,
                                             prompt_cache=self.prompt_cache)
            with contextlib.closing(responses):
                for response in responses:
                    if job.cancelled.is_set():
                        self.counts.cancelled += 1
                        return
                    job.send(response)
            self.counts.served += 1
        except UserError as exc:
            job.send(exc)
        except Exception as exc:  # one request's failure must not stop the server
            self.counts.failed += 1
            print(f"error: request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            job.send(exc)
        finally:
            job.send(END)

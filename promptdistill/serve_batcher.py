"""`distill serve`'s batching worker: one thread decodes the waiting requests a batch at a
time (serve.py's docstring says how batches form) and hands each row's text on as it decodes."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .serve_openai import ApiError

if TYPE_CHECKING:
    from .answerers import Models
    from .backends.local_sampler import LocalSampler


class Cancelled(Exception):
    """Raised from the token callback when the client went away: stops the decoding loop."""


class _Deltas:
    """Turns tokens into text deltas whose concatenation is exactly the final (stripped)
    answer: waits for the rest of a multi-byte character, holds back leading and trailing
    whitespace until text follows it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.strip())

    def finish(self, final_text: str) -> str:
        return self._advance(final_text)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a job's future, unless its client went away and asyncio cancelled it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


GATHER_SECONDS = 0.05  # the longest a new batch waits for more requests
QUIET_SECONDS = 0.01  # ...and it stops waiting once none has arrived for this long


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch. `on_text` is called from the worker thread."""

    who: str
    ids: list[int]
    params: Any
    seed: int
    on_text: Callable[[str], None] | None = None
    adapter: str | None = None  # the student's LoRA adapter (None: the teacher)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class _Task:
    """Work for the decoding thread between batches (Batcher.between_batches)."""

    run: Callable[[], Any]
    after: Callable[[Job], bool] | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """A bounded queue of jobs and the one thread that decodes them, a batch at a time.

    A batch is the oldest waiting job plus the next waiting jobs with the same model (every
    student is one model: the rows choose their adapters) and sampling settings
    (LocalSampler.generate takes one SamplingParams per batch; seeds are per row), up to
    `max_batch`. Jobs arriving meanwhile wait for the next batch, which
    gathers while jobs keep arriving (QUIET_SECONDS apart, GATHER_SECONDS at most). A client
    that goes away cancels its job: skipped if still waiting, left to finish with its batch
    otherwise (the batch stops early only when every row's client has gone).

    The thread is the only one that runs the models, so whatever changes them (a student
    loaded or unloaded while serving) is handed to it (`between_batches`) and runs between two
    batches. While the model holds several adapters every student row decodes through its own;
    with one, through the model's active adapter, the plain LoRA forward."""

    def __init__(self, samplers: dict[str, LocalSampler], models: Models, max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.samplers, self.models, self.max_batch, self.max_queue = samplers, models, max_batch, max_queue
        self.waiting: deque[Job] = deque()
        self.tasks: list[_Task] = []
        self.ready = threading.Condition()
        self.batch_seconds = 1.0  # the last batch's wall time: the Retry-After estimate
        self.batch_sizes: list[int] = []  # every batch's size, in order (/health reports them)
        self.mixed_batches = 0  # batches whose rows went through more than one student's adapter
        threading.Thread(target=self._work, name="promptdistill-batcher", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self.ready:
            if len(self.waiting) >= self.max_queue:
                wait = max(1, math.ceil(self.batch_seconds * (1 + len(self.waiting) // self.max_batch)))
                raise ApiError(503, f"the server is busy ({len(self.waiting)} requests waiting); retry in {wait} s",
                               kind="server_error", code="server_busy", headers={"Retry-After": str(wait)})
            self.waiting.append(job)
            self.ready.notify()
        return job

    def between_batches(self, task: Callable[[], Any], after: Callable[[Job], bool] | None = None,
                        ) -> concurrent.futures.Future:
        """Run `task` on the decoding thread between two batches, once no job `after` picks is
        waiting any longer (those are decoded first; jobs whose clients left do not count).
        The future holds its result or its exception."""
        t = _Task(task, after)
        with self.ready:
            self.tasks.append(t)
            self.ready.notify()
        return t.future

    def waiting_for(self, pick: Callable[[Job], bool]) -> int:
        """How many of the waiting jobs `pick` picks (not counting those whose clients left)."""
        with self.ready:
            return sum(pick(j) and not j.cancel.is_set() for j in self.waiting)

    def _run_due_tasks(self) -> None:
        with self.ready:
            due = [t for t in self.tasks if t.after is None or not self.waiting_for(t.after)]
            self.tasks = [t for t in self.tasks if t not in due]
        for t in due:
            try:
                result = t.run()
            except Exception as e:  # noqa: BLE001  (the caller gets the error; the worker lives on)
                _settle(t.future, error=e)
            else:
                _settle(t.future, result)

    def _next_batch(self) -> list[Job]:
        """The next batch, or [] when a task is due and no job waits (the worker runs it first)."""
        with self.ready:
            while not self.waiting:
                if self.tasks:  # with nothing waiting, every task is due
                    return []
                self.ready.wait()
            # A batch's clients get their answers together and send their next requests within
            # milliseconds. Starting at the first arrival would decode it alone and keep the rest
            # waiting a whole batch (batches then alternate small and large), so gather while
            # requests keep arriving: until none came for QUIET_SECONDS, at most GATHER_SECONDS.
            deadline = time.monotonic() + GATHER_SECONDS
            while len(self.waiting) < self.max_batch:
                seen, left = len(self.waiting), min(QUIET_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    break
                self.ready.wait(left)
                if len(self.waiting) == seen:
                    break
            while self.waiting and self.waiting[0].cancel.is_set():
                _settle(self.waiting.popleft().future, error=Cancelled())
            if not self.waiting:
                return []
            first = self.waiting[0]
            batch = [j for j in self.waiting if (j.who, j.params) == (first.who, first.params)
                     and not j.cancel.is_set()][:self.max_batch]
            for j in batch:
                self.waiting.remove(j)
            return batch

    def _work(self) -> None:
        while True:
            self._run_due_tasks()
            batch = self._next_batch()
            if not batch:
                continue
            started = time.monotonic()
            try:
                done = self._decode(batch)
            except Exception as e:  # noqa: BLE001  (each client gets the error; the worker lives on)
                for job in batch:
                    _settle(job.future, error=e)
            else:
                for job, completion in zip(batch, done):
                    _settle(job.future, completion)
            self.batch_seconds = time.monotonic() - started
            self.batch_sizes.append(len(batch))
            self.mixed_batches += len({j.adapter for j in batch}) > 1

    def _decode(self, batch: list[Job]) -> list:
        sampler = self.samplers[batch[0].who]
        deltas = [_Deltas(sampler.tokenizer) for _ in batch]

        def on_token(row: int, token: int) -> None:
            if all(j.cancel.is_set() for j in batch):
                raise Cancelled  # nobody is listening: stop decoding
            job = batch[row]
            if job.on_text is not None and not job.cancel.is_set():
                delta = deltas[row].push(token)
                if delta:
                    job.on_text(delta)

        with self.models.context(batch[0].who):
            per_row = batch[0].adapter is not None and len(self.models.student.peft_config) > 1
            adapters = [j.adapter for j in batch] if per_row else None
            done = sampler.generate([j.ids for j in batch], batch[0].params, [j.seed for j in batch], on_token=on_token,
                                    adapters=adapters)
        for job, d, completion in zip(batch, deltas, done):
            rest = d.finish(completion.text) if job.on_text is not None else ""
            if rest:
                job.on_text(rest)
        return done

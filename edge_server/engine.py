"""The engine: admission, batching windows, compatibility buckets, dispatch to Ray workers, fan-out.

Life of a request (all on one asyncio loop, no locks):
1. `admit` validates an ImageSpec (-> EngineError INVALID_ARGUMENT / FAILED_PRECONDITION) and checks capacity
   (-> RESOURCE_EXHAUSTED at once); it returns a Ticket and queues it.
2. The batch loop waits for the first queued ticket, then up to `max_wait_ms` or until `max_batch` are queued,
   takes the window, waits for a worker whose model is free, with one worker tops the window up with the tickets
   queued meanwhile (up to `max_batch`), drops tickets that already left, splits the rest into buckets of
   compatible settings (steps, size, guidance, scheduler) and sends the whole window to that worker (one actor call;
   the worker says when the window's shared phase ends, and then takes the next window, whose shared phase runs
   while the last one's latents are encoded, up to `worker_pipeline` windows in flight).
3. The worker groups each bucket by pooled-embedding similarity and runs every group's shared phase batched.
4. Each group's encoded branch point is handed to the members still waiting (`wait` returns a Delivery).
5. `release` forgets a ticket, whatever happened; when every member of a window left, its work is skipped
   (not yet running) or cancelled (running). Nothing per request outlives `release` (see `stats`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_server.config import ServerConfig
from edge_server.worker import (
    BucketJob,
    BucketRefused,
    BucketSettings,
    GroupResult,
    MemberSpec,
    ModelInfo,
    Payload,
    WindowResult,
)
from sage_core.names import CODEC_MODES, LOSSLESS_MODES, SCHEDULER_NAMES
from sage_core.seeds import MAX_SEED

log = logging.getLogger("sage_edge.engine")
SHOWN_CHARS = 64  # of a client's value echoed in a status message (gRPC drops trailers past 16 KiB)
MAX_RESENDS = 1  # times a window that reached a dead worker goes again after its revival (Engine._call_worker)


class EngineError(Exception):
    """A request failure with a gRPC status name (e.g. "INVALID_ARGUMENT") and a clear message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageSpec:
    """A request as the engine sees it (already translated from protobuf; unset fields are None / 0 / "")."""

    prompt: str
    steps: int = 0
    guidance: float | None = None
    seed: int | None = None
    share: float | None = None
    accepted_codecs: tuple[str, ...] = ()
    height: int = 0
    width: int = 0
    scheduler: str = ""
    model_fingerprint: str = ""
    client_id: str = ""
    host: str = ""  # the peer's host (service.peer_host), for max_streams_per_host
    negative_prompt: str = ""


@dataclass(frozen=True)
class Resolved:
    """A validated request with every default filled in."""

    prompt: str
    steps: int
    guidance: float
    seed: int
    share: float
    codec: str
    height: int
    width: int
    scheduler: str
    client_id: str
    seed_explicit: bool = True
    host: str = ""
    negative_prompt: str = ""

    def bucket_key(self) -> BucketSettings:
        """Requests share a window's shared_phase call only with equal settings (requests with different negative
        prompts share its UNet calls, not a group: the worker plans them apart)."""
        return BucketSettings(self.steps, self.guidance, self.scheduler, self.height, self.width)


@dataclass(frozen=True)
class Delivery:
    """What a member receives: its group's metadata and the encoded branch point in its codec."""

    request_id: str
    group_id: str
    group_size: int
    branch_step: int
    total_steps: int
    scheduler: str
    guidance: float
    seed: int
    latent_shape: tuple[int, ...]
    min_similarity: float
    payload: Payload
    queue_wait_ms: float
    shared_phase_ms: float
    cached_steps: int = 0
    negative_prompt: str = ""


@dataclass(eq=False)
class Ticket:
    """Per-request state, owned by the engine from `admit` until `release`."""

    request_id: str
    request: Resolved
    admitted_at: float
    deadline: float  # time.monotonic() by which the request must be finished
    future: asyncio.Future
    window_id: str | None = None
    dispatched_at: float | None = None
    left: bool = False


@dataclass
class Window:
    """A dispatched batch: its tickets still waiting and whether the worker is running it."""

    window_id: str
    tickets: set[Ticket] = field(default_factory=set)
    running: bool = False
    worker_index: int = -1
    hung: str = ""  # why its worker was killed as hung ("" while it is not)
    slot_returned: bool = False  # its worker's slot was given back (at its shared phase's end, or at its own)


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` (a client's value, for a status message or a log line) cut to `limit` characters, its full length
    noted: echoed whole it could pass gRPC's 16 KiB limit on trailing metadata, and the client would then see
    RESOURCE_EXHAUSTED ("metadata size exceeds hard limit") instead of the status the server meant."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def negotiate_codec(accepted: Sequence[str], preferred: Sequence[str]) -> str:
    """First of the server's `preferred` modes the device accepts (empty: any lossless); same rule as
    sage_core.codec.negotiate. Raises EngineError INVALID_ARGUMENT when none matches."""
    offered = set(accepted) if accepted else set(LOSSLESS_MODES)
    unknown = sorted(m for m in accepted if m not in CODEC_MODES)
    for mode in preferred:
        if mode in offered:
            return mode
    hint = f" (unknown: {clip(str(unknown))})" if unknown else ""
    raise EngineError(
        "INVALID_ARGUMENT",
        f"no common codec: device accepts {clip(str(sorted(accepted)))}{hint}, server offers {list(preferred)}",
    )


def resolve(spec: ImageSpec, config: ServerConfig, info: ModelInfo) -> Resolved:
    """Validate a request against the config's limits and fill in defaults; EngineError on any problem."""

    def bad(message: str) -> EngineError:
        return EngineError("INVALID_ARGUMENT", message)

    prompt = spec.prompt
    if not prompt or not prompt.strip():
        raise bad("prompt is empty")
    if len(prompt) > config.max_prompt_chars:
        raise bad(f"prompt is {len(prompt)} characters long; the limit is {config.max_prompt_chars}")
    if len(spec.negative_prompt) > config.max_prompt_chars:
        raise bad(f"negative prompt is {len(spec.negative_prompt)} characters long; "
                  f"the limit is {config.max_prompt_chars}")
    steps = spec.steps or config.default_steps
    if not 1 <= steps <= config.max_steps:
        raise bad(f"steps must be in [1, {config.max_steps}], got {steps}")
    guidance = config.default_guidance if spec.guidance is None else float(spec.guidance)
    if not 0.0 <= guidance <= 100.0:  # also false for NaN
        raise bad(f"guidance must be in [0, 100], got {guidance}")
    share = config.default_share if spec.share is None else float(spec.share)
    if not 0.0 <= share <= 1.0:
        raise bad(f"share must be in [0, 1], got {share}")
    scheduler = spec.scheduler or config.default_scheduler
    if scheduler not in SCHEDULER_NAMES:
        raise bad(f"unknown scheduler {clip(repr(scheduler))}; choose one of {', '.join(SCHEDULER_NAMES)}")
    height = spec.height or info.default_height
    width = spec.width or info.default_width
    for name, side in (("height", height), ("width", width)):
        if side % 8 or not 8 <= side <= config.max_image_side:
            raise bad(f"{name} must be a multiple of 8 in [8, {config.max_image_side}], got {side}")
    if spec.model_fingerprint and spec.model_fingerprint != info.fingerprint:
        raise EngineError(
            "FAILED_PRECONDITION",
            f"model fingerprint mismatch: device has {clip(spec.model_fingerprint)}, server runs {info.fingerprint}",
        )
    if len(spec.client_id) > 256:
        raise bad("client_id is longer than 256 characters")
    if len(spec.accepted_codecs) > 64:
        raise bad("too many accepted codecs (limit 64)")
    codec = negotiate_codec(spec.accepted_codecs, config.codecs)
    seed = secrets.randbelow(2**31) if spec.seed is None else int(spec.seed)
    if not 0 <= seed <= MAX_SEED:
        raise bad(f"seed must be in [0, 2^63 - 1], got {seed}")
    return Resolved(
        prompt, steps, guidance, seed, share, codec, height, width, scheduler, spec.client_id, spec.seed is not None,
        host=spec.host, negative_prompt=spec.negative_prompt,
    )


class Engine:
    """Schedules requests into windows and fans results out. `workers` are Ray actor handles of EdgeWorker."""

    def __init__(
        self,
        config: ServerConfig,
        workers: list[Any],
        infos: list[ModelInfo],
        worker_factory: Any,
        metrics: Any | None = None,
    ) -> None:
        if not workers or len(workers) != len(infos):
            raise ValueError("one ModelInfo per worker is needed")
        self.config = config
        self.metrics = metrics  # edge_server.metrics.EdgeMetrics or None
        self.info = infos[0]
        self._scheduler_config = json.loads(self.info.scheduler_config_json)
        import sage_core.sampler  # noqa: F401 - torch and diffusers (3 s) now, not in the first admission on the loop
        self._refusals: dict[tuple[str, int], str] = {}  # (scheduler, steps) -> why the model cannot run it, or ""
        self._workers = list(workers)
        self._worker_factory = worker_factory  # () -> new actor handle, used when an actor is dead for good
        self._worker_pids = [i.pid for i in infos]
        # a worker's index while its model is free for the next window's shared phase (at most one window per worker
        # in or waiting for its shared phase; while the last one's latents are encoded, the next one's shared phase
        # runs, up to `worker_pipeline` windows in flight on a worker)
        self._free_workers: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(workers)):
            self._free_workers.put_nowait(i)
        self._in_flight = [0] * len(workers)  # windows dispatched to each worker and not ended
        self._owed = [0] * len(workers)  # slots held back at a shared phase's end by worker_pipeline
        self._revivals: dict[int, asyncio.Task] = {}  # one revival per worker, awaited by each window it failed
        self.on_availability: Callable[[bool], None] | None = None  # told when no worker is up any more, and back
        self._available = True
        self._queue: deque[Ticket] = deque()
        self._collected: list[Ticket] = []  # the window the batch loop holds while it waits for a free worker
        self._queued_event = asyncio.Event()
        self._tickets: dict[str, Ticket] = {}
        self._windows: dict[str, Window] = {}
        self._per_client: Counter[str] = Counter()  # open streams per client id
        self._per_host: Counter[str] = Counter()  # open streams per peer host
        self._counts: Counter[str] = Counter()
        self._status_counts: Counter[str] = Counter()
        self._window_ids = itertools.count()
        self._accepting = True
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batch loop and one death watch per worker (call from the running event loop)."""
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop(), name="sage-batch-loop")
        for worker_index in range(len(self._workers)):
            self._spawn(self._watch(worker_index))

    def stop_accepting(self) -> None:
        """Refuse new requests (UNAVAILABLE); admitted ones go on."""
        self._accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left, at most `timeout_s`; True if drained."""
        end = time.monotonic() + timeout_s
        while self._tickets and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return not self._tickets

    @property
    def closed(self) -> bool:
        """Whether `close` has run (the server is stopping: what is still open is cut by the server, not its client)."""
        return self._closed

    async def close(self) -> None:
        """Stop the batch loop and fail whatever is still admitted with UNAVAILABLE."""
        self._accepting = False
        self._closed = True
        for ticket in list(self._tickets.values()):
            self._fail(ticket, EngineError("UNAVAILABLE", "server shutting down"))
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- admission -------------------------------------------------------------------------------------------
    def admit(self, spec: ImageSpec, time_remaining_s: float | None) -> Ticket:
        """Validate and queue a request; raises EngineError (counted as rejected) when it cannot be taken."""
        try:
            if not self._accepting:
                raise EngineError("UNAVAILABLE", "server is shutting down; retry on another edge server")
            request = resolve(spec, self.config, self.info)
            self._refuse_unschedulable(request)
            if len(self._tickets) >= self.config.max_queue:
                raise EngineError("RESOURCE_EXHAUSTED", f"queue full ({self.config.max_queue} requests); retry later")
            self._refuse_over_cap(request)
        except EngineError as exc:
            raise self.reject(exc) from None
        now = time.monotonic()
        budget = (
            self.config.max_deadline_s
            if time_remaining_s is None
            else min(time_remaining_s, self.config.max_deadline_s)
        )
        ticket = Ticket(
            uuid.uuid4().hex[:16], request, now, now + max(0.0, budget), asyncio.get_running_loop().create_future()
        )
        self._tickets[ticket.request_id] = ticket
        self._per_client[request.client_id] += 1
        self._per_host[request.host] += 1
        self._queue.append(ticket)
        self._queued_event.set()
        self._counts["admitted"] += 1
        return ticket

    def _refuse_unschedulable(self, request: Resolved) -> None:
        """INVALID_ARGUMENT when the model's scheduler cannot run the request's steps (DDIM at 1000 of 1000
        timesteps, which a raised max_steps lets a device ask for), checked once per (scheduler, steps) as the
        worker checks a bucket (sage_core.sampler.scheduler_refusal). Such a request used to wait for a window
        and fail there."""
        key = (request.scheduler, request.steps)
        if key not in self._refusals:
            from sage_core.sampler import scheduler_refusal  # loaded by __init__ (not on the CLI's import path)

            try:
                self._refusals[key] = scheduler_refusal(self._scheduler_config, *key)
            except Exception as exc:  # noqa: BLE001 - a config the front end cannot rebuild: the worker still checks
                log.warning("scheduler %s with %d steps not checked at admission (%s)", *key, first_line(exc))
                self._refusals[key] = ""
        if reason := self._refusals[key]:
            raise EngineError("INVALID_ARGUMENT", reason)

    def _refuse_over_cap(self, request: Resolved) -> None:
        """RESOURCE_EXHAUSTED when the request's client, or its peer host (max_streams_per_host > 0), already has
        its cap of open streams."""
        c = self.config
        if self._per_client[request.client_id] >= c.max_streams_per_client:
            raise EngineError(
                "RESOURCE_EXHAUSTED",
                f"client {request.client_id!r} has {c.max_streams_per_client} open requests (the cap)",
            )
        if c.max_streams_per_host and self._per_host[request.host] >= c.max_streams_per_host:
            raise EngineError(
                "RESOURCE_EXHAUSTED",
                f"host {request.host} has {c.max_streams_per_host} open requests (the per-host cap, "
                "max_streams_per_host); retry when one ends",
            )

    def reject(self, error: EngineError) -> EngineError:
        """Count a request refused before admission (`rejected` and its status); returns `error` to raise."""
        self._counts["rejected"] += 1
        self._status_counts[error.code] += 1
        return error

    async def wait(self, ticket: Ticket) -> Delivery:
        """The request's Delivery, or EngineError (UNAVAILABLE, DEADLINE_EXCEEDED, ...)."""
        remaining = ticket.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.future), timeout=max(0.0, remaining))
        except TimeoutError:
            raise EngineError("DEADLINE_EXCEEDED", "deadline passed before the shared phase finished") from None

    def release(self, ticket: Ticket, status: str, sent_bytes: int = 0) -> None:
        """Forget a request (idempotent); `status` is its final gRPC status name ("OK", "CANCELLED", ...)."""
        if ticket.left:
            return
        ticket.left = True
        self._tickets.pop(ticket.request_id, None)
        uncount(self._per_client, ticket.request.client_id)
        uncount(self._per_host, ticket.request.host)
        if not ticket.future.done():
            ticket.future.cancel()
        self._status_counts[status] += 1
        self._counts["completed" if status == "OK" else "failed"] += 1
        self._counts["bytes_sent"] += sent_bytes
        if ticket.window_id is not None:
            self._leave_window(ticket)
        # a queued ticket stays in the deque until the batch loop drops it (O(1) here)

    def _leave_window(self, ticket: Ticket) -> None:
        """Drop a ticket from its window; cancel the worker's run when nobody is left waiting."""
        window = self._windows.get(ticket.window_id)
        if window is None:
            return
        window.tickets.discard(ticket)
        if not window.tickets and window.running:
            self._counts["windows_cancelled"] += 1
            worker = self._workers[window.worker_index]
            self._spawn(self._cancel_on_worker(worker, window.window_id))
            self._spawn(self._stop_hung(window))

    async def _cancel_on_worker(self, worker: Any, window_id: str) -> None:
        """Best-effort: ask the worker to stop a window nobody waits for."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(worker.cancel.remote(window_id).future()), timeout=10)
        except Exception as exc:  # noqa: BLE001 - the window's own call reports real failures
            log.debug("cancel of %s failed: %s", window_id, exc)

    async def _stop_hung(self, window: Window) -> None:
        """Kill the model actor of a cancelled window still running `hung_window_s` later: the worker checks for a
        cancel at every UNet call, so it is hung (a stuck GPU or a stopped process). Ray restarts the actor, the
        window's call fails as the actor dies, and its slot comes back after the revival. Unchecked, the slot never
        came back: with every worker's window hung, no request was served again."""
        await asyncio.sleep(self.config.hung_window_s)
        self._kill_hung(window, f"was still running {self.config.hung_window_s:g} s after its window's cancel")

    async def _watch_window(self, window: Window) -> None:
        """While `window` runs, ask its worker every few seconds how long its model has gone without a UNet call
        (EdgeWorker.stalled_s). No answer within `hung_window_s` (a stopped process, a deadlock) or, with
        `stall_s`, a stall that long means a hung worker: it is killed and restarted, and the window's requests
        end now (UNAVAILABLE) rather than at their deadlines. Before, only a cancelled window's worker was found
        hung, once all of its requests had left."""
        c = self.config
        period = min(c.hung_window_s, c.stall_s or c.hung_window_s) / 3
        while self._windows.get(window.window_id) is window:
            await asyncio.sleep(period)
            if not window.running or self._reviving(window.worker_index):  # not on a live worker (yet)
                continue
            worker = self._workers[window.worker_index]
            try:
                stalled = await asyncio.wait_for(asyncio.wrap_future(worker.stalled_s.remote().future()),
                                                 timeout=c.hung_window_s)
            except TimeoutError:
                if self._reviving(window.worker_index):  # the call waited for Ray's restart of the actor
                    continue
                reason = f"did not answer for {c.hung_window_s:g} s (hung_window_s)"
            except Exception:  # noqa: BLE001 - the actor died or restarts: the window's call (or its resend) tells
                continue
            else:
                if not c.stall_s or stalled < c.stall_s:
                    continue
                reason = f"started no UNet call for {stalled:.0f} s (stall_s {c.stall_s:g})"
            self._kill_hung(window, reason)
            return

    def _reviving(self, worker_index: int) -> bool:
        """Whether the worker's revival is under way."""
        revival = self._revivals.get(worker_index)
        return revival is not None and not revival.done()

    def _kill_hung(self, window: Window, reason: str) -> None:
        """Kill the model actor running `window` (Ray restarts it; the window's call then fails, and its slot
        comes back after the revival), unless the window ended or its worker was killed already."""
        if self._windows.get(window.window_id) is not window or not window.running or window.hung:
            return
        import ray

        window.hung = reason
        worker_index = window.worker_index
        fields = {"window_id": window.window_id, "worker": worker_index, "pid": self._worker_pids[worker_index],
                  "reason": reason}
        log.warning("worker_hung", extra={"fields": fields})
        try:
            ray.kill(self._workers[worker_index], no_restart=False)
        except Exception as exc:  # noqa: BLE001 - the watch and the revival deal with an actor already gone
            log.warning("worker %d could not be killed (%s)", worker_index, first_line(exc))

    # ---- batching --------------------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        """Forever: collect a window, wait for a free worker, top the window up (one worker) and hand it to the
        worker (dispatch runs concurrently).

        With one worker, the window takes the requests queued while it waited (up to max_batch): they used to wait
        for the window after it, a whole shared phase later, though it had room (in the simulator's backlog
        validation, median latency 2.31 s before, 1.80 s after). With several, they stay queued: their window is
        closed at once (its first request is old) and goes to the next worker that frees, whereas after a top-up
        that worker waited up to max_wait_ms for a fresh window to close, and one worker got the backlog; the
        simulator showed longer tails for that (8 saturated workers: p95 10.4 s to 15.9 s)."""
        while True:
            window = await self._collect_window()
            if not window:
                continue
            self._collected = window
            try:
                worker_index = await self._free_workers.get()
            finally:
                self._collected = []
            if len(self._workers) == 1:
                window = [t for t in window if not t.left]
                window += self._take_queued(self.config.max_batch - len(window))
            self._spawn(self._run_window(self._open_window(window, worker_index), window))

    async def _collect_window(self) -> list[Ticket]:
        """Wait for a first live ticket, then up to max_wait_ms or max_batch live tickets."""
        while not self._live_queued():
            self._queued_event.clear()
            await self._queued_event.wait()
        first = next(t for t in self._queue if not t.left)
        close_at = first.admitted_at + self.config.max_wait_ms / 1000.0
        while self._live_queued() < self.config.max_batch and (delay := close_at - time.monotonic()) > 0:
            self._queued_event.clear()
            try:
                await asyncio.wait_for(self._queued_event.wait(), timeout=delay)
            except TimeoutError:
                break
        return self._take_queued(self.config.max_batch)

    def _take_queued(self, limit: int) -> list[Ticket]:
        """Up to `limit` live tickets from the front of the queue (the departed ones among them are dropped)."""
        taken: list[Ticket] = []
        while self._queue and len(taken) < limit:
            ticket = self._queue.popleft()
            if not ticket.left:
                taken.append(ticket)
        return taken

    def _live_queued(self) -> int:
        """Queued tickets that are still wanted (drops departed ones from the front)."""
        while self._queue and self._queue[0].left:
            self._queue.popleft()
        return sum(1 for t in self._queue if not t.left)

    def _open_window(self, tickets: list[Ticket], worker_index: int) -> Window:
        """Register a window as the batch loop hands it to a worker, before its task starts: its members are in it
        from now on (GetStats counts it open; it used to count them nowhere for a loop turn), not yet running, so
        a member that leaves before the task starts is only dropped from it."""
        window = Window(f"w{next(self._window_ids)}-{uuid.uuid4().hex[:6]}", {t for t in tickets if not t.left},
                        False, worker_index)
        self._windows[window.window_id] = window
        now = time.monotonic()
        for t in window.tickets:
            t.window_id, t.dispatched_at = window.window_id, now
        return window

    async def _run_window(self, window: Window, tickets: list[Ticket]) -> None:
        """Run an opened window on its worker and deliver each group's result to its members, `tickets` in their
        queue's order (none left: the worker's slot goes back, uncalled)."""
        worker_index = window.worker_index
        tickets = [t for t in tickets if t in window.tickets]  # not those that left since
        if not tickets:
            self._windows.pop(window.window_id, None)
            self._free_workers.put_nowait(worker_index)
            self._counts["windows_skipped"] += 1
            return
        window.running = True
        self._in_flight[worker_index] += 1
        buckets: dict[BucketSettings, list[Ticket]] = {}
        for t in tickets:
            buckets.setdefault(t.request.bucket_key(), []).append(t)
        jobs = [
            BucketJob(
                key,
                tuple(
                    MemberSpec(
                        t.request.prompt, t.request.seed, t.request.share, t.request.codec, t.request.seed_explicit,
                        t.request.negative_prompt,
                    )
                    for t in ts
                ),
            )
            for key, ts in buckets.items()
        ]
        log.info(
            "window_start",
            extra={"fields": {"window_id": window.window_id, "requests": len(tickets), "buckets": len(jobs)}},
        )
        worker_lost = False
        watch = asyncio.get_running_loop().create_task(self._watch_window(window))
        try:
            result = await self._call_worker(worker_index, window, jobs)
            if result is None:
                return
            self._counts["windows_run"] += 1
            if self.metrics is not None:
                self.metrics.observe_window(len(tickets), result.shared_phase_ms / 1000.0)
            for b, ((key, ts), groups) in enumerate(zip(buckets.items(), result.buckets, strict=True)):
                if isinstance(groups, BucketRefused):
                    for t in ts:
                        self._fail(t, EngineError("INVALID_ARGUMENT", groups.reason))
                    continue
                self._deliver(f"{window.window_id}-b{b}", key, ts, groups, result.shared_phase_ms)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the members, never hang them
            error = self._classify(exc)
            worker_lost = error.code == "UNAVAILABLE"
            if worker_lost and window.hung:
                error = EngineError("UNAVAILABLE", f"the edge worker running this request's group {window.hung}, "
                                                   "so it was restarted; retry")
            for t in list(window.tickets):
                self._fail(t, error)
            log.warning("window_failed", extra={"fields": {"window_id": window.window_id, "error": str(error)}})
        finally:
            watch.cancel()
            window.running = False
            self._windows.pop(window.window_id, None)
            for t in tickets:
                t.window_id = None
            self._window_ended(window, worker_lost)

    def _on_shared_done(self, window: Window, done: asyncio.Future) -> None:
        """The answer to a window's `shared_done`: its shared phase ended (a failed call changes nothing: the
        window's own call fails too)."""
        if not done.cancelled() and done.exception() is None:
            self._shared_phase_ended(window)

    def _shared_phase_ended(self, window: Window) -> None:
        """The worker says the window no longer holds its model: its next window may go (and run its shared phase
        while this one's latents are encoded), unless `worker_pipeline` windows are in flight there, then once one
        of them ends. Until now the next window waits here, where it is still only collected, not sealed on the
        worker: a window sent while another held the model waited there, and requests that came meanwhile went
        into yet another window behind it."""
        if window.slot_returned:
            return
        window.slot_returned = True
        worker_index = window.worker_index
        if self._in_flight[worker_index] < self.config.worker_pipeline:
            self._free_workers.put_nowait(worker_index)
        else:
            self._owed[worker_index] += 1

    def _window_ended(self, window: Window, worker_lost: bool) -> None:
        """Account for an ended window: give its worker's slot back if its shared phase did not (after the
        worker's revival when it died), or one held back by `worker_pipeline`."""
        worker_index = window.worker_index
        self._in_flight[worker_index] -= 1
        if window.slot_returned:
            if not self._owed[worker_index]:
                return
            self._owed[worker_index] -= 1
        window.slot_returned = True
        if worker_lost:
            self._spawn(self._return_after_revival(worker_index))
        else:
            self._free_workers.put_nowait(worker_index)

    def _deliver(
        self,
        bucket_id: str,
        key: BucketSettings,
        tickets: list[Ticket],
        groups: Sequence[GroupResult],
        shared_ms: float,
    ) -> None:
        """Hand every group's payload to its members that still wait."""
        for g, group in enumerate(groups):
            group_id = f"{bucket_id}-g{g}"
            self._counts["groups_run"] += 1
            if self.metrics is not None:
                self.metrics.observe_group(
                    len(group.members), key.steps, group.branch_step, group.server_steps, key.guidance > 1.0
                )
            if len(group.members) > 1:
                self._counts["grouped_requests"] += len(group.members)
            for m in group.members:
                t = tickets[m]
                if t.left or t.future.done():
                    continue
                t.future.set_result(
                    Delivery(
                        request_id=t.request_id,
                        group_id=group_id,
                        group_size=len(group.members),
                        branch_step=group.branch_step,
                        total_steps=key.steps,
                        scheduler=key.scheduler,
                        guidance=key.guidance,
                        seed=group.seed,
                        latent_shape=group.latent_shape,
                        min_similarity=group.min_similarity,
                        payload=group.payloads[t.request.codec],
                        queue_wait_ms=((t.dispatched_at or t.admitted_at) - t.admitted_at) * 1000.0,
                        shared_phase_ms=shared_ms,
                        cached_steps=group.cached_steps,
                        negative_prompt=t.request.negative_prompt,
                    )
                )

    def _classify(self, exc: BaseException) -> EngineError:
        """Map a worker failure to a status; on actor death, make sure the worker comes back."""
        import ray.exceptions

        if isinstance(exc, actor_death_errors()):
            self._counts["worker_failures"] += 1
            return EngineError("UNAVAILABLE", "the edge worker running this request's group died; retry")
        if isinstance(exc, ray.exceptions.RayTaskError) and "WindowCancelled" in str(exc):
            return EngineError("CANCELLED", "the window was cancelled")
        log.exception("worker error", exc_info=exc)  # the whole traceback stays in the server's log
        return EngineError("INTERNAL", f"shared phase failed: {clip(error_reason(exc), 300)}")

    async def _return_after_revival(self, worker_index: int) -> None:
        """Give a failed window's slot back once its worker answers again."""
        await asyncio.shield(self._revival(worker_index))
        self._free_workers.put_nowait(worker_index)

    def _revival(self, worker_index: int) -> asyncio.Task:
        """The revival of a dead worker, started now unless one is under way: the windows that failed together on
        it and its death watch share one (so a worker dead for good is replaced once)."""
        revival = self._revivals.get(worker_index)
        if revival is None or revival.done():
            revival = asyncio.get_running_loop().create_task(self._revive(worker_index))
            self._revivals[worker_index] = revival
            self._tasks.add(revival)
            revival.add_done_callback(self._tasks.discard)
            revival.add_done_callback(lambda _: self._check_availability())
            self._check_availability()
        return revival

    @property
    def available(self) -> bool:
        """Whether a worker is up (not being revived): a window could run now."""
        return self._available

    def _check_availability(self) -> None:
        """Tell `on_availability` when every worker is being revived (no window can run until one is back: the
        server's health goes NOT_SERVING) and when one is back."""
        available = not all(self._reviving(i) for i in range(len(self._workers)))
        if available != self._available:
            self._available = available
            log.log(logging.INFO if available else logging.WARNING,
                    "worker_available" if available else "no_worker_available",
                    extra={"fields": {"workers": len(self._workers)}})
            if self.on_availability is not None:
                self.on_availability(available)

    async def _call_worker(self, worker_index: int, window: Window, jobs: list[BucketJob]) -> WindowResult | None:
        """The worker's result for the window; None when every member left before it reached a live worker. The
        window goes with a call to `EdgeWorker.alive` just before it: when that call fails because the actor
        died, the window reached no live actor (a death the engine had not seen yet, while no window ran), so
        it waits for the revival and goes again instead of failing its members (at most `MAX_RESENDS` times). A
        death after `alive` answered fails the window's members at once (UNAVAILABLE): the window may be its
        cause, and would kill the next actor too."""
        actor_died = actor_death_errors()
        for resends in itertools.count():
            if not await self._worker_ready(worker_index, window):
                return None
            worker = self._workers[worker_index]  # after a revival: perhaps a new actor
            alive = asyncio.wrap_future(worker.alive.remote().future())
            run = asyncio.wrap_future(worker.run_window.remote(window.window_id, jobs).future())
            shared = asyncio.wrap_future(worker.shared_done.remote(window.window_id).future())
            shared.add_done_callback(functools.partial(self._on_shared_done, window))
            try:
                await alive
            except actor_died:
                try:
                    return await run  # it went through all the same (the actor was only unreachable for a moment)
                except actor_died as exc:
                    if resends >= MAX_RESENDS:
                        raise
                    self._counts["worker_failures"] += 1
                    fields = {"window_id": window.window_id, "worker": worker_index, "error": first_line(exc)}
                    log.warning("window_resent", extra={"fields": fields})
                    self._revival(worker_index)
            except BaseException:
                run.cancel()
                raise
            else:
                return await run
        raise AssertionError("unreachable")

    async def _worker_ready(self, worker_index: int, window: Window) -> bool:
        """Wait for the worker's revival if one is under way (its death was seen while this window waited for a
        slot); False, the window skipped, when every member left meanwhile."""
        if self._reviving(worker_index):
            window.running = False  # not on the worker yet: a member that leaves has nothing to cancel there
            await asyncio.shield(self._revivals[worker_index])
            window.running = True
            if not window.tickets:
                self._counts["windows_skipped"] += 1
                return False
        return True

    async def _watch(self, worker_index: int) -> None:
        """Keep one call open on the worker that returns only when its actor dies (EdgeWorker.watch), so that a
        death while no window runs is seen at once: the revival starts then and the windows that come meanwhile
        wait for the restarted actor. Unwatched, the next window or two went to the dead actor (Ray restarts it
        in the background) and their requests ended UNAVAILABLE, and GetStats kept the dead actor's pid."""
        while True:
            worker = self._workers[worker_index]
            try:
                await asyncio.wrap_future(worker.watch.remote().future())
            except actor_death_errors() as exc:
                self._counts["worker_failures"] += 1
                fields = {"worker": worker_index, "pid": self._worker_pids[worker_index], "error": first_line(exc)}
                log.warning("worker_died", extra={"fields": fields})
                await asyncio.shield(self._revival(worker_index))
            except Exception as exc:  # noqa: BLE001 - a worker that cannot be watched: windows still see its death
                log.warning("worker %d cannot be watched (%s)", worker_index, first_line(exc))
                return

    async def _revive(self, worker_index: int, timeout_s: float = 300.0) -> None:
        """After an actor died: wait for Ray's restart (or make a new actor once restarts are used up). Windows
        wait in the queue meanwhile instead of failing."""
        import ray.exceptions

        end = time.monotonic() + timeout_s
        delay = 0.2
        while True:
            worker = self._workers[worker_index]
            try:
                info = await asyncio.wait_for(asyncio.wrap_future(worker.info.remote().future()), timeout=60)
                self._worker_pids[worker_index] = info.pid
                log.info("worker_ready", extra={"fields": {"worker": worker_index, "pid": info.pid, "restarted": True}})
                break
            except ray.exceptions.ActorUnavailableError:
                pass  # restarting: ask again shortly
            except Exception as exc:  # noqa: BLE001 - dead for good (restarts used up) or stuck: replace it
                log.warning("worker %d is gone (%s); creating a new actor", worker_index, exc)
                self._workers[worker_index] = self._worker_factory()
            if time.monotonic() > end:
                log.error("worker %d did not come back within %.0f s", worker_index, timeout_s)
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _fail(self, ticket: Ticket, error: EngineError) -> None:
        """Complete a waiting ticket with an error (its stream then ends with that status)."""
        if not ticket.future.done():
            ticket.future.set_exception(error)

    def _spawn(self, coro: Any) -> None:
        """Run a background task, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- introspection ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Live counters and the size of every per-request structure (all zero when idle)."""
        return {
            "active_requests": len(self._tickets),
            "queued_requests": sum(1 for t in self._queue if not t.left),
            "waiting_requests": sum(1 for t in self._collected if not t.left),
            "running_windows": sum(1 for w in self._windows.values() if w.running),
            "open_windows": len(self._windows),
            "tracked_clients": len(self._per_client),
            "worker_pids": list(self._worker_pids),
            "serving": self._accepting,
            "status_counts": dict(self._status_counts),
            **{k: self._counts[k] for k in _COUNTERS},
        }


def actor_death_errors() -> tuple[type[BaseException], ...]:
    """What a call on a Ray actor raises when the actor died or is restarting (ray is imported only when asked)."""
    import ray.exceptions

    return ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError


def worker_error_line(exc: BaseException) -> str | None:
    """The worker's own exception as 'SomethingError: message': the last such line of a Ray task or actor error,
    whose text also holds the worker's address, pid, source paths and terminal colours; None if it has none."""
    for line in reversed([line.strip() for line in str(exc).splitlines() if line.strip()]):
        name, sep, _ = line.partition(": ")
        if sep and name.split(".")[-1].endswith("Error") and " " not in name:
            return line
    return None


def error_reason(exc: BaseException) -> str:
    """What a device is told of a failed window: `worker_error_line`, else the exception's type and first line."""
    return worker_error_line(exc) or f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type name."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def uncount(counter: Counter[str], key: str) -> None:
    """One open stream fewer for `key`, forgotten at zero (so idle counters hold nothing)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


_COUNTERS = (
    "admitted",
    "completed",
    "failed",
    "rejected",
    "windows_run",
    "windows_skipped",
    "windows_cancelled",
    "worker_failures",
    "bytes_sent",
    "groups_run",
    "grouped_requests",
)

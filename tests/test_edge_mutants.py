"""Edge-server behaviour a mutation audit found unchecked by the fast tests: the Ray worker (cancels, progress,
shared-phase ends, codecs, actor options), the engine's windows (batching, top-up, delivery, refused buckets, worker
deaths and revivals, hung workers, slots), the gRPC servicer (request translation, streaming, final statuses,
health), the Prometheus metrics and the container health probe.

All fast: pure functions, an in-process EdgeWorker on the tiny model, an Engine over test_edge_server's PendingWorker
(no Ray actor, no GPU) and in-process gRPC servers on 127.0.0.1."""

# ruff: noqa: F811  (the fixtures imported from test_worker_pipeline are test arguments here)
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray.exceptions
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_edge_server import PendingWorker
from test_worker_pipeline import worker  # noqa: F401

from edge_server import healthcheck
from edge_server.config import ServerConfig
from edge_server.engine import Engine, EngineError, ImageSpec, Ticket
from edge_server.metrics import EdgeMetrics
from edge_server.service import (
    SERVICE_NAME,
    EdgeSamplerServicer,
    MalformedRequest,
    accepted_message,
    follow_availability,
    grpc_options,
    one_line,
    refuse_malformed,
    to_spec,
)
from edge_server.worker import (
    BucketJob,
    BucketRefused,
    BucketSettings,
    EdgeWorker,
    GroupResult,
    MemberSpec,
    ModelInfo,
    Payload,
    WindowCancelled,
    WindowResult,
    _PacedUNet,
)
from protos.sage_edge.v1 import edge_pb2

INFO = ModelInfo("abc", "{}", 32, 32, 1, "cpu")
pytestmark = pytest.mark.timeout(60)


# ---- helpers ------------------------------------------------------------------------------------------------------
def answered(value: Any) -> Future:
    """A finished call: its result, or its exception when `value` is one."""
    done: Future = Future()
    if isinstance(value, BaseException):
        done.set_exception(value)
    else:
        done.set_result(value)
    return done


class RevivableWorker(PendingWorker):
    """PendingWorker that also answers `info` (each call pending until the test answers it, or at once from
    `info_answers`) and `watch` (from `watch_answers`, then never)."""

    def __init__(self, info_answers: list[Any] | None = None, watch_answers: list[Any] | None = None) -> None:
        super().__init__()
        self.infos: list[Future] = []
        self.info_answers = list(info_answers or [])
        self.watch_answers = list(watch_answers or [])
        self.info = self._method("info", self._info)
        self.watch = self._method("watch", lambda: answered(self.watch_answers.pop(0)) if self.watch_answers
                                  else Future())

    def _info(self) -> Future:
        call = answered(self.info_answers.pop(0)) if self.info_answers else Future()
        self.infos.append(call)
        return call


def engine_on(workers: list[Any], metrics: EdgeMetrics | None = None, factory: Any = None, **settings) -> Engine:
    """An Engine over stand-in workers (no batch loop until a test starts one)."""
    return Engine(ServerConfig(**settings), workers, [INFO] * len(workers), worker_factory=factory, metrics=metrics)


def sending(worker: PendingWorker) -> list[list[str]]:
    """The prompts of each window `worker` is sent from now on (its run_window stays pending)."""
    sent: list[list[str]] = []

    def run(window_id: str, jobs: list[BucketJob]) -> Future:
        sent.append([m.prompt for j in jobs for m in j.members])
        return worker.runs.setdefault(window_id, Future())

    worker.run_window = worker._method("run_window", run)
    return sent


async def settle(seconds: float = 0.02) -> None:
    """Let the loop run the callbacks of answered stand-in calls."""
    await asyncio.sleep(seconds)


async def dispatch(engine: Engine, tickets: list[Ticket]) -> tuple[asyncio.Task, str]:
    """Open a window of `tickets` on a free worker, start its task; (task, window id)."""
    window = engine._open_window(tickets, engine._free_workers.get_nowait())
    task = asyncio.create_task(engine._run_window(window, tickets))
    await settle()
    return task, window.window_id


def returns_within(seconds: float, call: Any, *args: Any) -> bool:
    """Whether `call(*args)`, run in a daemon thread, returns within `seconds` (a thread left waiting is dropped)."""
    thread = threading.Thread(target=call, args=args, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def group(members: tuple[int, ...], seed: int = 7, codecs: tuple[str, ...] = ("fp32",), branch: int = 2,
          server_steps: int = 2) -> GroupResult:
    """A group result whose payload in each codec is the codec's name."""
    payloads = {c: Payload(c, c.encode(), (len(c),), ("latent",)) for c in codecs}
    return GroupResult(members, seed, branch, 0.9, (1, 4, 4, 4), payloads, server_steps=server_steps)


def sample(metrics: EdgeMetrics, name: str, **labels: str) -> float:
    """A metric sample's value (0 when absent)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def failure_of(engine: Engine, ticket: Ticket) -> EngineError:
    """The EngineError a ticket's wait ends with (within 5 s)."""
    with pytest.raises(EngineError) as err:
        await asyncio.wait_for(engine.wait(ticket), 5)
    return err.value


# ---- worker ---------------------------------------------------------------------------------------------------------
def test_the_paced_unet_stops_a_cancelled_window_and_beats_per_call():
    """Each UNet call reports progress; a cancel before a call, or during the test hook's per-call pause, stops the
    window there (WindowCancelled) without calling the UNet."""
    calls, beats, stop = [], [], threading.Event()
    unet = _PacedUNet(lambda *a: calls.append(a) or "out", stop, 0.0, lambda: beats.append(1))
    assert unet(1) == "out" and (len(calls), len(beats)) == (1, 1)
    stop.set()
    with pytest.raises(WindowCancelled):
        unet(2)
    paced_stop = threading.Event()
    paced = _PacedUNet(lambda *a: calls.append(a), paced_stop, 5.0, lambda: None)
    threading.Timer(0.05, paced_stop.set).start()
    started = time.monotonic()
    with pytest.raises(WindowCancelled):
        paced(3)
    assert time.monotonic() - started < 2.0 and len(calls) == 1


def _hold(worker: EdgeWorker, monkeypatch, body) -> None:
    """Make the worker's shared phase run `body(job, stop)` instead of the model."""
    monkeypatch.setattr(worker, "_shared_bucket", body)
    monkeypatch.setattr(worker, "_encode_bucket", lambda ready: ())


def _job(worker: EdgeWorker, *members: MemberSpec, steps: int = 3, guidance: float = 7.5) -> list[BucketJob]:
    info = worker.info()
    return [BucketJob(BucketSettings(steps, guidance, "ddim", info.default_height, info.default_width), members)]


def test_stalled_s_counts_from_the_window_taking_the_model_and_is_zero_after(worker, monkeypatch):
    """stalled_s is 0 with no window; a window that holds the model without a UNet call (its text encoding) stalls
    from the moment it took the model; once it ends, 0 again."""
    seen: list[float] = []

    def body(job, stop):
        time.sleep(0.05)
        seen.append(worker.stalled_s())
        return ()

    _hold(worker, monkeypatch, body)
    assert worker.stalled_s() == 0.0
    worker.run_window("w-stall", _job(worker, MemberSpec("a", 1, 0.5, "fp16")))
    assert seen[0] >= 0.04 and worker.stalled_s() == 0.0


def test_a_cancel_reaches_a_running_window_and_is_forgotten_when_it_ends(worker, monkeypatch):
    """cancel of a running window answers True and stops it; after the window, a cancel of its id answers False
    (nothing is kept per ended window)."""
    started = threading.Event()

    def body(job, stop):
        started.set()
        assert stop.wait(5), "the cancel did not reach the window"
        raise WindowCancelled("stopped")

    _hold(worker, monkeypatch, body)
    with futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(worker.run_window, "w-running", _job(worker, MemberSpec("a", 1, 0.5, "fp16")))
        assert started.wait(10)
        assert worker.cancel("w-running") is True
        with pytest.raises(WindowCancelled):
            run.result(10)
    assert "w-running" not in worker._stops
    worker._early_cancels.pop("w-running", None)
    assert worker.cancel("w-running") is False
    worker._early_cancels.pop("w-running", None)


def test_shared_done_answers_for_a_failed_window_and_keeps_nothing(worker, monkeypatch):
    """A window that fails in its shared phase still ends it: shared_done answers at once (not after
    max_deadline_s + hung_window_s), and its entry is gone."""

    def body(job, stop):
        raise RuntimeError("the shared phase failed")

    _hold(worker, monkeypatch, body)
    with pytest.raises(RuntimeError):
        worker.run_window("w-failed", _job(worker, MemberSpec("a", 1, 0.5, "fp16")))
    assert returns_within(5, worker.shared_done, "w-failed")
    assert "w-failed" not in worker._shared_ends


def test_shared_done_answers_while_the_window_is_still_encoded(worker, monkeypatch):
    """A window's shared phase ends when it leaves the model, before its latents are encoded: shared_done answers
    then, so that the next window's shared phase can run meanwhile."""
    encoding, encoded = threading.Event(), threading.Event()

    def encode(ready):
        encoding.set()
        encoded.wait(10)
        return ()

    monkeypatch.setattr(worker, "_shared_bucket", lambda job, stop: ())
    monkeypatch.setattr(worker, "_encode_bucket", encode)
    run = threading.Thread(target=worker.run_window, args=("w-encoding", _job(worker, MemberSpec("a", 1, 0.5, "fp16"))),
                           daemon=True)
    run.start()
    try:
        assert encoding.wait(10)
        assert returns_within(5, worker.shared_done, "w-encoding")
    finally:
        encoded.set()
        run.join(10)


def test_shared_done_sent_before_its_window_is_answered_by_that_window(worker, monkeypatch):
    """shared_done may reach the worker before its run_window: the window then ends the wait shared_done began."""
    _hold(worker, monkeypatch, lambda job, stop: ())
    waiting = threading.Thread(target=worker.shared_done, args=("w-late",), daemon=True)
    waiting.start()
    for _ in range(200):
        if "w-late" in worker._shared_ends:
            break
        time.sleep(0.005)
    worker.run_window("w-late", _job(worker, MemberSpec("a", 1, 0.5, "fp16")))
    waiting.join(5)
    assert not waiting.is_alive()


def test_shared_done_for_a_window_that_never_comes_gives_up(worker, monkeypatch):
    """shared_done waits at most max_deadline_s + hung_window_s for a window that never comes (it holds one of
    the actor's threads)."""
    monkeypatch.setattr(worker, "config", dataclasses.replace(worker.config, max_deadline_s=0.1, hung_window_s=0.1))
    assert returns_within(5, worker.shared_done, "w-never")


def test_the_solver_counters_go_lossless_whatever_the_codec(worker):
    """A payload is the latent then each solver-state tensor by name: floats in the request's codec, integer
    counters as lossless fp32 (a lossy codec must not round a step counter)."""
    from sage_core.codec import CodecSpec, LatentCodec

    latent, output, count = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor(3)
    payload = worker._encode(latent, {"model_output": output, "lower_order_nums": count}, "int8")
    level = worker.config.zstd_level
    int8, fp32 = LatentCodec(CodecSpec("int8", level=level)), LatentCodec(CodecSpec("fp32", level=level))
    frames = [int8.encode(latent), fp32.encode(count.to(torch.float32).reshape(1)), int8.encode(output)]
    assert payload.data == b"".join(frames) and payload.frame_names == ("latent", "lower_order_nums", "model_output")


def test_a_group_carries_a_payload_in_every_codec_its_members_took(worker):
    """Two requests grouped together with different codecs each find their codec's payload."""
    members = (MemberSpec("a red circle", 1, 0.5, "fp16"), MemberSpec("a red circle", 2, 0.5, "fp32"))
    (groups,) = worker.run_window("w-codecs", _job(worker, *members)).buckets
    assert [g.members for g in groups] == [(0, 1)] and set(groups[0].payloads) == {"fp16", "fp32"}


def test_a_members_share_is_rounded_to_the_nearest_step(worker):
    """share 0.7 of 4 steps is 2.8 steps: the branch is at step 3 (rounded, not cut to 2)."""
    (groups,) = worker.run_window("w-round", _job(worker, MemberSpec("a red circle", 1, 0.7, "fp16"), steps=4)).buckets
    assert [g.branch_step for g in groups] == [3]


def test_negative_prompts_do_not_split_a_group_without_guidance(worker):
    """Without guidance (1.0) a negative prompt does nothing, so requests that differ only in it still group."""
    members = (MemberSpec("a red circle", 1, 0.5, "fp16", True, "blurry"), MemberSpec("a red circle", 1, 0.5, "fp16"))
    (groups,) = worker.run_window("w-neg", _job(worker, *members, guidance=1.0)).buckets
    assert [g.members for g in groups] == [(0, 1)]


def test_the_default_size_is_the_models_pixel_size(worker):
    """ModelInfo's default height and width are in pixels (latent side x the VAE's scale), so a request of the
    default size gets a latent of the UNet's sample size."""
    info, pipe = worker.info(), worker.pipe
    assert info.default_height == info.default_width == pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert info.default_height % 8 == 0 and info.pid > 0


def test_a_model_it_cannot_load_is_kept_for_failure_at_the_first_start_only(tmp_path, monkeypatch):
    """At the server's first start a model that cannot be used is kept as failure() (info() raises it); a restarted
    or replacement actor dies with it instead, as the engine's watch and revival expect."""
    from edge_server import worker as worker_module
    from sage_core.models import ModelError

    config = ServerConfig(model=str(tmp_path / "missing"), ray_num_cpus=1)
    threads = torch.get_num_threads()
    try:
        first = EdgeWorker(config, first_start=True)
        assert "missing" in first.failure()
        with pytest.raises(ModelError):
            first.info()
        with pytest.raises(ModelError):
            EdgeWorker(config)
        monkeypatch.setattr(worker_module, "restarted_actor", lambda: True)
        with pytest.raises(ModelError):
            EdgeWorker(config, first_start=True)
    finally:
        torch.set_num_threads(threads)


def test_worker_actor_options_follow_the_cluster(monkeypatch):
    """A worker actor takes one GPU on a cluster with (at least) one, else one CPU; it may restart but never retries
    a task (a window would run twice); its threads cover worker_pipeline windows, their shared_done calls, the watch
    and two short calls. worker_slots counts GPUs, else CPUs."""
    import ray

    from edge_server.worker import make_worker_actor, worker_slots

    made: list[dict] = []

    class Remote:
        def options(self, **options):
            made.append(options)
            return self

        def remote(self, *args):
            return args

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    config = ServerConfig(worker_pipeline=2, worker_max_restarts=3)
    for resources, gpus, cpus in (({"GPU": 1.0, "CPU": 8.0}, 1, 0), ({"CPU": 8.0}, 0, 1)):
        monkeypatch.setattr(ray, "cluster_resources", lambda r=resources: r)
        assert make_worker_actor(config, True) == (config, True)
        options = made.pop()
        assert (options["num_gpus"], options["num_cpus"], options["max_task_retries"]) == (gpus, cpus, 0)
        assert (options["max_restarts"], options["max_concurrency"]) == (3, 7)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "CPU": 16.0})
    assert worker_slots() == 2
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    assert worker_slots() == 3


def test_the_worker_settings_follow_the_config(monkeypatch):
    """auto dtype is float16 on CUDA, float32 without; the sharing policy takes the config's group size and
    adaptive levels; the latent cache is off at 0 MB and holds cache_mb MiB otherwise."""
    from edge_server.worker import latent_cache, resolve_dtype, sharing_policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    config = ServerConfig(max_group_size=3, max_batch=16, adaptive_taus=(0.5, 0.7, 0.95), cache_mb=1.5)
    policy = sharing_policy(config)
    assert (policy.max_group_size, policy.taus) == (3, (0.5, 0.7, 0.95))
    assert latent_cache(config, policy).max_bytes == int(1.5 * 2**20)
    assert latent_cache(ServerConfig(), policy) is None


# ---- engine: batching -----------------------------------------------------------------------------------------------
async def test_a_full_window_goes_at_once_with_exactly_max_batch():
    """max_batch queued requests close a window at once (not after max_wait_ms) and it takes exactly max_batch."""
    worker = PendingWorker()
    sent = sending(worker)
    engine = engine_on([worker], max_batch=2, max_wait_ms=5000.0)
    loop = asyncio.create_task(engine._batch_loop())
    try:
        for prompt in ("a", "b"):
            engine.admit(ImageSpec(prompt=prompt), None)
        await settle(0.2)
        assert sent == [["a", "b"]]
        for prompt in ("c", "d", "e"):
            engine.admit(ImageSpec(prompt=prompt), None)
        await settle(0.1)
        engine._free_workers.put_nowait(0)  # as if the first window left the model
        await settle(0.1)
        assert sent == [["a", "b"], ["c", "d"]]
    finally:
        loop.cancel()
        await engine.close()


async def test_a_departed_request_takes_no_place_in_a_window():
    """A request that left while queued neither closes a window early nor takes a place in it; one that left while
    its window waited for a worker is not sent (two workers: no top-up)."""
    workers = [PendingWorker(), PendingWorker()]
    sent = sending(workers[0])
    workers[1].run_window = workers[0].run_window
    engine = engine_on(workers, max_batch=2, max_wait_ms=5000.0)
    loop = asyncio.create_task(engine._batch_loop())
    try:
        a = engine.admit(ImageSpec(prompt="a"), None)
        engine.release(engine.admit(ImageSpec(prompt="b"), None), "CANCELLED")
        await settle(0.1)
        assert sent == []
        engine.admit(ImageSpec(prompt="c"), None)
        await settle(0.1)
        assert sent == [["a", "c"]]
        engine.admit(ImageSpec(prompt="d"), None)
        late = engine.admit(ImageSpec(prompt="e"), None)  # closes the next window, which waits for a worker
        while engine._free_workers.qsize():
            engine._free_workers.get_nowait()
        await settle(0.1)
        engine.release(late, "CANCELLED")
        engine._free_workers.put_nowait(1)
        await settle(0.1)
        assert sent == [["a", "c"], ["d"]]
        engine.release(a, "CANCELLED")
    finally:
        loop.cancel()
        await engine.close()


async def test_a_topped_up_window_fills_the_place_of_a_member_that_left():
    """One worker: a member that left while its window waited for the worker frees its place for a request queued
    meanwhile."""
    worker = PendingWorker()
    sent = sending(worker)
    engine = engine_on([worker], max_batch=2, max_wait_ms=10.0)
    slot = engine._free_workers.get_nowait()
    loop = asyncio.create_task(engine._batch_loop())
    try:
        engine.admit(ImageSpec(prompt="a"), None)
        b = engine.admit(ImageSpec(prompt="b"), None)
        await settle(0.1)
        engine.release(b, "CANCELLED")
        engine.admit(ImageSpec(prompt="c"), None)
        engine._free_workers.put_nowait(slot)
        await settle(0.1)
        assert sent == [["a", "c"]]
    finally:
        loop.cancel()
        await engine.close()


async def test_a_window_closes_max_wait_ms_after_its_first_request_came():
    """The wait is counted from the first request's admission: a request that already waited max_wait_ms (the
    batch loop was busy) goes at once."""
    worker = PendingWorker()
    sent = sending(worker)
    engine = engine_on([worker], max_wait_ms=300.0)
    engine.admit(ImageSpec(prompt="a"), None)
    await asyncio.sleep(0.35)
    loop = asyncio.create_task(engine._batch_loop())
    try:
        await settle(0.1)
        assert sent == [["a"]]
    finally:
        loop.cancel()
        await engine.close()


# ---- engine: delivery -----------------------------------------------------------------------------------------------
async def test_a_delivery_carries_its_groups_seed_each_members_codec_and_its_queue_wait():
    """The worker gets each member's codec, negative prompt and whether it named its seed; each member gets its
    group's seed, its own codec's payload and its queue wait (admission to dispatch, not to delivery); groups of
    several count as grouped requests, and the metrics see the window and its groups."""
    worker, metrics = PendingWorker(), EdgeMetrics()
    sent_jobs: list[BucketJob] = []
    worker.run_window = worker._method("run_window", lambda wid, jobs: sent_jobs.extend(jobs)
                                       or worker.runs.setdefault(wid, Future()))
    engine = engine_on([worker], metrics=metrics)
    a = engine.admit(ImageSpec(prompt="a cat", seed=5, accepted_codecs=("fp16",), negative_prompt="blurry"), None)
    b = engine.admit(ImageSpec(prompt="a cat", accepted_codecs=("fp32",)), None)
    c = engine.admit(ImageSpec(prompt="a dog", seed=6), None)
    await asyncio.sleep(0.1)
    task, window_id = await dispatch(engine, [a, b, c])
    (job,) = sent_jobs
    assert [(m.seed_explicit, m.negative_prompt, m.codec) for m in job.members] == [
        (True, "blurry", "fp16"), (False, "", "fp32"), (True, "", "fp32")]
    await asyncio.sleep(1.0)  # delivery comes well after dispatch: the queue wait must not count it
    result = WindowResult(((group((0, 1), seed=99, codecs=("fp16", "fp32")), group((2,), seed=6)),), 50.0)
    worker.runs[window_id].set_result(result)
    da, db, dc = [await engine.wait(t) for t in (a, b, c)]
    await task
    assert (da.payload.codec, db.payload.codec, dc.payload.codec) == ("fp16", "fp32", "fp32")
    assert (da.seed, db.seed, dc.seed, da.group_size, dc.group_size) == (99, 99, 6, 2, 1)
    assert 100 <= da.queue_wait_ms < 1000, da.queue_wait_ms
    stats = engine.stats()
    assert (stats["groups_run"], stats["grouped_requests"], stats["windows_run"]) == (2, 2, 1)
    assert sample(metrics, "sage_edge_shared_phase_seconds_sum") == pytest.approx(0.05)
    assert sample(metrics, "sage_edge_window_requests_sum") == 3


async def test_a_group_without_guidance_counts_one_unet_evaluation_per_step():
    """Guidance 1.0 runs no classifier-free guidance: a group's UNet evaluations are counted once per step."""
    worker, metrics = PendingWorker(), EdgeMetrics()
    engine = engine_on([worker], metrics=metrics)
    ticket = engine.admit(ImageSpec(prompt="a cat", guidance=1.0, steps=4), None)
    task, window_id = await dispatch(engine, [ticket])
    worker.runs[window_id].set_result(WindowResult(((group((0,)),),), 10.0))
    await engine.wait(ticket)
    await task
    assert sample(metrics, "sage_edge_unet_evaluations_independent_total") == 4


async def test_a_refused_bucket_fails_only_its_members():
    """A bucket the model cannot run fails its members with INVALID_ARGUMENT and the reason; the window's next
    bucket is delivered."""
    worker = PendingWorker()
    engine = engine_on([worker])
    refused, served = engine.admit(ImageSpec(prompt="a", steps=4), None), engine.admit(ImageSpec(prompt="b"), None)
    task, window_id = await dispatch(engine, [refused, served])
    worker.runs[window_id].set_result(WindowResult((BucketRefused("not with these steps"), (group((0,)),)), 1.0))
    error = await failure_of(engine, refused)
    assert (error.code, error.message) == ("INVALID_ARGUMENT", "not with these steps")
    assert (await asyncio.wait_for(engine.wait(served), 5)).payload.codec == "fp32"
    await task


# ---- engine: worker deaths -------------------------------------------------------------------------------------------
async def test_a_worker_death_fails_every_member_and_its_slot_waits_for_the_revival():
    """A worker that dies under a window ends all its members UNAVAILABLE; the worker's slot comes back only once
    the restarted actor answers, and GetStats then shows the new pid; meanwhile health would say no worker is up."""
    worker = RevivableWorker()
    engine = engine_on([worker])
    tickets = [engine.admit(ImageSpec(prompt=p), None) for p in ("a", "b")]
    task, window_id = await dispatch(engine, tickets)
    worker.runs[window_id].set_exception(ray.exceptions.RayActorError())
    await task
    assert [(await failure_of(engine, t)).code for t in tickets] == ["UNAVAILABLE", "UNAVAILABLE"]
    await settle()
    assert engine._free_workers.qsize() == 0 and not engine.available and worker.infos
    worker.infos[0].set_result(dataclasses.replace(INFO, pid=42))
    await settle()
    assert engine._free_workers.qsize() == 1 and engine.available and engine.stats()["worker_pids"] == [42]
    await engine.close()


async def test_a_dead_actor_is_replaced_and_a_restarting_one_is_asked_again():
    """The revival asks a restarting actor again (ActorUnavailableError) without replacing it; an actor dead for
    good is replaced by a new one from the factory, whose pid GetStats shows."""
    fresh = RevivableWorker(info_answers=[dataclasses.replace(INFO, pid=7)])
    dead = RevivableWorker(info_answers=[RuntimeError("the actor is gone for good")])
    engine = engine_on([dead], factory=lambda: fresh)
    await asyncio.wait_for(engine._revive(0), 5)
    assert engine._workers[0] is fresh and engine.stats()["worker_pids"] == [7]
    made: list[int] = []
    restarting = RevivableWorker(info_answers=[ray.exceptions.ActorUnavailableError("restarting", None),
                                               dataclasses.replace(INFO, pid=8)])
    engine = engine_on([restarting], factory=lambda: made.append(1))
    await asyncio.wait_for(engine._revive(0), 5)
    assert made == [] and engine._workers[0] is restarting and engine.stats()["worker_pids"] == [8]


async def test_revivals_are_shared_while_under_way_and_a_later_death_starts_a_new_one():
    """Windows failing together on a worker share its revival; a death after it ended gets a new one. Health goes
    NOT_SERVING only while every worker is being revived."""
    workers = [RevivableWorker(), RevivableWorker()]
    engine = engine_on(workers)
    told: list[bool] = []
    engine.on_availability = told.append
    first = engine._revival(0)
    assert engine._revival(0) is first and engine.available and told == []
    other = engine._revival(1)
    assert not engine.available and told == [False]
    await settle()
    workers[0].infos[0].set_result(INFO)
    await first
    await settle()
    assert engine.available and told == [False, True]
    second = engine._revival(0)
    assert second is not first and not second.done()
    await settle()
    workers[0].infos[1].set_result(INFO)
    workers[1].infos[0].set_result(INFO)
    await asyncio.gather(second, other)


async def test_the_death_watch_counts_a_death_and_revives_the_worker():
    """A death seen while no window runs counts as a worker failure and starts the worker's revival."""
    worker = RevivableWorker(watch_answers=[ray.exceptions.RayActorError()])
    engine = engine_on([worker])
    watch = asyncio.create_task(engine._watch(0))
    await settle()
    assert engine.stats()["worker_failures"] == 1 and not engine.available
    worker.infos[0].set_result(INFO)
    await settle()
    assert engine.available
    watch.cancel()
    await engine.close()


async def test_a_window_that_reached_a_dead_actor_goes_again_once():
    """A window whose `alive` call found the actor dead goes again after the revival, once: a second death fails
    its members UNAVAILABLE."""
    worker = RevivableWorker(info_answers=[INFO] * 5)
    worker.alive = worker._method("alive", lambda: answered(ray.exceptions.RayActorError()))
    runs: list[str] = []
    worker.run_window = worker._method("run_window", lambda wid, jobs: runs.append(wid)
                                       or answered(ray.exceptions.RayActorError()))
    engine = engine_on([worker])
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, _ = await dispatch(engine, [ticket])
    await asyncio.wait_for(task, 5)
    assert len(runs) == 2 and (await failure_of(engine, ticket)).code == "UNAVAILABLE"
    await engine.close()


async def test_a_window_that_went_through_although_alive_failed_is_delivered():
    """When `alive` fails but the window's own call answers (the actor was unreachable a moment), it is delivered."""
    worker = RevivableWorker()
    worker.alive = worker._method("alive", lambda: answered(ray.exceptions.RayActorError()))
    worker.run_window = worker._method("run_window", lambda wid, jobs: answered(WindowResult(((group((0,)),),), 1.0)))
    engine = engine_on([worker])
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, _ = await dispatch(engine, [ticket])
    assert (await engine.wait(ticket)).group_size == 1
    await task
    await engine.close()


async def test_members_that_leave_while_their_worker_revives_skip_the_window():
    """A window waiting for its worker's revival is not on the worker: a member that leaves cancels nothing there,
    and when all left the window is skipped (never sent) and the slot comes back."""
    worker = RevivableWorker()
    engine = engine_on([worker])
    revival = engine._revival(0)
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, _ = await dispatch(engine, [ticket])
    engine.release(ticket, "CANCELLED")
    await settle()
    assert engine.stats()["windows_cancelled"] == 0 and "cancel" not in worker.calls
    worker.infos[0].set_result(INFO)
    await revival
    await task
    assert "run_window" not in worker.calls and engine.stats()["windows_skipped"] == 1
    assert engine._free_workers.qsize() == 1


# ---- engine: hung workers --------------------------------------------------------------------------------------------
@pytest.fixture
def kills(monkeypatch) -> list[Any]:
    """The actors ray.kill was asked to kill."""
    killed: list[Any] = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append(actor))
    return killed


async def test_a_cancelled_window_still_running_after_hung_window_s_is_killed_once(kills):
    """When every member left a running window it is cancelled on the worker (counted); still running
    hung_window_s later its actor is killed, once, with the reason noted."""
    worker = RevivableWorker()
    engine = engine_on([worker], hung_window_s=1.0)  # wide: a busy CI machine may be late by a few 100 ms
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, window_id = await dispatch(engine, [ticket])
    window = engine._windows[window_id]
    engine.release(ticket, "CANCELLED")
    await settle()
    assert "cancel" in worker.calls and engine.stats()["windows_cancelled"] == 1
    await asyncio.sleep(0.15)
    assert kills == []
    await asyncio.sleep(1.0)
    assert kills == [worker] and window.hung == "was still running 1 s after its window's cancel"
    engine._kill_hung(window, "again")
    assert kills == [worker]
    worker.runs[window_id].set_exception(ray.exceptions.RayActorError())
    await task
    await engine.close()


@pytest.mark.parametrize(("stall_s", "stalled", "killed"), [(0.0, 1000.0, False), (0.3, 0.3, True), (0.3, 0.2, False)])
async def test_stall_s_kills_a_worker_stalled_that_long_and_zero_is_off(kills, stall_s, stalled, killed):
    """A worker whose model went stall_s without a UNet call is killed as hung; a shorter stall is not, and
    stall_s 0 turns the check off."""
    worker = RevivableWorker()
    worker.stalled_s = worker._method("stalled_s", lambda: stalled)
    engine = engine_on([worker], hung_window_s=0.3, stall_s=stall_s)
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, window_id = await dispatch(engine, [ticket])
    await asyncio.sleep(0.4)
    assert bool(kills) == killed
    worker.runs[window_id].set_exception(RuntimeError("ended"))
    await task
    await engine.close()


async def test_a_worker_that_does_not_answer_the_progress_call_is_killed(kills):
    """A worker that does not answer stalled_s within hung_window_s (a stopped process) is killed as hung."""
    worker = RevivableWorker()
    worker.stalled_s = worker._method("stalled_s", lambda: Future())
    engine = engine_on([worker], hung_window_s=0.2)
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    task, window_id = await dispatch(engine, [ticket])
    await asyncio.sleep(0.5)
    assert kills == [worker] and engine._windows[window_id].hung == "did not answer for 0.2 s (hung_window_s)"
    worker.runs[window_id].set_exception(RuntimeError("ended"))
    await task
    await engine.close()


# ---- engine: slots ---------------------------------------------------------------------------------------------------
async def test_a_failed_shared_done_call_keeps_the_slot_until_the_window_ends():
    """A shared_done call that fails says nothing about the model: the slot comes back when the window ends."""
    worker = PendingWorker()
    engine = engine_on([worker], worker_pipeline=2)
    task, window_id = await dispatch(engine, [engine.admit(ImageSpec(prompt="a"), None)])
    worker.shared[window_id].set_exception(RuntimeError("the call failed"))
    await settle()
    assert engine._free_workers.qsize() == 0
    worker.runs[window_id].set_exception(RuntimeError("ended"))
    await task
    assert engine._free_workers.qsize() == 1


async def test_a_shared_done_answer_after_the_window_ended_gives_no_second_slot():
    """A window's slot comes back once, whether its shared_done answer comes before or after the window ends."""
    worker = PendingWorker()
    engine = engine_on([worker], worker_pipeline=2)
    task, window_id = await dispatch(engine, [engine.admit(ImageSpec(prompt="a"), None)])
    worker.runs[window_id].set_exception(RuntimeError("ended"))
    await task
    worker.shared[window_id].set_result(None)
    await settle()
    assert engine._free_workers.qsize() == 1 and engine._in_flight == [0]


# ---- engine: lifecycle -----------------------------------------------------------------------------------------------
async def test_stopping_shows_in_stats_and_drain_reports_what_is_left():
    """stop_accepting shows as serving False and refuses new requests; drain is False while a request is left."""
    engine = engine_on([PendingWorker()])
    ticket = engine.admit(ImageSpec(prompt="a"), None)
    engine.stop_accepting()
    assert engine.stats()["serving"] is False
    assert await engine.drain(0.1) is False
    engine.release(ticket, "OK")
    assert await engine.drain(0.1) is True


async def test_close_ends_waiting_requests_unavailable_and_a_passed_deadline_is_deadline_exceeded():
    """close() ends what still waits with UNAVAILABLE (server shutting down); a wait past the request's deadline
    is DEADLINE_EXCEEDED."""
    engine = engine_on([PendingWorker()])
    late = engine.admit(ImageSpec(prompt="a", client_id="x"), 0.05)
    assert (await failure_of(engine, late)).code == "DEADLINE_EXCEEDED"
    ticket = engine.admit(ImageSpec(prompt="b", client_id="y"), None)
    await engine.close()
    error = await failure_of(engine, ticket)
    assert (error.code, error.message, engine.closed) == ("UNAVAILABLE", "server shutting down", True)


# ---- service ---------------------------------------------------------------------------------------------------------
def test_to_spec_keeps_zero_values_and_leaves_unset_ones_to_the_server():
    """A seed, share or guidance of 0 is that value, not "unset"; unset ones are None (the server's defaults);
    the negative prompt is kept."""
    zero = to_spec(edge_pb2.ImageRequest(prompt="a", seed=0, share=0.0, guidance=0.0, negative_prompt="blurry"))
    assert (zero.seed, zero.share, zero.guidance, zero.negative_prompt) == (0, 0.0, 0.0, "blurry")
    unset = to_spec(edge_pb2.ImageRequest(prompt="a"))
    assert (unset.seed, unset.share, unset.guidance) == (None, None, None)


class Aborted(Exception):
    """What FakeContext.abort raises (grpc.aio raises to end the handler)."""


class FakeContext:
    """A grpc.aio ServicerContext stand-in: records writes, the abort and the status set."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self.written: list[edge_pb2.ImageResponse] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.code: grpc.StatusCode | None = None
        self._remaining = time_remaining

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40001"

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float | None:
        return self._remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)

    async def write(self, message: edge_pb2.ImageResponse) -> None:
        self.written.append(message)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass


async def test_a_malformed_request_is_invalid_argument():
    """A request that did not parse ends INVALID_ARGUMENT with what was wrong."""
    context = FakeContext()
    with pytest.raises(Aborted):
        await refuse_malformed(MalformedRequest("sage_edge.v1.StatsRequest", "bad wire"), context)
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "malformed sage_edge.v1.StatsRequest: bad wire")


def _servicer(worker: PendingWorker, **settings) -> tuple[EdgeSamplerServicer, Engine, EdgeMetrics]:
    metrics = EdgeMetrics()
    engine = engine_on([worker], metrics=metrics, **settings)
    return EdgeSamplerServicer(engine, engine.config, metrics=metrics), engine, metrics


async def _serve_one(servicer: EdgeSamplerServicer, request: edge_pb2.ImageRequest,
                     context: FakeContext) -> tuple[asyncio.Task, str]:
    """Start RequestImage and dispatch its ticket (the engine's only one) as a window; (task, window id)."""
    engine = servicer.engine
    task = asyncio.create_task(servicer.RequestImage(request, context))
    await settle()
    (ticket,) = engine._tickets.values()
    _, window_id = await dispatch(engine, [ticket])
    return task, window_id


async def test_request_image_streams_accepted_chunks_and_done():
    """Accepted (with the server's fingerprint and the group's similarity and cached steps), chunks indexed 0..n-1
    of at most chunk_size bytes, Done counting them; then the request counts OK, its bytes and queue wait, and the
    active gauge is back to 0."""
    worker = PendingWorker()
    servicer, engine, metrics = _servicer(worker, chunk_size=1024)
    context = FakeContext()
    task, window_id = await _serve_one(servicer, edge_pb2.ImageRequest(prompt="a"), context)
    assert sample(metrics, "sage_edge_active_requests") == 1
    data = bytes(range(256)) * 10
    result = GroupResult((0,), 3, 2, 0.8125, (1, 4, 4, 4), {"fp32": Payload("fp32", data, (len(data),), ("latent",))},
                         cached_steps=1)
    worker.runs[window_id].set_result(WindowResult(((result,),), 1.0))
    await task
    accepted, *chunks, done = context.written
    assert (accepted.accepted.model_fingerprint, accepted.accepted.min_similarity) == ("abc", 0.8125)
    assert accepted.accepted.cached_steps == 1
    assert [c.chunk.index for c in chunks] == [0, 1, 2] and b"".join(c.chunk.data for c in chunks) == data
    assert (done.done.chunks, done.done.total_bytes, done.done.sha256) == (3, 2560, hashlib.sha256(data).hexdigest())
    stats = engine.stats()
    assert (stats["status_counts"], stats["bytes_sent"]) == ({"OK": 1}, 2560)
    assert sample(metrics, "sage_edge_active_requests") == 0
    assert sample(metrics, "sage_edge_requests_total", code="OK") == 1
    assert sample(metrics, "sage_edge_bytes_sent_total") == 2560
    assert 0 <= sample(metrics, "sage_edge_queue_wait_seconds_sum") < 1.0


async def test_request_image_ends_with_the_status_that_ended_it():
    """A refused request is aborted with its status and counted; a request its engine failed counts that status; a
    call cancelled once its deadline had passed counts DEADLINE_EXCEEDED, one cut after the engine closed
    UNAVAILABLE, any other cancel CANCELLED."""
    worker = PendingWorker()
    servicer, engine, metrics = _servicer(worker)
    context = FakeContext()
    with pytest.raises(Aborted):
        await servicer.RequestImage(edge_pb2.ImageRequest(prompt=""), context)
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(metrics, "sage_edge_requests_total", code="INVALID_ARGUMENT") == 1
    context = FakeContext()
    task, window_id = await _serve_one(servicer, edge_pb2.ImageRequest(prompt="a"), context)
    worker.runs[window_id].set_result(WindowResult((BucketRefused("no"),), 1.0))
    with pytest.raises(Aborted):
        await task
    assert engine.stats()["status_counts"]["INVALID_ARGUMENT"] == 2 and engine.stats()["failed"] == 1  # + the refusal
    for remaining, closed, status in ((0.09, False, "DEADLINE_EXCEEDED"), (30.0, False, "CANCELLED"),
                                      (30.0, True, "UNAVAILABLE")):
        engine._closed = closed
        task = asyncio.create_task(servicer.RequestImage(edge_pb2.ImageRequest(prompt="b"), FakeContext(remaining)))
        await settle(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine.stats()["status_counts"].get(status) == 1, (status, engine.stats()["status_counts"])
    assert sample(metrics, "sage_edge_active_requests") == 0


def test_accepted_message_copies_the_group():
    """Accepted carries the group's similarity and cached steps as the worker found them."""
    from edge_server.engine import Delivery

    delivery = Delivery("r", "g", 2, 3, 4, "ddim", 7.5, 5, (1, 4, 2, 2), 0.8125, Payload("fp16", b"x", (1,), ("l",)),
                        1.0, 2.0, cached_steps=2, negative_prompt="n")
    accepted = accepted_message(delivery).accepted
    assert (accepted.min_similarity, accepted.cached_steps, accepted.codec) == (0.8125, 2, "fp16")


async def test_server_info_announces_the_defaults_and_limits():
    """GetServerInfo gives the model's default height and width (in order) and the batching window."""
    info = dataclasses.replace(INFO, default_height=48, default_width=32)
    engine = Engine(ServerConfig(max_wait_ms=25.0, max_batch=6), [PendingWorker()], [info], worker_factory=None)
    reply = await EdgeSamplerServicer(engine, engine.config).GetServerInfo(edge_pb2.ServerInfoRequest(), FakeContext())
    assert (reply.default_height, reply.default_width, reply.max_wait_ms, reply.max_batch) == (48, 32, 25.0, 6)


class FakeHealth:
    """health.aio.HealthServicer's `set`, recorded."""

    def __init__(self) -> None:
        self.states: list[tuple[str, int]] = []

    async def set(self, name: str, status: int) -> None:
        self.states.append((name, status))


async def test_health_follows_the_workers_and_stays_down_after_a_stop():
    """Health says SERVING for the server and its service; NOT_SERVING while every worker is being revived, SERVING
    once one is back; nothing more once a stop was asked for."""
    serving, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    worker = RevivableWorker()
    engine, fake, stop = engine_on([worker]), FakeHealth(), asyncio.Event()
    await follow_availability(engine, fake, stop)
    assert fake.states == [("", serving), (SERVICE_NAME, serving)]
    revival = engine._revival(0)
    await settle()
    assert fake.states[2:] == [("", down), (SERVICE_NAME, down)]
    worker.infos[0].set_result(INFO)
    await revival
    await settle()
    assert fake.states[4:] == [("", serving), (SERVICE_NAME, serving)]
    stop.set()
    engine._revival(0)
    await settle()
    assert len(fake.states) == 6
    await engine.close()


def test_grpc_options_time_keepalives_in_milliseconds():
    """keepalive_s and keepalive_timeout_s become milliseconds; the ping timeout is set with the keepalive timeout
    (grpcio times a ping out by it)."""
    options = dict(grpc_options(ServerConfig(keepalive_s=30.0, keepalive_timeout_s=10.0)))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 10_000


def test_one_line_escapes_what_could_forge_a_log_line():
    """A newline, carriage return or escape in a logged value is written escaped; printable text is unchanged."""
    assert one_line("kiosk\nINFO forged\r\x1b[2J") == "kiosk\\nINFO forged\\r\\x1b[2J"
    assert one_line("kiosk 7") == "kiosk 7"


# ---- metrics ---------------------------------------------------------------------------------------------------------
def test_group_evaluations_count_what_sharing_saved():
    """A group of 3 with 10 steps sharing 4 (the server ran 4): independent 3x10, used 4 + 3x6, saved 8, doubled
    with guidance; the group size is observed."""
    metrics = EdgeMetrics()
    metrics.observe_group(3, 10, 4, 4, cfg=False)
    values = [sample(metrics, f"sage_edge_unet_evaluations{s}_total") for s in ("_independent", "", "_saved")]
    assert values == [30, 22, 8] and sample(metrics, "sage_edge_group_size_sum") == 3
    metrics.observe_group(3, 10, 4, 4, cfg=True)
    values = [sample(metrics, f"sage_edge_unet_evaluations{s}_total") for s in ("_independent", "", "_saved")]
    assert values == [90, 66, 24]


def test_requests_errors_and_queue_waits_are_counted_by_code():
    """Every call counts under its code, only non-OK ones as errors; a zero queue wait is observed; a denied call is
    an error, not a request; a window's shared phase is observed in seconds."""
    metrics = EdgeMetrics()
    metrics.observe_request("OK", 10, 0.0)
    metrics.observe_request("INTERNAL", 0, None)
    metrics.observe_denied("UNAUTHENTICATED")
    metrics.observe_window(4, 0.25)
    assert sample(metrics, "sage_edge_requests_total", code="OK") == 1
    assert sample(metrics, "sage_edge_errors_total", code="OK") == 0
    assert sample(metrics, "sage_edge_errors_total", code="INTERNAL") == 1
    assert sample(metrics, "sage_edge_queue_wait_seconds_count") == 1
    assert sample(metrics, "sage_edge_errors_total", code="UNAUTHENTICATED") == 1
    assert sample(metrics, "sage_edge_requests_total", code="UNAUTHENTICATED") == 0
    assert sample(metrics, "sage_edge_shared_phase_seconds_sum") == 0.25


def test_metrics_are_served_on_the_host_asked_for_only():
    """/metrics listens on metrics_host (127.0.0.1 by default), not on every interface."""
    server, thread = EdgeMetrics().serve("127.0.0.1", 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


# ---- health probe ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def health_server():
    """An in-process gRPC health service on 127.0.0.1: the server SERVING, service "svc" NOT_SERVING."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield address
    server.stop(grace=None)


def test_the_probe_checks_the_service_asked_for(health_server, capsys):
    """The probe passes (exit 0) on SERVING, and checks the named service: NOT_SERVING fails it (exit 1)."""
    assert healthcheck.main(["--address", health_server]) == 0
    assert healthcheck.main(["--address", health_server, "--service", "svc"]) == 1
    assert "unhealthy: NOT_SERVING" in capsys.readouterr().err


def test_the_probe_takes_its_address_from_the_environment(monkeypatch):
    """SAGE_HEALTH_ADDRESS and SAGE_HEALTH_TLS_CA are the defaults of --address and --tls-ca."""
    monkeypatch.setenv("SAGE_HEALTH_ADDRESS", "10.0.0.5:1")
    monkeypatch.setenv("SAGE_HEALTH_TLS_CA", "/ca.pem")
    args = healthcheck.parse_args([])
    assert (args.address, args.tls_ca) == ("10.0.0.5:1", "/ca.pem")


def test_the_probe_channel_follows_the_tls_options(monkeypatch, tmp_path: Path):
    """A client certificate alone means TLS (system roots); CA, key and certificate go to grpc in its order; the
    server name override is passed; a key without its certificate and an unreadable file are failures, not
    tracebacks."""
    made: list[tuple] = []
    monkeypatch.setattr(grpc, "ssl_channel_credentials", lambda *files: files)
    monkeypatch.setattr(grpc, "secure_channel", lambda address, creds, options=(): made.append((creds, options)))
    for name in ("ca", "key", "cert"):
        (tmp_path / name).write_bytes(name.encode())
    args = healthcheck.parse_args(["--tls-cert", str(tmp_path / "cert"), "--tls-key", str(tmp_path / "key")])
    healthcheck._channel(args)
    assert made.pop() == ((None, b"key", b"cert"), [])
    args = healthcheck.parse_args(["--tls-ca", str(tmp_path / "ca"), "--tls-server-name", "edge.local"])
    healthcheck._channel(args)
    assert made.pop() == ((b"ca", None, None), [("grpc.ssl_target_name_override", "edge.local")])
    ok, what = healthcheck.check(healthcheck.parse_args(["--tls-key", str(tmp_path / "key")]))
    assert not ok and "go together" in what
    ok, what = healthcheck.check(healthcheck.parse_args(["--tls-ca", str(tmp_path / "missing")]))
    assert not ok and what.startswith("cannot read a TLS file")

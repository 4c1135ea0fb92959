"""The edge worker's pipeline: the model is held for a window's shared phase only, so the next window's shared
phase runs while the last one's latents go through the codec (in-process EdgeWorker, tiny model)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_server.config import ConfigError, build_config
from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec


@pytest.fixture(scope="module")
def worker() -> EdgeWorker:
    return EdgeWorker(build_config(None, {"model": "tiny", "ray_num_cpus": 1}))


def _window(worker: EdgeWorker, prompt: str) -> list[BucketJob]:
    info = worker.info()
    settings = BucketSettings(3, 7.5, "ddim", info.default_height, info.default_width)
    return [BucketJob(settings, (MemberSpec(prompt, 1, 0.5, "fp16"),))]


def test_next_window_shares_while_the_last_one_encodes(worker, monkeypatch):
    first_shared, second_started = threading.Event(), threading.Event()
    shared, encode = worker._shared_bucket, worker._encode_bucket

    def traced_shared(job, stop):
        if job.members[0].prompt == "second":
            second_started.set()
        out = shared(job, stop)
        if job.members[0].prompt == "first":
            first_shared.set()
        return out

    def waiting_encode(ready):
        if ready[0].result.members == (0,) and not second_started.is_set():
            # the first window encodes: the second's shared phase must be able to start meanwhile
            assert second_started.wait(20), "the second window's shared phase waited for the first one's codec"
        return encode(ready)

    monkeypatch.setattr(worker, "_shared_bucket", traced_shared)
    monkeypatch.setattr(worker, "_encode_bucket", waiting_encode)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(worker.run_window, "w-first", _window(worker, "first"))
        assert first_shared.wait(60)
        second = pool.submit(worker.run_window, "w-second", _window(worker, "second"))
        results = [first.result(60), second.result(60)]
    for result in results:
        (groups,) = result.buckets
        assert [g.members for g in groups] == [(0,)] and groups[0].payloads["fp16"].data


def test_pipeline_depth_is_checked():
    with pytest.raises(ConfigError, match="worker_pipeline must be in"):
        build_config(None, {"worker_pipeline": 0})


def test_a_member_that_shares_nothing_leaves_every_member_its_own_noise(worker):
    """Two identical prompts group; one asks to share nothing, so the group shares no step, and then it must not
    share its noise either: each request gets its own seed's noise, as independent sampling would give it."""
    info = worker.info()
    settings = BucketSettings(3, 7.5, "ddim", info.default_height, info.default_width)
    members = (MemberSpec("a red circle", 11, 0.5, "fp16"), MemberSpec("a red circle", 12, 0.0, "fp16"))
    (groups,) = worker.run_window("w-share0", [BucketJob(settings, members)]).buckets
    assert sorted((g.members, g.seed, g.branch_step) for g in groups) == [((0,), 11, 0), ((1,), 12, 0)]
    both = worker.run_window("w-share", [BucketJob(settings, (members[0], members[0]))]).buckets[0]
    assert [(g.members, g.seed) for g in both] == [((0, 1), 11)]


def test_a_cancel_that_comes_before_its_window_stops_the_window(worker):
    """The engine's cancel and its run_window race to the actor: a cancel that comes first stops the window when
    it comes (it used to answer False and be lost, and the window ran for nobody); other windows still run."""
    from edge_server.worker import EARLY_CANCELS, WindowCancelled

    assert worker.cancel("w-early") is False  # not running yet
    with pytest.raises(WindowCancelled):
        worker.run_window("w-early", _window(worker, "cancelled before it came"))
    (groups,) = worker.run_window("w-early", _window(worker, "a later window of that name")).buckets  # used up
    assert [g.members for g in groups] == [(0,)]
    for i in range(EARLY_CANCELS + 1):  # cancels of windows that never come are forgotten, oldest first
        worker.cancel(f"w-never-{i}")
    assert len(worker._early_cancels) == EARLY_CANCELS and "w-never-0" not in worker._early_cancels

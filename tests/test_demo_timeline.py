"""The demo's timeline.png: each request's bar is cut where its time went, from the device's own timings."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from device_client.demo import RequestRecord
from device_client.timeline import Segment, bar, group_labels, segments, write_timeline

TIMINGS = {"connect": 2.0, "wait_accepted": 900.0, "stream": 5.0, "verify_decode": 3.0, "server_queue_wait": 400.0,
           "server_shared_phase": 450.0, "branch_phase": 1200.0, "vae_decode": 80.0, "total": 2190.0}  # fmt: skip


def test_a_served_request_is_cut_into_its_phases_end_to_end() -> None:
    """Queue wait, shared phase, the rest of the way to the latent (910 - 400 - 450 = 60 ms), branch, VAE: one
    after the other from the request's start."""
    got = segments(1000.0, 2190.0, True, TIMINGS)
    assert got == [Segment("queue", 1000.0, 400.0), Segment("shared", 1400.0, 450.0),
                   Segment("transfer", 1850.0, 60.0), Segment("branch", 1910.0, 1200.0),
                   Segment("vae", 3110.0, 80.0)]  # fmt: skip


def test_the_servers_times_are_cut_to_the_devices_wait() -> None:
    """The server's queue wait and shared phase are its own clock: together they never draw past the moment the
    device had its latent (here they claim 1100 ms of a 910 ms wait), and a negative one draws nothing."""
    got = segments(0.0, 2000.0, True, {**TIMINGS, "server_queue_wait": 700.0, "server_shared_phase": 400.0})
    assert [(s.phase, s.length_ms) for s in got[:2]] == [("queue", 700.0), ("shared", 210.0)]
    assert got[2].phase == "branch" and got[2].start_ms == 910.0
    assert segments(0.0, 1.0, True, {**TIMINGS, "server_queue_wait": -5.0})[0] == Segment("shared", 0.0, 450.0)


def test_failed_and_local_requests_are_one_bar() -> None:
    """A request without an image is its whole latency in one segment; a local fallback its local sampling."""
    assert segments(50.0, 300.0, False, {}) == [Segment("failed", 50.0, 300.0)]
    assert segments(0.0, 900.0, True, {"local_sampling": 850.0, "total": 900.0}) == [Segment("local", 0.0, 850.0)]
    record = RequestRecord(3, "a cat", "device-0", "UNAVAILABLE", "gone", started_ms=10.0, latency_ms=20.0)
    assert bar(record) == [Segment("failed", 10.0, 20.0)]


def test_rows_are_labelled_by_group() -> None:
    """Members of a group of two or more name its number in the report (and its grid's) and its size."""
    records = [RequestRecord(i, f"p{i}", status="OK" if i < 4 else "INTERNAL") for i in range(5)]
    labels = group_labels(records, {"w1-g0": [1], "w1-g1": [0, 2, 3]})
    assert labels == {1: "#1 alone", 0: "#0 group 1 (3)", 2: "#2 group 1 (3)", 3: "#3 group 1 (3)", 4: "#4 INTERNAL"}


def served(i: int, start: float) -> RequestRecord:
    """A served request's record as the demo keeps it."""
    return RequestRecord(i, f"p{i}", f"device-{i % 2}", "OK", started_ms=start, latency_ms=2190.0,
                         metadata={"timings_ms": TIMINGS})  # fmt: skip


def test_the_timeline_is_a_png_with_a_row_per_request(tmp_path: Path) -> None:
    """One row per request (served, grouped, failed): the figure grows with them; no request, no file."""
    records = [served(0, 0.0), served(1, 100.0), served(2, 2500.0),
               RequestRecord(3, "p3", "device-1", "INTERNAL", "boom", started_ms=2300.0, latency_ms=40.0)]  # fmt: skip
    small = write_timeline(records[:2], {"g0": [0, 1]}, tmp_path / "small.png")
    large = write_timeline(records, {"g0": [0, 2], "g1": [1]}, tmp_path / "large.png")
    assert small is not None and large is not None
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG" and b.height > a.height
    assert write_timeline([], {}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("key", ["server_queue_wait", "branch_phase"])
def test_a_missing_timing_draws_no_segment(key: str) -> None:
    """A timing the device did not report (an older server's Done, say) leaves its segment out, not a zero bar."""
    got = segments(0.0, 2000.0, True, {k: v for k, v in TIMINGS.items() if k != key})
    assert {"server_queue_wait": "queue", "branch_phase": "branch"}[key] not in {s.phase for s in got}
    assert all(s.length_ms > 0 for s in got)

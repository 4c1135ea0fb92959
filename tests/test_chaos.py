"""Fault injection against a real edge server process on 127.0.0.1: devices that stop reading, stop or die in the
middle of a stream or while queued, a Ray worker that dies while the server is idle, a request whose settings the
model's scheduler refuses (at admission), and a server stopped (twice) with requests queued, running and streaming.

Two module-scoped servers (tiny model, local Ray), each started only when a test needs it:
- `capped`: a short server-side deadline cap (--max-deadline-s) and fast keepalive pings, for stalled streams;
- `slow`: 20 ms per UNet call and one window in flight per worker, for worker deaths and queued devices.
A request that comes while the worker is busy is collected into a window (max_wait_ms after it) that waits for the
worker, and what comes after it joins that window when the worker frees (up to max_batch): tests that want requests
in one window queue such a `waiting` request first, so that the others queue behind it. A stalled reader asks for
a 256x256 image (a latent of about 229 kB, fp32) over a channel without BDP probing, so its HTTP/2 window stays at
64 KiB and the server's writes really block once it stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_fixtures import REPO_ROOT, EdgeServerProcess, idle, server_env, start_edge_server

from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

CAP_S = 6.0  # the capped server's --max-deadline-s
STALL_SIDE = 256  # image side of a stalled reader's request: its payload is well over one HTTP/2 window
NO_BDP = [("grpc.http2.bdp_probe", 0)]  # the client's stream window stays at 64 KiB
FAST = {"steps": 4, "share": 0.5, "guidance": 1.0}
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def capped() -> EdgeServerProcess:
    """Requests live at most CAP_S seconds; a connection quiet for 1 s is pinged and closed 1 s later."""
    proc = start_edge_server(
        "--max-deadline-s", str(CAP_S), "--keepalive-s", "1", "--keepalive-timeout-s", "1", "--chunk-size", "1024"
    )
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> EdgeServerProcess:
    """20 ms per UNet call, one window in flight per worker, at most 5 open streams per host; up to 1000 steps, so
    that one request can hold the worker for 20 s; a cancelled window still running 3 s later means a hung worker."""
    config = tmp_path_factory.mktemp("slow") / "edge.yaml"
    config.write_text("max_steps: 1000\n")
    proc = start_edge_server(
        "--config", str(config), "--worker-step-delay-ms", "20", "--worker-pipeline", "1",
        "--max-streams-per-host", "5", "--hung-window-s", "3",
    )  # fmt: skip
    yield proc
    proc.terminate()


def request(prompt: str, **fields) -> edge_pb2.ImageRequest:
    """An ImageRequest with the fast settings unless overridden."""
    return edge_pb2.ImageRequest(prompt=prompt, **{**FAST, **fields})


async def status_of(stub: edge_pb2_grpc.EdgeSamplerStub, req: edge_pb2.ImageRequest, timeout: float = TIMEOUT):
    """(final status code, details, payload bytes received) of one RequestImage call read to its end."""
    received = 0
    try:
        async for msg in stub.RequestImage(req, timeout=timeout):
            if msg.WhichOneof("kind") == "chunk":
                received += len(msg.chunk.data)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), received
    return grpc.StatusCode.OK, "", received


async def status_of_call(call) -> tuple[grpc.StatusCode, str]:
    """The final status of a RequestImage call already started (read to its end)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    except asyncio.CancelledError:
        return grpc.StatusCode.CANCELLED, "cancelled here"
    return grpc.StatusCode.OK, ""


def balanced(stats: edge_pb2.ServerStats) -> bool:
    """Every admitted request is finished, and every call has one status."""
    return (
        stats.admitted == stats.completed + stats.failed + stats.active_requests
        and sum(stats.status_counts.values()) == stats.completed + stats.failed + stats.rejected
    )


# ---- stalled streams ----------------------------------------------------------------------------------------------
async def test_a_device_that_stops_reading_is_cut_at_the_deadline_cap(capped: EdgeServerProcess) -> None:
    """A device that asks with no deadline, takes Accepted and then reads nothing more (its process alive, so it
    answers keepalive pings) holds its stream no longer than --max-deadline-s: the server ends it with
    DEADLINE_EXCEEDED, gives back its queue, client and host slots at the cap, and the device, reading again, gets
    that status after the bytes that were in flight. The cap used to hold only until the shared phase ended: the
    blocked stream kept its slots until the device read again, however long that took."""
    await asyncio.to_thread(capped.wait_stats, idle)
    before = capped.stats()
    async with grpc.aio.insecure_channel(capped.address, options=NO_BDP) as channel:
        call = edge_pb2_grpc.EdgeSamplerStub(channel).RequestImage(
            request("a device that stops reading", height=STALL_SIDE, width=STALL_SIDE, client_id="stalled")
        )  # no deadline: the server's cap is its only one
        first = await call.read()
        assert first.WhichOneof("kind") == "accepted"
        started = time.monotonic()
        stats = await asyncio.to_thread(capped.wait_stats, lambda s: s.active_requests == 0, CAP_S + 15)
        assert time.monotonic() - started < CAP_S + 5
        assert idle(stats) and balanced(stats), stats
        assert stats.status_counts["DEADLINE_EXCEEDED"] == before.status_counts["DEADLINE_EXCEEDED"] + 1, stats
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (msg := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
                received += len(msg.chunk.data)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert 0 < received < 150_000  # what was in flight when the stream blocked (the payload is about 229 kB)


STALLED_READER = """
import os, signal, sys, time
import grpc
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.http2.bdp_probe", 0)])
side = int(sys.argv[2])
stream = edge_pb2_grpc.EdgeSamplerStub(channel).RequestImage(edge_pb2.ImageRequest(
    prompt=sys.argv[3], steps=4, share=0.5, guidance=1.0, height=side, width=side, client_id=sys.argv[3]))
print(next(stream).WhichOneof("kind"), flush=True)
if sys.argv[4] == "stop":  # reads nothing more: the server's writes block; SIGCONT wakes it
    os.kill(os.getpid(), signal.SIGSTOP)
else:
    time.sleep(float(sys.argv[4]))  # reads nothing meanwhile: the server's writes block
received = 0
try:
    for msg in stream:
        received += len(msg.chunk.data) if msg.WhichOneof("kind") == "chunk" else 0
    print("OK", received, flush=True)
except grpc.RpcError as exc:
    print(exc.code().name, received, flush=True)
"""


def stalled_reader(address: str, prompt: str, pause: str) -> subprocess.Popen:
    """A device process that takes Accepted of a large stream, then reads nothing: for `pause` seconds, or, with
    "stop", until a SIGCONT (it SIGSTOPs itself: a device that froze, or left the network)."""
    return subprocess.Popen(
        [sys.executable, "-c", STALLED_READER, address, str(STALL_SIDE), prompt, pause],
        stdout=subprocess.PIPE,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
    )


async def test_devices_stopped_or_killed_mid_stream_free_their_slots(capped: EdgeServerProcess) -> None:
    """Two devices take Accepted of a large stream and stop reading; one then SIGSTOPs itself (its connection
    stays open and nothing answers the server's pings), the other is SIGKILLed. The server's blocked writes hold up
    no one (another device is served meanwhile); the stopped device's connection is closed by the keepalive, before
    the deadline cap, the killed one's at once: both end CANCELLED and the server is idle again. Woken with
    SIGCONT, the stopped device sees its stream fail, after the bytes that were in flight."""
    await asyncio.to_thread(capped.wait_stats, idle)
    before = capped.stats()
    stopped = stalled_reader(capped.address, "a device stopped mid-stream", "stop")
    killed = stalled_reader(capped.address, "a device killed mid-stream", "60")
    try:
        for device in (stopped, killed):
            assert device.stdout is not None and device.stdout.readline().strip() == "accepted"
        killed.kill()
        async with capped.aio_channel() as channel:
            code, _, received = await status_of(edge_pb2_grpc.EdgeSamplerStub(channel), request("meanwhile"), 20)
        assert code == grpc.StatusCode.OK and received
        stats = await asyncio.to_thread(capped.wait_stats, idle, CAP_S + 15)
        assert balanced(stats), stats
        # both CANCELLED (a closed connection), none at the deadline cap: the keepalive found the stopped one first
        assert stats.status_counts["CANCELLED"] == before.status_counts["CANCELLED"] + 2, stats
        stopped.send_signal(signal.SIGCONT)
        out, _ = stopped.communicate(timeout=30)
        code, received = out.split()
        assert code != "OK" and int(received) < 150_000, out
    finally:
        for device in (stopped, killed):
            with contextlib.suppress(ProcessLookupError):
                device.send_signal(signal.SIGCONT)
            device.kill()
            device.wait()


# ---- many devices, a third of them leaving -------------------------------------------------------------------------
async def test_forty_devices_a_third_leaving_leave_the_counts_balanced(capped: EdgeServerProcess) -> None:
    """40 devices, each on its own connection, within a second; a third of them leave at a random moment (a cancel,
    a closed connection, a deadline of 0.05 to 1.5 s). Every device that stays gets its latent, the server ends
    idle (no window, client or queue entry left) and its counts add up: admitted = completed + failed, one status
    per call, at least as many OK as devices saw (a device may leave just after the server wrote its last
    message)."""
    await asyncio.to_thread(capped.wait_stats, idle)
    before = capped.stats()
    rng = random.Random(7)
    modes = ["stay", "stay"] * 7 + ["cancel", "close", "deadline"] * 4

    async def device(i: int, mode: str) -> tuple[str, grpc.StatusCode]:
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        async with capped.aio_channel() as channel:
            call = edge_pb2_grpc.EdgeSamplerStub(channel).RequestImage(
                request(f"device {i % 5}", steps=rng.choice([4, 8, 30]), seed=i, client_id=f"d{i}"),
                timeout=rng.uniform(0.05, 1.5) if mode == "deadline" else TIMEOUT,
            )
            if mode in ("cancel", "close"):
                later = rng.uniform(0.0, 1.0)
                asyncio.get_running_loop().call_later(
                    later, call.cancel if mode == "cancel" else lambda: asyncio.ensure_future(channel.close())
                )
            code, _ = await status_of_call(call)
        return mode, code

    results = await asyncio.wait_for(asyncio.gather(*(device(i, m) for i, m in enumerate(modes))), TIMEOUT)
    assert all(code == grpc.StatusCode.OK for mode, code in results if mode == "stay"), results
    stats = await asyncio.to_thread(capped.wait_stats, idle, 20)
    assert balanced(stats) and stats.admitted == before.admitted + len(modes), stats
    seen_ok = sum(code == grpc.StatusCode.OK for _, code in results)
    assert stats.completed - before.completed >= seen_ok, (stats, results)


async def hold_the_worker(server: EdgeServerProcess, stub: edge_pb2_grpc.EdgeSamplerStub):
    """A request that holds the worker in a long window (its call and the task awaiting its status), and one
    collected into the next window, which waits for the worker (its task): requests sent after these queue, and
    join that window when the worker frees. It asks for 3 steps, so it shares no bucket (and no group) with them."""
    blocker = stub.RequestImage(request("holds the worker", steps=900, share=1.0), timeout=120)
    blocking = asyncio.create_task(status_of_call(blocker))
    await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1, 30)
    waiting = asyncio.create_task(status_of(stub, request("waiting for the worker", steps=3)))
    await asyncio.to_thread(server.wait_stats, lambda s: s.waiting_requests == 1 and s.active_requests == 2, 20)
    return blocker, blocking, waiting


# ---- devices killed while queued -------------------------------------------------------------------------------
async def test_a_device_killed_while_queued_leaves_its_group_and_its_host_slot(
    slow: EdgeServerProcess, tmp_path: Path
) -> None:
    """Three `sage-device` processes ask for the same prompt while the worker is busy; one is SIGKILLed while
    queued. Its request ends CANCELLED and gives back its per-host slot (--max-streams-per-host 5: a new request
    from the same host is admitted), and the two other devices, with that new request, still form one group of
    three and write their images."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    prompt = "a green square on the right"
    async with slow.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        blocker, blocking, waiting = await hold_the_worker(slow, stub)
        devices = [device_process(slow.address, prompt, tmp_path / f"device{i}.png") for i in range(3)]
        try:
            await asyncio.to_thread(slow.wait_stats, lambda s: s.active_requests == 5, 120)  # host cap reached
            devices[0].kill()
            await asyncio.to_thread(slow.wait_stats, lambda s: s.active_requests == 4, 20)
            joining = asyncio.create_task(status_of(stub, request(prompt, seed=5)))
            await asyncio.to_thread(slow.wait_stats, lambda s: s.active_requests == 5, 20)
            blocker.cancel()
            assert (await blocking)[0] == grpc.StatusCode.CANCELLED
            results = await asyncio.wait_for(asyncio.gather(waiting, joining), TIMEOUT)
            assert [code for code, _, _ in results] == [grpc.StatusCode.OK] * 2, results
            outputs = [await asyncio.to_thread(device.communicate, timeout=120) for device in devices[1:]]
        finally:
            for device in devices:
                device.kill()
                device.wait()
    for device, (out, _) in zip(devices[1:], outputs, strict=True):
        assert device.returncode == 0 and " of 3," in out, out
    assert (tmp_path / "device1.png").is_file() and (tmp_path / "device2.png").is_file()
    stats = await asyncio.to_thread(slow.wait_stats, idle, 10)
    assert balanced(stats) and stats.rejected == before.rejected, stats
    assert stats.status_counts["CANCELLED"] == before.status_counts["CANCELLED"] + 2, stats  # device 0, the blocker


def device_process(address: str, prompt: str, out: Path) -> subprocess.Popen:
    """`sage-device generate` of `prompt` (seed 5, 4 steps sharing 2) against the server at `address`."""
    return subprocess.Popen(
        [sys.executable, "-m", "device_client.cli", "generate", prompt, "-o", str(out), "--server", address,
         "--model", "tiny", "--steps", "4", "--share", "0.5", "--guidance", "1", "--seed", "5", "--retries", "0",
         "--timeout", "120"],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
    )


# ---- the Ray worker dies ------------------------------------------------------------------------------------------
async def test_a_worker_that_dies_while_idle_is_replaced_and_the_next_requests_wait(slow: EdgeServerProcess) -> None:
    """SIGKILL the model actor while no window runs. With no request coming, the server sees the death by itself
    (worker_failures, and GetStats shows the restarted actor's pid); killed again, the requests sent right after
    the death wait for the restarted actor and succeed. Before, the death went unseen until a window was sent to
    the dead actor: the next requests, within about 10 s of it, ended UNAVAILABLE ('the edge worker running this
    request's group died'), and a death no request saw left the dead pid in GetStats and was never counted."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    os.kill(before.worker_pids[0], signal.SIGKILL)
    stats = await asyncio.to_thread(slow.wait_stats, lambda s: s.worker_pids[0] not in (0, before.worker_pids[0]), 60)
    assert stats.worker_failures > before.worker_failures and idle(stats), stats
    os.kill(stats.worker_pids[0], signal.SIGKILL)
    started = time.monotonic()
    async with slow.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        calls = [status_of(stub, request(f"right after the death {i}", seed=i)) for i in range(2)]
        results = await asyncio.gather(*calls)
    assert [code for code, _, _ in results] == [grpc.StatusCode.OK] * 2, results
    assert time.monotonic() - started < 60
    after = await asyncio.to_thread(slow.wait_stats, idle, 10)
    assert after.worker_pids[0] not in (0, stats.worker_pids[0]) and after.worker_failures > stats.worker_failures
    assert balanced(after) and after.status_counts.get("UNAVAILABLE", 0) == 0, after


async def test_health_is_not_serving_while_every_worker_restarts(slow: EdgeServerProcess) -> None:
    """SIGKILL the only model actor: grpc.health.v1 answers NOT_SERVING (for the server and the service) while Ray
    restarts it, so a load balancer sends new devices elsewhere, and SERVING once it is back. It said SERVING
    throughout, while no request could be served."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    seen: list[tuple[int, int]] = []
    async with slow.aio_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> tuple[int, int]:
            replies = [await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                       for name in ("", "sage_edge.v1.EdgeSampler")]
            return replies[0].status, replies[1].status

        assert await status() == (SERVING, SERVING)
        os.kill(before.worker_pids[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while time.monotonic() < end and (not seen or seen[-1] != (SERVING, SERVING) or len(set(seen)) < 2):
            seen.append(await status())
            await asyncio.sleep(0.02)
    assert (NOT_SERVING, NOT_SERVING) in seen and seen[-1] == (SERVING, SERVING), sorted(set(seen))
    after = await asyncio.to_thread(slow.wait_stats, idle, 30)
    assert after.worker_pids[0] not in (0, before.worker_pids[0]), after
    assert "no_worker_available" in "".join(slow.log_lines) and "worker_available" in "".join(slow.log_lines)


async def test_a_hung_worker_is_killed_and_restarted(slow: EdgeServerProcess) -> None:
    """SIGSTOP the model actor (a hung worker: alive, never answering) and send a request: it ends at its deadline,
    its window is cancelled, and --hung-window-s later the actor is killed and restarted, so the next request is
    served. Before, the hung window kept the worker's slot for good: no request was served again until SIGCONT."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    pid = before.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        async with slow.aio_channel() as channel:
            stub = edge_pb2_grpc.EdgeSamplerStub(channel)
            code, _, _ = await status_of(stub, request("into a hung worker"), timeout=2)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            stats = await asyncio.to_thread(slow.wait_stats, lambda s: s.worker_pids[0] not in (0, pid), 60)
            code, details, received = await status_of(stub, request("after the restart"))
            assert code == grpc.StatusCode.OK and received, (code, details)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    after = await asyncio.to_thread(slow.wait_stats, idle, 10)
    assert after.worker_failures > before.worker_failures and stats.worker_pids[0] == after.worker_pids[0], after
    assert balanced(after), after


async def test_a_worker_that_stops_answering_mid_window_is_restarted_before_the_deadline(
    slow: EdgeServerProcess,
) -> None:
    """SIGSTOP the model actor while it runs a request's window (the request waits with a 60 s deadline): the engine
    asks the worker for its progress, gets no answer within --hung-window-s (3 s), kills it, and the request ends
    UNAVAILABLE saying so, long before its deadline; Ray restarts the actor and the next request is served. Before,
    the request waited for its deadline, and the worker was found hung only after the window's cancel."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    pid = before.worker_pids[0]
    async with slow.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        call = stub.RequestImage(request("stopped mid-window", steps=900, share=1.0), timeout=TIMEOUT)
        ending = asyncio.create_task(status_of_call(call))
        try:
            await asyncio.to_thread(slow.wait_stats, lambda s: s.running_windows == 1, 30)
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            code, details = await asyncio.wait_for(ending, TIMEOUT)
            waited = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert code == grpc.StatusCode.UNAVAILABLE and "did not answer for 3 s (hung_window_s)" in details, details
        assert waited < TIMEOUT / 2, waited  # found hung, not timed out
        stats = await asyncio.to_thread(slow.wait_stats, lambda s: s.worker_pids[0] not in (0, pid), 60)
        code, details, received = await status_of(stub, request("after the restart"))
        assert code == grpc.StatusCode.OK and received, (code, details)
    after = await asyncio.to_thread(slow.wait_stats, idle, 10)
    assert after.worker_failures > before.worker_failures and stats.worker_pids[0] == after.worker_pids[0], after
    assert balanced(after) and "worker_hung" in "".join(slow.log_lines), after


async def test_a_window_that_starts_no_unet_call_for_stall_s_is_ended_and_its_worker_restarted() -> None:
    """--stall-s: a worker that answers but starts no UNet call for that long (here each call waits 20 s first,
    as a stuck GPU would hold it) is killed and restarted, and the window's request ends UNAVAILABLE at once. The
    default (0) leaves such a window to its requests' deadlines."""
    server = start_edge_server("--worker-step-delay-ms", "20000", "--stall-s", "1", "--hung-window-s", "30")
    try:
        pid = server.stats().worker_pids[0]
        async with server.aio_channel() as channel:
            started = time.monotonic()
            code, details, _ = await status_of(edge_pb2_grpc.EdgeSamplerStub(channel), request("a stuck GPU"))
            waited = time.monotonic() - started
        assert code == grpc.StatusCode.UNAVAILABLE and "started no UNet call for 1 s (stall_s 1)" in details, details
        assert waited < 15, waited  # one UNet call would have taken 20 s
        server.wait_stats(lambda s: s.worker_pids[0] not in (0, pid), 60)
    finally:
        server.terminate()


# ---- one request's settings fail on the worker --------------------------------------------------------------------
async def test_steps_the_scheduler_refuses_end_at_admission(slow: EdgeServerProcess) -> None:
    """A server whose max_steps lets a device ask for 1000 DDIM steps, which the model's 1000-timestep schedule
    cannot run: that request ends INVALID_ARGUMENT with the scheduler's reason at once, while the worker is still
    busy (it used to wait for a window and fail there); another device's request is served. Before the worker
    checked buckets, its ValueError failed the whole window, every device in it INTERNAL, with a message quoting
    Ray's traceback (the worker's address, pid and source paths); tests/test_edge_server.py checks the worker's
    own refusal of such a bucket."""
    await asyncio.to_thread(slow.wait_stats, idle)
    before = slow.stats()
    async with slow.aio_channel() as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        blocker, blocking, waiting = await hold_the_worker(slow, stub)
        fine = asyncio.create_task(status_of(stub, request("a fine request")))
        code, details, _ = await status_of(stub, request("too many steps", steps=1000), 20)
        assert (await asyncio.to_thread(slow.stats)).running_windows == 1  # the worker still runs the blocker's window
        blocker.cancel()
        await blocking
        (waiting_code, _, _), (fine_code, fine_details, received) = await asyncio.wait_for(
            asyncio.gather(waiting, fine), TIMEOUT
        )
    assert waiting_code == grpc.StatusCode.OK
    assert fine_code == grpc.StatusCode.OK and received, (fine_code, fine_details)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1000 steps" in details, (code, details)
    assert "pid=" not in details and "\x1b" not in details and ".py" not in details, details
    stats = await asyncio.to_thread(slow.wait_stats, idle, 10)
    assert balanced(stats) and stats.rejected == before.rejected + 1, stats


# ---- the server is stopped ----------------------------------------------------------------------------------------
async def test_sigterm_twice_drains_queued_and_running_and_cuts_a_stalled_stream() -> None:
    """SIGTERM, and SIGTERM again during the drain, with a stream stalled by its device, a window running and a
    request queued behind it: the second signal changes nothing; new requests get UNAVAILABLE; the running and the
    queued requests finish within --grace-s; the stalled stream is cut at the end of it, and is counted and logged
    UNAVAILABLE, as its device sees it (it was CANCELLED, as if the device had left); the last log line finds the
    engine empty; exit code 0 within the grace period and a few seconds."""
    grace = 4.0
    server = start_edge_server(
        "--worker-step-delay-ms", "20", "--worker-pipeline", "1", "--grace-s", str(grace), "--chunk-size", "1024"
    )
    try:
        async with grpc.aio.insecure_channel(server.address, options=NO_BDP) as stalled_channel, \
                server.aio_channel() as channel:  # fmt: skip
            stalled = edge_pb2_grpc.EdgeSamplerStub(stalled_channel).RequestImage(
                request("a stalled stream", height=STALL_SIDE, width=STALL_SIDE), timeout=TIMEOUT
            )
            assert (await stalled.read()).WhichOneof("kind") == "accepted"
            stub = edge_pb2_grpc.EdgeSamplerStub(channel)
            running = asyncio.create_task(status_of(stub, request("running", steps=40, share=1.0)))
            await asyncio.to_thread(server.wait_stats, lambda s: s.running_windows == 1, 20)
            queued = asyncio.create_task(status_of(stub, request("queued")))
            await asyncio.to_thread(server.wait_stats, lambda s: s.queued_requests + s.waiting_requests == 1, 20)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait_stats, lambda s: not s.serving, 10)
            server.process.send_signal(signal.SIGTERM)
            code, details, _ = await status_of(stub, request("too late"), 10)
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
            results = await asyncio.wait_for(asyncio.gather(running, queued), TIMEOUT)
            assert [code for code, _, _ in results] == [grpc.StatusCode.OK] * 2, results
            assert await asyncio.to_thread(server.process.wait, 60) == 0  # the stalled device reads nothing
            assert time.monotonic() - signalled < grace + 20
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await asyncio.wait_for(stalled.read(), 30) is not grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        done = [line for line in server.log_lines if "request_done" in line]
        assert len(done) == 3 and sum("status=OK" in line for line in done) == 2, done
        assert any("status=UNAVAILABLE" in line and "group_id" in line for line in done), done
        stopped = [line for line in server.log_lines if " stopped " in line]
        assert len(stopped) == 1 and "active_requests=0 " in stopped[0] and "'UNAVAILABLE': 2" in stopped[0], stopped
    finally:
        server.terminate(timeout=30)

"""Prometheus metrics of a real server (TLS-only port, `--metrics-port 0` on 127.0.0.1): scrape /metrics over
HTTP, parse it with prometheus_client's parser, check that each counter moved by exactly what the requests did."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import defaultdict

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import EdgeServerProcess, start_edge_server
from tls_certs import PKI, make_pki

from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

METRICS_LINE = re.compile(r"sage_edge\.service metrics host=(\S+) port=(\d+)")
STEPS, SHARE = 4, 0.5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: PKI) -> EdgeServerProcess:
    """TLS without client certificates; a wide batching window so concurrent requests share a window."""
    proc = start_edge_server(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--metrics-port", "0", "--max-wait-ms", "400"),
    )
    yield proc
    proc.terminate()


def metrics_url(server: EdgeServerProcess) -> str:
    """http://127.0.0.1:PORT/metrics from the server's `metrics` log line."""
    for line in server.log_lines:
        if match := METRICS_LINE.search(line):
            assert match.group(1) == "127.0.0.1"
            return f"http://127.0.0.1:{match.group(2)}/metrics"
    raise AssertionError(f"no metrics line in the server log:\n{server.log_lines[-20:]}")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - a local test URL
        assert reply.status == 200
        text = reply.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_requests_groups_evaluations_bytes_and_errors(server: EdgeServerProcess, pki: PKI) -> None:
    url = metrics_url(server)
    before = await asyncio.to_thread(scrape, url)
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    async with grpc.aio.secure_channel(server.address, creds) as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)

        async def one(prompt: str, seed: int) -> tuple[edge_pb2.Accepted, edge_pb2.Done]:
            req = edge_pb2.ImageRequest(prompt=prompt, steps=STEPS, share=SHARE, seed=seed)
            msgs = [m async for m in stub.RequestImage(req, timeout=60)]
            return msgs[0].accepted, msgs[-1].done

        results = await asyncio.gather(*(one("a red circle on the left", s) for s in range(3)), one("zebra", 9))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            async for _ in stub.RequestImage(edge_pb2.ImageRequest(prompt=" "), timeout=10):
                pass
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await asyncio.to_thread(scrape, url)

    groups = {a.group_id: a for a, _ in results}
    k, cfg = STEPS * SHARE, 2  # branch step 2 of 4; guidance 7.5 -> two UNet samples per step
    independent = sum(g.group_size * STEPS * cfg for g in groups.values())
    used = sum((k + g.group_size * (STEPS - k)) * cfg for g in groups.values())
    assert delta(before, after, "sage_edge_requests_total", code="OK") == 4
    assert delta(before, after, "sage_edge_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "sage_edge_errors_total", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "sage_edge_errors_total", code="OK") == 0
    assert delta(before, after, "sage_edge_bytes_sent_total") == sum(d.total_bytes for _, d in results) > 0
    assert delta(before, after, "sage_edge_queue_wait_seconds_count") == 4
    assert delta(before, after, "sage_edge_group_size_count") == len(groups)
    assert delta(before, after, "sage_edge_group_size_sum") == 4
    windows = {a.group_id.rsplit("-b", 1)[0]: d.shared_phase_ms for a, d in results}  # w<n>-<hex>-b<bucket>-g<group>
    assert delta(before, after, "sage_edge_window_requests_count") == len(windows) >= 1
    assert delta(before, after, "sage_edge_window_requests_sum") == 4  # the refused request reached no window
    assert delta(before, after, "sage_edge_shared_phase_seconds_count") == len(windows)
    assert delta(before, after, "sage_edge_shared_phase_seconds_sum") == pytest.approx(sum(windows.values()) / 1e3)
    assert delta(before, after, "sage_edge_unet_evaluations_independent_total") == independent
    assert delta(before, after, "sage_edge_unet_evaluations_total") == used
    assert delta(before, after, "sage_edge_unet_evaluations_saved_total") == independent - used
    assert after[("sage_edge_active_requests", ())] == 0
    # the three identical prompts of one window share a group: sharing saved evaluations
    assert max(g.group_size for g in groups.values()) >= 2
    assert independent - used > 0


async def test_plaintext_client_against_tls_server_fails(server: EdgeServerProcess) -> None:
    """The port is TLS only: a plaintext client cannot call anything, health included."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = edge_pb2_grpc.EdgeSamplerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

"""Security of the gRPC port against a real server: mutual TLS, bearer tokens on every method (streaming
included), the per-client stream cap, the server-side deadline cap, the health probe; the model SHA-256 pin.

One module server: tiny model, mutual TLS with a test CA made at run time (tests/tls_certs.py), two tokens,
at most 1 open stream per client, a 3 s deadline cap, 30 ms per UNet call.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from server_fixtures import REPO_ROOT, EdgeServerProcess, server_env, start_edge_server
from tls_certs import PKI, make_pki

from device_client.channel import read_token
from device_client.client import DeviceClient
from device_client.config import DeviceConfig
from edge_server.config import ConfigError, ServerConfig
from edge_server.security import TokenTable, bearer_token
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

TOKENS = {"device-a": secrets.token_hex(16), "device-b": secrets.token_hex(16)}
STEP_DELAY_MS = 30
DEADLINE_CAP_S = 3.0
FAST = {"steps": 4, "share": 0.5}


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> EdgeServerProcess:
    """The module's server: mutual TLS, token auth, stream cap 1, deadline cap 3 s, slow UNet calls."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text("# client_id:token\n" + "".join(f"{c}:{t}\n" for c, t in TOKENS.items()))
    tokens.chmod(0o600)
    proc = start_edge_server(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)),
        *("--auth-tokens-file", str(tokens), "--max-streams-per-client", "1"),
        *("--max-deadline-s", str(DEADLINE_CAP_S), "--worker-step-delay-ms", str(STEP_DELAY_MS)),
    )
    yield proc
    proc.terminate()


def channel(
    server: EdgeServerProcess, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to the server: plaintext when `ca` is None, else TLS (mutual with cert + key)."""
    if ca is None:
        return grpc.aio.insecure_channel(server.address)
    read = lambda p: p.read_bytes() if p else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    return grpc.aio.secure_channel(server.address, creds)


def good_channel(server: EdgeServerProcess, pki: PKI) -> grpc.aio.Channel:
    """Mutual TLS with the right CA and client certificate."""
    return channel(server, pki.ca, pki.client_cert, pki.client_key)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def stream_status(stub, req, metadata=(), timeout: float = 30.0) -> tuple[grpc.StatusCode, str, list]:
    """Final status, details and the messages of one RequestImage call."""
    messages = []
    try:
        async for msg in stub.RequestImage(req, timeout=timeout, metadata=metadata):
            messages.append(msg)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", messages
    return grpc.StatusCode.OK, "", messages


async def unary_status(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---- transport ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "wrong CA certificate", "wrong server CA"])
async def test_bad_transport_is_refused(server: EdgeServerProcess, pki: PKI, client: str) -> None:
    """Only a client with a certificate from the server's client CA, that trusts the server's CA, gets through."""
    ca, cert, key = {
        "plaintext": (None, None, None),
        "no client certificate": (pki.ca, None, None),
        "wrong CA certificate": (pki.ca, pki.wrong_client_cert, pki.wrong_client_key),
        "wrong server CA": (pki.wrong_ca, pki.client_cert, pki.client_key),
    }[client]
    async with channel(server, ca, cert, key) as ch:
        stub = edge_pb2_grpc.EdgeSamplerStub(ch)
        code = await unary_status(
            stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=5, metadata=auth(TOKENS["device-a"]))
        )
    assert code == grpc.StatusCode.UNAVAILABLE, (client, code)


# ---- tokens -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "metadata",
    [(), auth("x" * 32), auth(TOKENS["device-a"] + "0"), (("authorization", f"Basic {TOKENS['device-a']}"),)],
    ids=["missing", "unknown", "near-miss", "not-bearer"],
)
async def test_bad_token_is_unauthenticated_on_every_method(server: EdgeServerProcess, pki: PKI, metadata) -> None:
    """UNAUTHENTICATED on the streaming RequestImage, on GetServerInfo and on GetStats; no work was queued."""
    async with good_channel(server, pki) as ch:
        stub = edge_pb2_grpc.EdgeSamplerStub(ch)
        code, details, messages = await stream_status(stub, edge_pb2.ImageRequest(prompt="a cat", **FAST), metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and not messages, (code, details)
        assert "token" in details and TOKENS["device-a"] not in details
        for call in (
            stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=10, metadata=metadata),
            stub.GetStats(edge_pb2.StatsRequest(), timeout=10, metadata=metadata),
        ):
            assert await unary_status(call) == grpc.StatusCode.UNAUTHENTICATED
        stats = await stub.GetStats(edge_pb2.StatsRequest(), timeout=10, metadata=auth(TOKENS["device-b"]))
    assert stats.admitted == stats.completed + stats.failed  # nothing admitted is left behind
    assert "UNAUTHENTICATED" not in stats.status_counts  # refused before the engine saw it
    assert not any(TOKENS["device-a"] in line or TOKENS["device-b"] in line for line in server.log_lines)


async def test_good_certificate_and_token_stream_a_latent(server: EdgeServerProcess, pki: PKI, tmp_path: Path) -> None:
    """The device client over mutual TLS with a token receives, verifies and decodes its group's latent. Its token
    file is a line copied from the server's (`client_id:token`)."""
    token_file = tmp_path / "token.txt"
    token_file.write_text(f"device-a:{TOKENS['device-a']}\n")
    config = DeviceConfig(
        server=server.address,
        model="tiny",
        adapter="none",
        steps=4,
        share=0.5,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        token=read_token(token_file),
        timeout_s=60,
    )
    assert TOKENS["device-a"] not in repr(config)
    with DeviceClient(config) as client:
        received = await asyncio.to_thread(client.request_latent, "a red circle on the left", 7)
    assert received.accepted.total_steps == 4 and received.accepted.branch_step == 2
    assert received.payload_bytes == received.done.total_bytes > 0
    assert tuple(received.point.latents.shape) == tuple(received.accepted.latent_shape)


async def test_health_is_open_and_the_container_probe_works(server: EdgeServerProcess, pki: PKI) -> None:
    """`python -m edge_server.healthcheck` (the edge image's HEALTHCHECK) says SERVING without a token, over mTLS;
    it fails (exit 1) without a client certificate."""
    base = [sys.executable, "-m", "edge_server.healthcheck", "--address", server.address, "--tls-ca", str(pki.ca)]
    good = base + ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    run = lambda cmd: subprocess.run(cmd, cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=60)  # noqa: E731
    ok, bad = await asyncio.gather(asyncio.to_thread(run, good), asyncio.to_thread(run, base))
    assert ok.returncode == 0 and "healthy: SERVING" in ok.stdout, ok
    assert bad.returncode == 1 and "unhealthy" in bad.stderr, bad


# ---- caps ---------------------------------------------------------------------------------------------------
async def test_stream_cap_is_per_authenticated_client(server: EdgeServerProcess, pki: PKI) -> None:
    """With one stream open, the same token gets RESOURCE_EXHAUSTED at once (whatever client_id the request
    claims); another token is served."""
    async with good_channel(server, pki) as ch:
        stub = edge_pb2_grpc.EdgeSamplerStub(ch)
        a, b = auth(TOKENS["device-a"]), auth(TOKENS["device-b"])
        long_req = edge_pb2.ImageRequest(prompt="a long one", steps=40, share=1.0, client_id="x")
        first = asyncio.create_task(stream_status(stub, long_req, a))
        for _ in range(200):
            stats = await stub.GetStats(edge_pb2.StatsRequest(), timeout=10, metadata=b)
            if stats.active_requests:
                break
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        spoofed = edge_pb2.ImageRequest(prompt="me too", client_id="someone-else", **FAST)
        code, details, _ = await stream_status(stub, spoofed, a)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "device-a" in details, (code, details)
        assert time.monotonic() - t0 < 2.0
        other, _, _ = await stream_status(stub, edge_pb2.ImageRequest(prompt="b's cat", **FAST), b)
        assert other == grpc.StatusCode.OK
        code, details, messages = await first
        assert code == grpc.StatusCode.OK and messages[-1].WhichOneof("kind") == "done", (code, details)
        again, _, _ = await stream_status(stub, edge_pb2.ImageRequest(prompt="a again", **FAST), a)
        assert again == grpc.StatusCode.OK  # the cap counts open streams only


async def test_deadline_cap_applies_to_a_longer_client_deadline(server: EdgeServerProcess, pki: PKI) -> None:
    """A request whose client deadline is 60 s but needs about 6 s of shared phase ends DEADLINE_EXCEEDED at the
    server's 3 s cap."""
    async with good_channel(server, pki) as ch:
        stub = edge_pb2_grpc.EdgeSamplerStub(ch)
        t0 = time.monotonic()
        req = edge_pb2.ImageRequest(prompt="too slow", steps=200, share=1.0)
        code, details, _ = await stream_status(stub, req, auth(TOKENS["device-b"]), timeout=60)
        elapsed = time.monotonic() - t0
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert DEADLINE_CAP_S - 0.5 < elapsed < DEADLINE_CAP_S + 5, elapsed


# ---- no server ----------------------------------------------------------------------------------------------
def test_token_table_rules(tmp_path: Path) -> None:
    """Comments, bare tokens (an id from their hash), `id:token`; short or repeated tokens are refused."""
    good = tmp_path / "t.txt"
    good.write_text(f"# comment\n\n{'a' * 20}\nphone-7:{'b' * 20}\n")
    table = TokenTable.from_file(good)
    assert table.client_of("b" * 20) == "phone-7" and table.client_of("a" * 20).startswith("token-")
    assert table.client_of("b" * 19) is None and table.client_of("") is None
    assert bearer_token((("Authorization", "bearer  " + "b" * 20),)) == "b" * 20
    assert bearer_token((("authorization", "Basic abc"),)) is None
    for text, needle in ((f"x:{'c' * 8}\n", "shorter"), (f"{'d' * 20}\ny:{'d' * 20}\n", "twice"), ("#\n", "no token")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle) as err:
            TokenTable.from_file(bad)
        assert "c" * 8 not in str(err.value) and "d" * 20 not in str(err.value)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("abc123abc123abc123\n", "abc123abc123abc123"),
        ("# my device\n\n  kiosk-12:abc123abc123abc123  \nsecond:line\n", "abc123abc123abc123"),
        ("kiosk-12: abc123abc123abc123\n", "abc123abc123abc123"),
    ],
)
def test_device_token_file_takes_the_servers_line_format(tmp_path: Path, text: str, token: str) -> None:
    """A device reads its token file as the server reads its own: comments skipped, `client_id:token` split."""
    path = tmp_path / "token.txt"
    path.write_text(text)
    assert read_token(path) == token


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "kiosk-12:\n"])
def test_device_token_file_without_a_token_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "token.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds no token"):
        read_token(path)
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token(tmp_path / "none.txt")


def test_security_settings_are_validated(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="together"):
        ServerConfig(tls_cert=str(pem))
    with pytest.raises(ConfigError, match="needs tls_cert"):
        ServerConfig(tls_client_ca=str(pem))
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig(auth_tokens_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        ServerConfig(model="/m", model_sha256="abc")
    with pytest.raises(ConfigError, match="tiny"):
        ServerConfig(model="tiny", model_sha256="0" * 64)
    with pytest.raises(ConfigError, match="sd15-random"):  # built in memory: a pin would be ignored
        ServerConfig(model="sd15-random", model_sha256="0" * 64)
    with pytest.raises(ValueError, match="plaintext"):
        DeviceConfig(server="10.0.0.5:50051", token="t" * 20)
    DeviceConfig(server="10.0.0.5:50051", token="t" * 20, tls=True)


def test_health_probe_refuses_half_a_client_key_pair(tmp_path: Path) -> None:
    """A client certificate without its key (or a key alone) is a one-line 'unhealthy' (exit 1), not a crash of
    grpc's C core (exit 134) nor a silently plaintext probe."""
    pem = tmp_path / "c.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    base = [sys.executable, "-m", "edge_server.healthcheck", "--address", "127.0.0.1:9", "--timeout", "1"]
    for half in (["--tls-cert", str(pem)], ["--tls-key", str(pem)]):
        out = subprocess.run(base + half, cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "unhealthy: --tls-cert and --tls-key go together" in out.stderr, out


def test_model_sha256_pin(tiny_pipe, tmp_path: Path) -> None:
    """The pin is the folder's full SHA-256 (the fingerprint is its first 16 digits); a mismatch refuses to load
    with a message that says so; the `model-sha256` command prints the pin."""
    from edge_server.worker import load_model
    from sage_core.models import ModelError, folder_fingerprint, folder_sha256, verify_pin

    folder = tmp_path / "model"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    pin = folder_sha256(folder)
    assert len(pin) == 64 and pin.startswith(folder_fingerprint(folder))
    verify_pin(folder, pin)
    pipe = load_model(ServerConfig(model=str(folder), model_sha256=pin, dtype="float32"))
    assert pipe.unet is not None
    wrong = ("0" if pin[0] != "0" else "1") + pin[1:]
    with pytest.raises(ModelError, match="does not match its SHA-256 pin"):
        load_model(ServerConfig(model=str(folder), model_sha256=wrong, dtype="float32"))
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + " ")
    with pytest.raises(ModelError, match=f"expected {pin}"):
        verify_pin(folder, pin)
    out = subprocess.run(
        [sys.executable, "-m", "edge_server", "model-sha256", str(folder)],
        cwd=REPO_ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == folder_sha256(folder), out.stderr

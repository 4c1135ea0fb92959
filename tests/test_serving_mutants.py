"""Serving behaviour a mutation audit found unchecked: the device's checks of what a server announces and sends, its
request fields, metadata and channel settings; the edge server's admission limits, counters and error lines.
All fast: pure functions, an Engine without workers, or the in-process fake edge server of test_device_client."""

# ruff: noqa: F811  (the fixtures imported from test_device_client are test arguments here)
from __future__ import annotations

import hashlib
import json
import threading
from concurrent import futures

import grpc
import pytest
import torch
from test_device_client import STEPS, FakeEdge, _accepted, client_for, device_model, fake_server, piece  # noqa: F401

from device_client.channel import is_loopback, make_channel, retry_options
from device_client.client import (
    DeviceClient,
    DeviceError,
    DeviceModel,
    branch_config,
    check_accepted,
    collect_stream,
    decode_frames,
    rpc_error,
    solver_counter,
    verify_payload,
)
from device_client.config import DeviceConfig
from edge_server.config import ConfigError, ServerConfig, build_config
from edge_server.engine import (
    Engine,
    EngineError,
    ImageSpec,
    clip,
    error_reason,
    negotiate_codec,
    resolve,
    worker_error_line,
)
from edge_server.worker import ModelInfo
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc
from sage_core.codec import CodecSpec, LatentCodec
from sage_core.names import LOSSLESS_MODES, MAX_STEPS
from sage_core.seeds import MAX_SEED

INFO = ModelInfo("abc", "{}", 32, 32, 1, "cpu")


# ---- device: what a server announces -------------------------------------------------------------------------
def accepted(**fields) -> edge_pb2.Accepted:
    """test_device_client's Accepted (fp16, 4 steps, branch at 2, latent [1, 4, 2, 2]) with `fields` replaced."""
    acc = _accepted("f").accepted
    for name, value in fields.items():
        if name == "latent_shape":
            del acc.latent_shape[:]
            acc.latent_shape.extend(value)
        else:
            setattr(acc, name, value)
    return acc


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"codec": "int4"}, "FAILED_PRECONDITION", "server chose codec 'int4'"),
        ({"total_steps": 0, "branch_step": 0}, "INTERNAL", "bad schedule"),
        ({"branch_step": 5}, "INTERNAL", "bad schedule"),
        ({"scheduler": "plms"}, "FAILED_PRECONDITION", "scheduler 'plms'"),
        ({"latent_shape": [2, 4, 2, 2]}, "INTERNAL", "bad latent shape"),
        ({"latent_shape": [4, 2, 2]}, "INTERNAL", "bad latent shape"),
    ],
)
def test_check_accepted_refuses_what_the_device_cannot_continue_from(fields, code, needle):
    """An Accepted with a codec the device did not accept (none asked: lossless only), no steps, a branch past the
    end, an unknown scheduler or a latent that is not [1, C, h, w] is refused with its status."""
    with pytest.raises(DeviceError) as err:
        check_accepted(accepted(**fields), "f", DeviceConfig())
    assert err.value.code == code and needle in err.value.message, err.value


def test_check_accepted_takes_a_fully_shared_schedule_and_an_accepted_lossy_codec():
    """A branch at the last step (share 1: the device only decodes) and a lossy codec the device listed are fine."""
    check_accepted(accepted(branch_step=4), "f", DeviceConfig())
    check_accepted(accepted(codec="int4"), "f", DeviceConfig(accepted_codecs=("int4",)))


def test_a_payload_of_exactly_the_cap_is_taken_and_a_missing_chunk_is_data_loss():
    """max_payload_bytes is the largest payload allowed (not one byte less); Done counting more chunks than
    arrived is DATA_LOSS."""
    sha = hashlib.sha256(b"abc").hexdigest()
    done = edge_pb2.ImageResponse(done=edge_pb2.Done(chunks=1, total_bytes=3, sha256=sha))
    _, _, payload, _, _ = collect_stream(iter([_accepted("f"), piece(0, b"abc"), done]), "f",
                                         DeviceConfig(max_payload_bytes=3))  # fmt: skip
    assert payload == b"abc"
    short = edge_pb2.ImageResponse(done=edge_pb2.Done(chunks=2, total_bytes=3))
    with pytest.raises(DeviceError) as err:
        collect_stream(iter([_accepted("f"), piece(0, b"abc"), short]), "f", DeviceConfig())
    assert err.value.code == "DATA_LOSS" and "received 1 chunks, server sent 2" in err.value.message


def test_verify_payload_takes_an_uppercase_digest_and_a_frame_table_naming_the_solver_state_only():
    """The sha256 is compared as hex whatever its case; frame names that list only the solver state get the
    latent frame's name put first."""
    payload = b"0123456789"
    done = edge_pb2.Done(chunks=1, total_bytes=10, sha256=hashlib.sha256(payload).hexdigest().upper(),
                         frame_sizes=[6, 4], frame_names=["lower_order_nums"])  # fmt: skip
    assert verify_payload(payload, done) == [("latent", b"012345"), ("lower_order_nums", b"6789")]


def test_a_solver_counter_outside_its_rounding_range_is_refused():
    """A counter frame rounds to [0, total_steps] only from (-0.5, total_steps + 0.5): -0.6 or 4.6 of 4 is bad."""
    assert int(solver_counter("lower_order_nums", torch.tensor([4.4]), 4)) == 4
    assert int(solver_counter("lower_order_nums", torch.tensor([-0.4]), 4)) == 0
    for bad in (-0.6, 4.6):
        with pytest.raises(DeviceError, match="bad solver state"):
            solver_counter("lower_order_nums", torch.tensor([bad]), 4)


def test_a_latent_of_another_shape_than_announced_is_refused():
    """decode_frames checks the decoded latent against Accepted.latent_shape (INTERNAL), not only the checksum."""
    codec = LatentCodec(CodecSpec("fp16"))
    frames = [("latent", codec.encode(torch.zeros(1, 4, 2, 3)))]
    with pytest.raises(DeviceError) as err:
        decode_frames(frames, accepted(), "cpu", torch.float32)
    assert err.value.code == "INTERNAL" and "!= announced" in err.value.message
    point = decode_frames([("latent", codec.encode(torch.ones(1, 4, 2, 2)))], accepted(), "cpu", torch.float32)
    assert point.step == 2 and tuple(point.latents.shape) == (1, 4, 2, 2)


def test_branch_config_takes_height_and_width_from_the_latent_shape_in_order():
    """A non-square latent [1, C, h, w] gives height h x scale and width w x scale (not swapped)."""
    config = branch_config(accepted(latent_shape=[1, 4, 6, 4]), 8)
    assert (config.height, config.width, config.steps, config.shared_steps) == (48, 32, 4, 2)
    with pytest.raises(DeviceError, match="cannot run"):
        branch_config(accepted(latent_shape=[1, 4, 6, 4], total_steps=4, branch_step=2, guidance=-1.0), 8)


def test_decode_frames_casts_the_solver_state_to_the_device_dtype():
    """Float solver-state frames come to the device's dtype (a float16 device continues in float16); counters stay
    integer counts."""
    codec = LatentCodec(CodecSpec("fp32"))
    frames = [("latent", codec.encode(torch.ones(1, 4, 2, 2))), ("model_output", codec.encode(torch.ones(1, 4, 2, 2))),
              ("lower_order_nums", codec.encode(torch.tensor([2.0])))]  # fmt: skip
    point = decode_frames(frames, accepted(codec="fp32"), "cpu", torch.float16)
    assert point.latents.dtype == point.solver_state["model_output"].dtype == torch.float16
    assert int(point.solver_state["lower_order_nums"]) == 2


# ---- device: requests, metadata, errors -------------------------------------------------------------------------
class _RpcError(grpc.RpcError):
    """A failed call as grpc raises it: a status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_rpc_error_keeps_the_status_and_makes_one_line():
    """A failed call's status name is the DeviceError's code, its details one line; UNAVAILABLE says the edge
    server is unavailable."""
    error = rpc_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "steps must be\n  in [1, 200]"))
    assert (error.code, error.message) == ("INVALID_ARGUMENT", "steps must be in [1, 200]")
    error = rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert (error.code, error.message) == ("UNAVAILABLE", "edge server unavailable: connection refused")


def test_build_request_sends_the_devices_fields():
    """The request carries seed 0 (a seed, not "unset"), share, height and width in place, client_id and
    guidance; unset fields stay unset (the server's defaults)."""
    model = DeviceModel(pipe=None, fingerprint="f" * 16, adapter="none")
    config = DeviceConfig(server="127.0.0.1:1", share=0.25, height=64, width=48, client_id="kiosk-3", guidance=3.0,
                          steps=7, scheduler="euler", accepted_codecs=("fp16",))  # fmt: skip
    req = DeviceClient(config, model).build_request("a cat", seed=0, negative_prompt="blurry")
    assert req.HasField("seed") and req.seed == 0 and req.HasField("share") and req.share == 0.25
    assert (req.height, req.width, req.client_id, req.guidance, req.steps) == (64, 48, "kiosk-3", 3.0, 7)
    assert (req.scheduler, list(req.accepted_codecs), req.model_fingerprint) == ("euler", ["fp16"], "f" * 16)
    assert req.negative_prompt == "blurry"
    bare = DeviceClient(DeviceConfig(server="127.0.0.1:1"), model).build_request("a cat")
    assert not (bare.HasField("seed") or bare.HasField("share") or bare.HasField("guidance"))


def test_edge_metadata_records_what_the_server_announced(fake_server, device_model):
    """An edge image's metadata has what the server's Accepted announced: total steps, branch step, codec,
    similarity, scheduler, group and request ids."""
    with client_for(fake_server(""), device_model, accepted_codecs=("fp16", "bf16"), steps=STEPS,
                    scheduler="euler") as c:  # fmt: skip
        received = c.request_latent("a red circle", seed=3)
        acc = received.accepted
        acc.min_similarity, acc.codec, acc.group_id, acc.group_size = 0.8125, "bf16", "w7-b0-g1", 3  # as a group's
        meta = c.finish("a red circle", received).metadata
    assert (meta["total_steps"], meta["branch_step"], meta["codec"], meta["scheduler"]) == (STEPS, 2, "bf16", "euler")
    assert (meta["min_similarity"], meta["group_id"], meta["group_size"], meta["request_id"]) == (
        0.8125, "w7-b0-g1", 3, "r1")


def test_fallback_local_is_only_for_an_unreachable_server(fake_server):
    """With fallback_local a server that answers with a refusal (here: another model, FAILED_PRECONDITION) is
    that error, not a local image."""
    from sage_core.models import tiny_pipeline

    other = DeviceModel.wrap(tiny_pipeline(seed=1), DeviceConfig(adapter="none"))
    with client_for(fake_server(""), other, steps=STEPS, fallback_local=True) as client:
        with pytest.raises(DeviceError) as err:
            client.generate("a red circle", seed=1)
    assert err.value.code == "FAILED_PRECONDITION"


def test_a_closed_client_probes_the_server_again(fake_server, device_model):
    """close() forgets that the server was reached: the next request probes it again (GetServerInfo)."""
    address = fake_server("")
    edge = fake_server.edges[""]
    with client_for(address, device_model, steps=STEPS) as client:
        client.connect()
        before = edge.info_calls
        client.connect()
        assert edge.info_calls == before
        client.close()
        client.connect()
        assert edge.info_calls == before + 1


def test_a_server_lost_mid_session_is_probed_again_before_the_next_request(tiny_pipe, device_model):
    """After a request ends UNAVAILABLE the client probes the server again (waiting up to connect_timeout_s) on the
    next request instead of taking it for reachable: the error then says it is unreachable."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    edge_pb2_grpc.add_EdgeSamplerServicer_to_server(FakeEdge(tiny_pipe), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    with client_for(address, device_model, steps=STEPS, connect_timeout_s=0.5, retries=0) as client:
        client.connect()
        server.stop(grace=None).wait()
        with pytest.raises(DeviceError) as first:
            client.request_latent("a red circle", seed=1)
        assert first.value.code == "UNAVAILABLE"
        with pytest.raises(DeviceError) as second:
            client.request_latent("a red circle", seed=1)
    assert second.value.code == "UNAVAILABLE" and "unreachable within 0.5 s" in second.value.message, second.value


# ---- device: channel and configuration --------------------------------------------------------------------------
class _Busy(edge_pb2_grpc.EdgeSamplerServicer):
    """A server whose queue is always full: counts RequestImage calls. GetServerInfo answers (it is reachable), or
    ends with `probe` when that is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.probe: grpc.StatusCode | None = None

    def GetServerInfo(self, request, context):  # noqa: N802 (gRPC's name)
        if self.probe is not None:
            context.abort(self.probe, "not for you")
        return edge_pb2.ServerInfo()

    def RequestImage(self, request, context):  # noqa: N802 (gRPC's name)
        self.calls += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (1 requests); retry later")


@pytest.fixture
def busy_server():
    servicer = _Busy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    edge_pb2_grpc.add_EdgeSamplerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield address, servicer
    server.stop(grace=None)


def test_retries_means_that_many_more_tries_on_a_full_queue(busy_server):
    """retries=N tries RequestImage N + 1 times on RESOURCE_EXHAUSTED, then the refusal is the answer; 0 tries
    once. The service config's first backoff is retry_backoff_s, doubling up to 8 s."""
    address, servicer = busy_server
    model = DeviceModel(pipe=None, fingerprint="f" * 16, adapter="none")
    for retries, calls in ((2, 3), (0, 1)):
        before = servicer.calls
        with DeviceClient(DeviceConfig(server=address, retries=retries, retry_backoff_s=0.01), model) as client:
            with pytest.raises(DeviceError) as err:
                client.request_latent("a cat", seed=1)
        assert err.value.code == "RESOURCE_EXHAUSTED" and servicer.calls - before == calls, (retries, servicer.calls)
    options = dict(retry_options(3, 0.25))
    policy = json.loads(options["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
    assert (policy["maxAttempts"], policy["initialBackoff"], policy["maxBackoff"]) == (4, "0.25s", "8s")
    assert retry_options(0, 0.25) == []


def test_a_probe_answered_with_permission_denied_ends_the_client_at_once(busy_server):
    """PERMISSION_DENIED to the reachability probe is that error at connect(), as UNAUTHENTICATED is, not a
    reachable server."""
    address, servicer = busy_server
    servicer.probe = grpc.StatusCode.PERMISSION_DENIED
    model = DeviceModel(pipe=None, fingerprint="f" * 16, adapter="none")
    with DeviceClient(DeviceConfig(server=address), model) as client, pytest.raises(DeviceError) as err:
        client.connect()
    assert err.value.code == "PERMISSION_DENIED" and "refused GetServerInfo: not for you" in err.value.message
    assert servicer.calls == 0


class _WatchedEmpty(FakeEdge):
    """test_device_client's "empty" fault (empty chunks without end) that notes when its stream ended."""

    def __init__(self, pipe) -> None:
        super().__init__(pipe, "empty")
        self.ended = threading.Event()

    def RequestImage(self, request, context):  # noqa: N802 (gRPC's name)
        try:
            yield from super().RequestImage(request, context)
        finally:
            self.ended.set()


def test_a_protocol_violation_cancels_the_call_on_the_server(tiny_pipe, device_model):
    """When the device refuses a stream (here: an empty chunk) it cancels the call: the server's stream ends at
    once, not when the channel closes."""
    servicer = _WatchedEmpty(tiny_pipe)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    edge_pb2_grpc.add_EdgeSamplerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with client_for(address, device_model, steps=STEPS) as client:
            with pytest.raises(DeviceError, match="chunk 0 is empty") as err:
                client.request_latent("a red circle", seed=1)
            assert servicer.ended.wait(5), "the server still streams after the device refused the stream"
            del err
    finally:
        server.stop(grace=None)


def test_loopback_addresses_may_carry_a_token_in_plaintext_and_others_may_not():
    """127.0.0.1, localhost and [::1] (with a port) are this machine; a token goes to them without TLS, to any
    other address only over TLS."""
    assert all(is_loopback(a) for a in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051"))
    assert not any(is_loopback(a) for a in ("10.0.0.5:50051", "edge.example:443", "localhost.example:1"))
    for address in ("localhost:50051", "[::1]:50051"):
        DeviceConfig(server=address, token="t" * 20)
        make_channel(address, token="t" * 20).close()
    with pytest.raises(ValueError, match="plaintext"):
        make_channel("10.0.0.5:50051", token="t" * 20)


def test_a_client_certificate_means_tls_and_needs_its_key(tmp_path):
    """A client certificate and key alone (no tls flag, no CA) make the channel TLS (system roots), so a token may
    go to a remote server; a certificate without its key (or a key alone) is refused."""
    from tls_certs import make_pki

    pki = make_pki(tmp_path)
    config = DeviceConfig(server="10.0.0.5:50051", tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
                          token="t" * 20)  # fmt: skip
    assert config.uses_tls()
    make_channel("10.0.0.5:50051", cert_file=str(pki.client_cert), key_file=str(pki.client_key), token="t" * 20).close()
    for half in ({"cert_file": str(pki.client_cert)}, {"key_file": str(pki.client_key)}):
        with pytest.raises(ValueError, match="needs its key"):
            make_channel("10.0.0.5:50051", **half)
    with pytest.raises(ValueError, match="go together"):
        DeviceConfig(server="10.0.0.5:50051", tls_cert=str(pki.client_cert))


def test_tls_server_name_is_the_name_checked_in_the_server_certificate(tmp_path, tiny_pipe):
    """With tls_server_name the server certificate must hold that name (not the address's host): a name it does
    not hold fails the handshake (UNAVAILABLE), one it holds passes."""
    from tls_certs import make_pki

    pki = make_pki(tmp_path)
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    edge_pb2_grpc.add_EdgeSamplerServicer_to_server(FakeEdge(tiny_pipe), server)
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', creds)}"
    server.start()
    try:
        results = {}
        for name in ("localhost", "elsewhere.example"):
            with make_channel(address, ca_file=str(pki.ca), server_name=name) as channel:
                try:
                    edge_pb2_grpc.EdgeSamplerStub(channel).GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=5)
                    results[name] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    results[name] = exc.code()
    finally:
        server.stop(grace=None)
    assert results == {"localhost": grpc.StatusCode.OK, "elsewhere.example": grpc.StatusCode.UNAVAILABLE}


def test_device_config_bounds():
    """The largest port, MAX_STEPS steps, MAX_RETRIES retries and an 8 s backoff are allowed; a guidance outside
    [0, 100], an unknown scheduler, a side that is no multiple of 8, a zero payload cap, a blank token and a backoff
    over 8 s are refused. No codec list means lossless only."""
    DeviceConfig(server="edge:65535", steps=MAX_STEPS, retries=4, retry_backoff_s=8.0, height=64, width=8)
    for bad in (dict(guidance=100.5), dict(guidance=-0.5), dict(scheduler="plms"), dict(height=12), dict(width=36),
                dict(max_payload_bytes=0), dict(token="   "), dict(retry_backoff_s=8.5)):  # fmt: skip
        with pytest.raises(ValueError):
            DeviceConfig(**bad)
    assert DeviceConfig().codecs_to_accept() == LOSSLESS_MODES
    assert DeviceConfig(accepted_codecs=("int4",)).codecs_to_accept() == ("int4",)


# ---- edge server: admission ---------------------------------------------------------------------------------------
def test_clip_keeps_a_value_of_exactly_the_limit_whole():
    """clip cuts only values longer than the limit, noting their full length."""
    assert clip("x" * 64) == "x" * 64
    assert clip("x" * 65) == "x" * 64 + "... (65 characters)"


def test_no_codec_list_means_the_servers_first_lossless_mode():
    """A device that lists no codec gets the first lossless mode of the server's preference, never a lossy one."""
    assert negotiate_codec((), ("int8", "fp16", "int4")) == "fp16"
    with pytest.raises(EngineError) as err:
        negotiate_codec((), ("int8", "int4"))
    assert err.value.code == "INVALID_ARGUMENT" and "no common codec" in err.value.message


def test_resolve_takes_every_limit_itself():
    """A prompt of max_prompt_chars, max_steps steps, sides of max_image_side, a 256-character client_id, 64
    codec names and seed 2^63 - 1 are all allowed; the default size is the model's height x width, in order."""
    cfg = ServerConfig(max_prompt_chars=50, max_steps=60, max_image_side=256)
    info = ModelInfo("abc", "{}", 48, 32, 1, "cpu")
    spec = ImageSpec(prompt="x" * 50, steps=60, height=256, width=256, client_id="c" * 256,
                     accepted_codecs=("fp32",) * 64, seed=MAX_SEED, negative_prompt="n" * 50)  # fmt: skip
    r = resolve(spec, cfg, info)
    assert (r.steps, r.height, r.width, r.seed, r.codec) == (60, 256, 256, MAX_SEED, "fp32")
    default = resolve(ImageSpec(prompt="a"), cfg, info)
    assert (default.height, default.width) == (48, 32)


@pytest.mark.parametrize(
    "spec",
    [
        ImageSpec(prompt="a", guidance=-0.5),
        ImageSpec(prompt="a", guidance=100.5),
        ImageSpec(prompt="a", client_id="c" * 257),
        ImageSpec(prompt="a", accepted_codecs=("fp32",) * 65),
        ImageSpec(prompt="a", seed=-1),
        ImageSpec(prompt="a", seed=MAX_SEED + 1),
        ImageSpec(prompt="a", share=-0.1),
    ],
    ids=["guidance<0", "guidance>100", "client_id", "codecs", "seed<0", "seed>max", "share<0"],
)
def test_resolve_refuses_values_past_a_limit(spec):
    """Guidance outside [0, 100], a 257-character client_id, 65 codec names, a seed outside [0, 2^63 - 1] and a
    negative share are INVALID_ARGUMENT."""
    with pytest.raises(EngineError) as err:
        resolve(spec, ServerConfig(), INFO)
    assert err.value.code == "INVALID_ARGUMENT"


def test_resolve_compares_the_whole_fingerprint_and_notes_whether_the_seed_was_named():
    """A fingerprint equal in its first 8 digits only is FAILED_PRECONDITION; seed_explicit is False for a seed the
    server drew (the latent cache may then serve another seed's latents) and True for a named one."""
    info = ModelInfo("0123456789abcdef", "{}", 32, 32, 1, "cpu")
    with pytest.raises(EngineError) as err:
        resolve(ImageSpec(prompt="a", model_fingerprint="01234567ffffffff"), ServerConfig(), info)
    assert err.value.code == "FAILED_PRECONDITION"
    drawn = resolve(ImageSpec(prompt="a", model_fingerprint="0123456789abcdef"), ServerConfig(), info)
    assert not drawn.seed_explicit and 0 <= drawn.seed < 2**31
    assert resolve(ImageSpec(prompt="a", seed=0), ServerConfig(), info).seed_explicit


def engine(**settings) -> Engine:
    """An Engine with one (never called) worker; admit/release/stats need a running event loop."""
    return Engine(ServerConfig(**settings), [object()], [INFO], worker_factory=None)


async def test_the_queue_and_client_caps_admit_exactly_their_size():
    """max_queue and max_streams_per_client admit that many open requests and refuse the next one at once
    (RESOURCE_EXHAUSTED, counted as rejected with its status)."""
    queue = engine(max_queue=2)
    queue.admit(ImageSpec(prompt="a", client_id="x"), None)
    queue.admit(ImageSpec(prompt="b", client_id="y"), None)
    with pytest.raises(EngineError, match="queue full") as err:
        queue.admit(ImageSpec(prompt="c", client_id="z"), None)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    capped = engine(max_streams_per_client=2)
    capped.admit(ImageSpec(prompt="a", client_id="x"), None)
    capped.admit(ImageSpec(prompt="b", client_id="x"), None)
    with pytest.raises(EngineError, match="'x' has 2 open requests"):
        capped.admit(ImageSpec(prompt="c", client_id="x"), None)
    capped.admit(ImageSpec(prompt="d", client_id="y"), None)
    with pytest.raises(EngineError):
        capped.admit(ImageSpec(prompt=""), None)
    stats = capped.stats()
    assert (stats["admitted"], stats["rejected"], stats["status_counts"]) == (
        3, 2, {"RESOURCE_EXHAUSTED": 1, "INVALID_ARGUMENT": 1})


async def test_a_request_deadline_is_capped_by_max_deadline_s():
    """A request's deadline is its client's remaining time, at most max_deadline_s (also with none given)."""
    eng = engine(max_deadline_s=5.0)
    for remaining, budget in ((100.0, 5.0), (None, 5.0), (2.0, 2.0), (-1.0, 0.0)):
        ticket = eng.admit(ImageSpec(prompt="a", client_id=str(remaining)), remaining)
        assert ticket.deadline - ticket.admitted_at == pytest.approx(budget), remaining


async def test_release_counts_once_and_leaves_no_state():
    """release is idempotent; OK counts completed, any other status failed (with its status count); sent bytes
    add up; the ticket's future is cancelled; no client or queued request is left tracked."""
    eng = engine()
    tickets = [eng.admit(ImageSpec(prompt="a", client_id=f"c{i % 2}"), None) for i in range(3)]
    eng.release(tickets[0], "OK", 100)
    eng.release(tickets[0], "OK", 100)
    eng.release(tickets[1], "INTERNAL", 7)
    assert eng.stats()["queued_requests"] == 1 and eng.stats()["tracked_clients"] == 1
    eng.release(tickets[2], "CANCELLED")
    assert all(t.future.cancelled() for t in tickets)
    stats = eng.stats()
    assert (stats["completed"], stats["failed"], stats["bytes_sent"]) == (1, 2, 107)
    assert stats["status_counts"] == {"OK": 1, "INTERNAL": 1, "CANCELLED": 1}
    assert (stats["active_requests"], stats["queued_requests"], stats["tracked_clients"]) == (0, 0, 0)


# ---- edge server: worker failures ---------------------------------------------------------------------------------
def test_worker_error_line_is_the_last_exception_line_of_the_worker():
    """The last 'Name: message' line whose name is one word ending in Error; sentences that contain ': ' are not
    exception lines."""
    text = 'KeyError: first\n  File "/x.py", line 3\nValueError: the cause\nthe worker hit an Error: noise\n'
    assert worker_error_line(RuntimeError(text)) == "ValueError: the cause"
    assert worker_error_line(RuntimeError("no exception here")) is None
    assert error_reason(RuntimeError("no exception here\nsecond")) == "RuntimeError: no exception here"


def test_classify_maps_worker_failures_to_statuses():
    """An actor death is UNAVAILABLE (counted as a worker failure), a cancelled window CANCELLED, anything else
    INTERNAL with the worker's error line cut to 300 characters."""
    import ray.exceptions

    eng = engine()
    died = eng._classify(ray.exceptions.RayActorError())
    assert died.code == "UNAVAILABLE" and eng.stats()["worker_failures"] == 1
    cancelled = ray.exceptions.RayTaskError("run_window", "Traceback\nWindowCancelled: w1", RuntimeError("x"))
    assert eng._classify(cancelled).code == "CANCELLED"
    failed = eng._classify(RuntimeError("ValueError: " + "v" * 1000))
    assert failed.code == "INTERNAL" and failed.message.startswith("shared phase failed: ValueError: vvv")
    assert len(failed.message) < 400 and "(1012 characters)" in failed.message
    assert eng.stats()["worker_failures"] == 1


# ---- edge server: configuration -----------------------------------------------------------------------------------
def test_server_config_takes_its_bounds_and_lowercase_log_levels():
    """Port 65535, a 1024-byte chunk, zstd level 22, metrics port 65535 and a lowercase log level are allowed."""
    ServerConfig(port=65535, chunk_size=1024, zstd_level=22, metrics_port=65535, log_level="debug", worker_pipeline=4)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"worker_pipeline": 5}, "worker_pipeline must be in"),
        ({"tau": 1.5}, "tau must be"),
        ({"adaptive_taus": (0.9, 0.6, 0.75)}, "adaptive_taus must go from loose to tight"),
        ({"depth_schedule": ((0.7, 0.0), (0.9, 1.5))}, "depth_schedule must be"),
        ({"default_steps": 201}, "default_steps must be in"),
        ({"chunk_size": 1023}, "chunk_size must be in"),
        ({"model": "/m", "model_sha256": "A" * 64}, "64 lowercase hex"),
        ({"metrics_port": 65536}, "metrics_port must be in"),
        ({"zstd_level": 23}, "zstd_level must be in"),
        ({"max_deadline_s": 0.0}, "max_deadline_s must be > 0"),
        ({"keepalive_timeout_s": 0.05}, "keepalive_timeout_s must be in"),
    ],
)
def test_server_config_refuses_values_past_a_bound(settings, needle):
    """Each setting just past its documented range is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**settings)


def test_build_config_reads_local_ray_words_and_spaced_codec_lists():
    """ray_address "local" or "none" means a local Ray (None); a comma-separated codec flag may hold spaces."""
    for word in ("", "local", "none", "None"):
        assert build_config(None, {"ray_address": word}).ray_address is None
    assert build_config(None, {"codecs": " fp16 , int8,"}).codecs == ("fp16", "int8")


# ---- edge server: security ----------------------------------------------------------------------------------------
def test_tokens_of_exactly_the_minimum_length_are_taken_and_non_pem_files_refused(tmp_path):
    """A 16-character token is long enough (15 is not); a TLS file without a PEM block is a ConfigError naming the
    setting, before grpc sees it."""
    from edge_server.security import TokenTable, server_credentials

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("kiosk:" + "k" * 16 + "\n")
    assert TokenTable.from_file(tokens).client_of("k" * 16) == "kiosk"
    tokens.write_text("kiosk:" + "k" * 15 + "\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        TokenTable.from_file(tokens)
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("just text\n")
    with pytest.raises(ConfigError, match="tls_key: .* is not a PEM file"):
        server_credentials(ServerConfig(tls_cert=str(not_pem), tls_key=str(not_pem)))


async def test_the_token_interceptor_reports_each_denied_call_and_leaves_health_open():
    """A call without a valid token is refused (UNAUTHENTICATED handler) and reported to on_denied once; health
    checks and calls with a valid token pass untouched, unreported."""
    from types import SimpleNamespace

    from edge_server.security import TokenAuthInterceptor, TokenTable

    denied: list[str] = []
    interceptor = TokenAuthInterceptor(TokenTable([("kiosk", "k" * 20)]), on_denied=denied.append)
    handler = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))

    async def continuation(details):
        return handler

    def call(method: str, metadata=()):
        return interceptor.intercept_service(continuation, SimpleNamespace(method=method, invocation_metadata=metadata))

    refused = await call("/sage_edge.v1.EdgeSampler/RequestImage")
    assert refused is not handler and denied == ["UNAUTHENTICATED"]
    assert await call("/grpc.health.v1.Health/Check") is handler
    assert await call("/sage_edge.v1.EdgeSampler/RequestImage", (("authorization", "Bearer " + "k" * 20),)) is handler
    assert denied == ["UNAUTHENTICATED"]

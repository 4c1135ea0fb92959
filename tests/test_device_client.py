"""Device client units: stream checks, metadata, errors, fallback, against an in-process fake edge server that
runs the real shared phase on the tiny pipeline (no Ray, no subprocess)."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from lora_fixtures import make_lora
from server_fixtures import free_port

from device_client.client import (
    DeviceClient,
    DeviceError,
    DeviceModel,
    collect_stream,
    solver_counter,
    verify_payload,
)
from device_client.config import DeviceConfig
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc
from sage_core.codec import CodecSpec, LatentCodec
from sage_core.generate import encode_prompts, generate, group_noises
from sage_core.grouping import GroupingConfig
from sage_core.models import model_fingerprint
from sage_core.outputs import read_metadata
from sage_core.sampler import SamplingConfig, shared_phase

STEPS, SHARE = 4, 0.5


class FakeEdge(edge_pb2_grpc.EdgeSamplerServicer):
    """Singleton groups, the real shared phase; `fault` injects one misbehaviour."""

    def __init__(self, pipe, fault: str = ""):
        self.pipe, self.fault = pipe, fault
        self.fingerprint = model_fingerprint(pipe)
        self.calls = 0
        self.info_calls = 0

    def GetServerInfo(self, request, context):  # noqa: N802 (gRPC's name)
        self.info_calls += 1
        if self.fault == "token":  # what the real server answers a call without a valid bearer token
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return edge_pb2.ServerInfo(model_fingerprint=self.fingerprint, default_steps=STEPS, codecs=["fp32"])

    def RequestImage(self, request, context):  # noqa: N802 (gRPC's name)
        self.calls += 1
        if self.fault == "busy" and self.calls % 3:  # two of every three calls find the queue full
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (1 requests); retry later")
        if self.fault == "stall":  # a shared phase longer than the device waits
            time.sleep(2.0)
        if request.model_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model fingerprint mismatch")
        guidance = {"guidance": request.guidance} if request.HasField("guidance") else {}
        config = SamplingConfig(steps=request.steps or STEPS, share=SHARE, scheduler=request.scheduler or "ddim",
                                **guidance)
        seed = request.seed if request.HasField("seed") else 11
        negative = "" if self.fault == "no-negative" else request.negative_prompt  # a server older than the field
        cond, uncond = encode_prompts(self.pipe, [request.prompt], negative)
        noises, _ = group_noises(self.pipe, [[0]], seed, config)
        point = shared_phase(self.pipe.unet, self.pipe.scheduler.config, [cond], noises, uncond, config)[0]
        mode = request.accepted_codecs[0] if request.accepted_codecs else "fp32"
        codec = LatentCodec(CodecSpec(mode))
        state = dict(point.solver_state)
        if self.fault == "counter" and "lower_order_nums" in state:
            state["lower_order_nums"] = torch.zeros(0)
        names = ["latent", *state]
        frames = [codec.encode(point.latents)] + [codec.encode(v.float()) for v in state.values()]
        payload = b"".join(frames)
        fp = "0" * 16 if self.fault == "fingerprint" else self.fingerprint
        yield edge_pb2.ImageResponse(
            accepted=edge_pb2.Accepted(
                request_id="r1", group_id="g1", group_size=1, branch_step=point.step, total_steps=config.steps,
                scheduler=config.scheduler, model_fingerprint=fp, guidance=config.guidance, seed=seed, codec=mode,
                latent_shape=list(point.latents.shape), min_similarity=1.0, negative_prompt=negative,
            )
        )  # fmt: skip
        if self.fault == "empty":  # chunks without bytes, in order, without end (until the device leaves)
            for i in itertools.takewhile(lambda _: context.is_active(), itertools.count()):
                yield edge_pb2.ImageResponse(chunk=edge_pb2.LatentChunk(index=i, data=b""))
            return
        chunks = [payload[i : i + 100] for i in range(0, len(payload), 100)]
        for i, c in enumerate(chunks):
            yield edge_pb2.ImageResponse(chunk=edge_pb2.LatentChunk(index=i, data=c))
        sha = hashlib.sha256(payload).hexdigest()
        if self.fault == "sha":
            sha = hashlib.sha256(b"x").hexdigest()
        yield edge_pb2.ImageResponse(
            done=edge_pb2.Done(
                chunks=len(chunks), total_bytes=len(payload), sha256=sha,
                frame_sizes=[len(f) for f in frames], frame_names=names,
            )
        )  # fmt: skip


@pytest.fixture(scope="module")
def fake_server(request):
    """Start a fake server per fault kind; yields a function fault -> address (its `edges`: fault -> servicer)."""
    from sage_core.models import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    servers: dict[str, tuple[grpc.Server, str]] = {}
    edges: dict[str, FakeEdge] = {}

    def start(fault: str = "") -> str:
        if fault not in servers:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            edges[fault] = FakeEdge(pipe, fault)
            edge_pb2_grpc.add_EdgeSamplerServicer_to_server(edges[fault], server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers[fault] = (server, f"127.0.0.1:{port}")
        return servers[fault][1]

    start.edges = edges  # fault -> its servicer (call counts)
    yield start
    for server, _ in servers.values():
        server.stop(grace=None)


@pytest.fixture(scope="module")
def device_model():
    from sage_core.models import tiny_pipeline

    return DeviceModel.wrap(tiny_pipeline(seed=0), DeviceConfig(adapter="none"))


def client_for(address: str, model: DeviceModel, **kw) -> DeviceClient:
    return DeviceClient(DeviceConfig(server=address, model="tiny", adapter="none", **kw), model)


def test_edge_image_equals_local_generate(fake_server, device_model, tiny_pipe):
    """Lossless fp32 transport: the device's image is the local sampler's image (same seed, group of one)."""
    with client_for(fake_server(""), device_model, accepted_codecs=("fp32",), steps=STEPS) as client:
        result = client.generate("a red circle on the left", seed=5)
    ref = generate(tiny_pipe, ["a red circle on the left"], SamplingConfig(steps=STEPS, share=SHARE),
                   GroupingConfig(), seed=5, groups=[[0]])  # fmt: skip
    assert torch.allclose(result.latents, ref.latents, atol=1e-5, rtol=0)
    ref_u8 = (ref.images[0] * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(result.image).astype(int) - ref_u8).max() <= 1
    assert result.metadata["device_unet_evals"] == 2 * (STEPS - round(SHARE * STEPS))


def test_a_negative_prompt_guides_the_edge_image_as_the_local_one(fake_server, device_model, tiny_pipe):
    """The request carries the negative prompt; the server's shared phase and the device's branch phase both use it,
    so the device's image is the local sampler's (and not the one without it)."""
    negative = "a purple triangle, blurry"
    with client_for(fake_server(""), device_model, accepted_codecs=("fp32",), steps=STEPS) as client:
        result = client.generate("a red circle on the left", seed=5, negative_prompt=negative)
    ref = generate(tiny_pipe, ["a red circle on the left"], SamplingConfig(steps=STEPS, share=SHARE,
                   negative_prompt=negative), GroupingConfig(), seed=5, groups=[[0]])  # fmt: skip
    plain = generate(tiny_pipe, ["a red circle on the left"], SamplingConfig(steps=STEPS, share=SHARE),
                     GroupingConfig(), seed=5, groups=[[0]])  # fmt: skip
    assert torch.allclose(result.latents, ref.latents, atol=1e-5, rtol=0)
    assert not torch.allclose(result.latents, plain.latents, atol=1e-3, rtol=0)
    assert result.metadata["negative_prompt"] == negative


def test_a_server_that_ignores_the_negative_prompt_is_refused(fake_server, device_model):
    """A server older than negative prompts drops the field unread: its Accepted says so, and the device stops
    rather than finish an image without it (under guidance; without it the negative prompt changes nothing)."""
    with client_for(fake_server("no-negative"), device_model, steps=STEPS) as client:
        with pytest.raises(DeviceError) as err:
            client.generate("a blue square", seed=3, negative_prompt="blurry")
        assert err.value.code == "FAILED_PRECONDITION" and "older than negative prompts" in err.value.message
        assert client.generate("a blue square", seed=3).metadata["negative_prompt"] == ""
    # without guidance a negative prompt changes nothing: the image is the one without it, and it is recorded
    with client_for(fake_server("no-negative"), device_model, steps=STEPS, guidance=1.0) as client:
        unguided = client.generate("a blue square", seed=3, negative_prompt="blurry")
        assert unguided.metadata["negative_prompt"] == "blurry" and unguided.metadata["guidance"] == 1.0
        assert torch.equal(unguided.latents, client.generate("a blue square", seed=3).latents)


def test_a_negative_prompt_of_none_is_none_and_one_that_is_not_text_is_refused_before_sending(fake_server,
                                                                                             device_model):
    """None is diffusers' "no negative prompt"; a list or a number is a ValueError before the server is asked
    (protobuf would refuse it deep in the call, and None it would turn into "" without a word)."""
    with client_for(fake_server(""), device_model, steps=STEPS) as client:
        assert client.generate("a blue square", seed=3, negative_prompt=None).metadata["negative_prompt"] == ""
        calls = fake_server.edges[""].calls
        for bad in (["blurry"], 7):
            with pytest.raises(ValueError, match="negative_prompt must be text"):
                client.generate("a blue square", seed=3, negative_prompt=bad)
        assert fake_server.edges[""].calls == calls
        assert client.generate_local("a cat", seed=1, negative_prompt=None).metadata["negative_prompt"] == ""


def test_metadata_round_trips_through_png(fake_server, device_model, tmp_path):
    with client_for(fake_server(""), device_model, steps=STEPS) as client:
        result = client.generate("a blue square", seed=3)
    path = result.save(tmp_path / "img.png")
    meta = read_metadata(path)
    assert meta["prompt"] == "a blue square" and meta["seed"] == 3 and meta["mode"] == "edge"
    assert meta["group_id"] == "g1" and meta["group_size"] == 1 and meta["branch_step"] == 2
    assert meta["model_fingerprint"] == device_model.fingerprint and meta["adapter"] == "none"
    assert meta["codec"] == "fp32" and meta["payload_bytes"] == result.bytes_received > 0
    assert "total" in meta["timings_ms"] and "branch_phase" in meta["timings_ms"]


def test_dpmpp_solver_state_crosses_the_wire(fake_server, device_model, tiny_pipe):
    with client_for(fake_server(""), device_model, accepted_codecs=("fp32",), steps=STEPS, scheduler="dpmpp") as c:
        result = c.generate("a green star", seed=9)
    ref = generate(tiny_pipe, ["a green star"], SamplingConfig(steps=STEPS, share=SHARE, scheduler="dpmpp"),
                   GroupingConfig(), seed=9, groups=[[0]])  # fmt: skip
    assert torch.allclose(result.latents, ref.latents, atol=1e-5, rtol=0)


def test_a_malformed_solver_counter_is_a_clear_error(fake_server, device_model):
    """A server whose dpmpp solver counter frame holds no value (checksums fine) gets DeviceError INTERNAL naming
    the entry; it was a bare IndexError out of generate. A lossy codec's blurred count still rounds."""
    with client_for(fake_server("counter"), device_model, accepted_codecs=("fp32",), steps=STEPS,
                    scheduler="dpmpp") as c, pytest.raises(DeviceError) as err:  # fmt: skip
        c.generate("a green star", seed=9)
    assert err.value.code == "INTERNAL" and "lower_order_nums" in err.value.message
    assert int(solver_counter("lower_order_nums", torch.tensor([1.98]), 4)) == 2
    for bad in (torch.tensor([1e30]), torch.tensor([1.0, 2.0]), torch.tensor([-3.0])):
        with pytest.raises(DeviceError, match="bad solver state"):
            solver_counter("lower_order_nums", bad, 4)


def test_a_full_queue_is_retried_with_backoff(fake_server, device_model):
    """RESOURCE_EXHAUSTED ("queue full; retry later") comes before any response: gRPC's retry policy tries again
    (here twice) and the image arrives; with retries off the first refusal is the answer."""
    address = fake_server("busy")
    with client_for(address, device_model, steps=STEPS, retries=0) as client, pytest.raises(DeviceError) as refused:
        client.generate("a red circle", seed=5)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    with client_for(address, device_model, steps=STEPS, retries=3, retry_backoff_s=0.01) as client:
        assert client.generate("a red circle", seed=5).image.size == (32, 32)


def test_the_device_s_own_timeout_is_named(fake_server, device_model):
    with client_for(fake_server("stall"), device_model, steps=STEPS, timeout_s=0.5) as client:
        with pytest.raises(DeviceError) as late:
            client.generate("a red circle", seed=5)
    assert late.value.code == "DEADLINE_EXCEEDED" and "device's timeout of 0.5 s" in late.value.message


def test_a_stream_of_empty_chunks_ends_the_request_at_once(fake_server, device_model):
    """Chunks without bytes (here: without end) are a protocol violation the device ends at once with INTERNAL; it
    waited out its whole timeout, since an empty chunk passed the order check and never reached the payload cap."""
    with client_for(fake_server("empty"), device_model, steps=STEPS, timeout_s=15) as client:
        start = time.monotonic()
        with pytest.raises(DeviceError) as err:
            client.generate("a red circle", seed=5)
    assert err.value.code == "INTERNAL" and "protocol error: chunk 0 is empty" in err.value.message, err.value
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("bad", [{"retries": 5}, {"retries": -1}, {"retry_backoff_s": 0.0},
                                 {"retry_backoff_s": float("nan")}])
def test_retry_settings_are_checked(bad):
    with pytest.raises(ValueError, match="retr"):
        DeviceConfig(**bad)


def test_sha_mismatch_is_data_loss(fake_server, device_model):
    with client_for(fake_server("sha"), device_model, steps=STEPS) as client, pytest.raises(DeviceError) as err:
        client.generate("a red circle", seed=1)
    assert err.value.code == "DATA_LOSS" and "sha256" in str(err.value)


def test_fingerprint_mismatch_in_accepted_is_failed_precondition(fake_server, device_model):
    with client_for(fake_server("fingerprint"), device_model, steps=STEPS) as c, pytest.raises(DeviceError) as err:
        c.generate("a red circle", seed=1)
    assert err.value.code == "FAILED_PRECONDITION" and "fingerprint" in str(err.value)


def test_server_refusing_fingerprint_is_failed_precondition(fake_server):
    from sage_core.models import tiny_pipeline

    other = DeviceModel.wrap(tiny_pipeline(seed=1), DeviceConfig(adapter="none"))
    with client_for(fake_server(""), other, steps=STEPS) as client, pytest.raises(DeviceError) as err:
        client.generate("a red circle", seed=1)
    assert err.value.code == "FAILED_PRECONDITION"
    assert other.fingerprint in str(err.value) and "fingerprint mismatch" in str(err.value)


def test_unreachable_server_without_fallback_is_unavailable(device_model):
    config = dict(connect_timeout_s=0.5, steps=STEPS)
    with client_for(f"127.0.0.1:{free_port()}", device_model, **config) as c, pytest.raises(DeviceError) as err:
        c.generate("a red circle", seed=1)
    assert err.value.code == "UNAVAILABLE" and "unreachable" in str(err.value)


def test_unreachable_server_falls_back_to_local(device_model, tiny_pipe):
    address = f"127.0.0.1:{free_port()}"
    with client_for(address, device_model, connect_timeout_s=0.5, steps=STEPS, fallback_local=True) as client:
        result = client.generate("a red circle", seed=4)
    assert result.metadata["mode"] == "local-fallback" and "unreachable" in result.metadata["fallback_reason"]
    ref = generate(tiny_pipe, ["a red circle"], SamplingConfig(steps=STEPS, share=0.0), GroupingConfig(), seed=4,
                   groups=[[0]])  # fmt: skip
    assert torch.allclose(result.latents, ref.latents, atol=1e-5, rtol=0)


def forbid_model_loading(monkeypatch) -> None:
    """DeviceModel.load fails the test: a client must have ended before loading its model."""

    def load(config):
        raise AssertionError("the device model was loaded before the server answered")

    monkeypatch.setattr(DeviceModel, "load", staticmethod(load))


def test_an_unreachable_server_is_reported_before_the_model_loads(monkeypatch):
    """Without a model given, the client reaches the server first: an unreachable one is UNAVAILABLE within the
    connect timeout, no model loaded (it loaded the model first, ~5 s on a CPU, and then waited for the server)."""
    forbid_model_loading(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(DeviceError) as err:
        DeviceClient(DeviceConfig(server=f"127.0.0.1:{free_port()}", model="tiny", connect_timeout_s=0.5))
    assert err.value.code == "UNAVAILABLE" and "unreachable within 0.5 s" in err.value.message
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("fault", ["no edge server", "token"])
def test_a_server_that_refuses_the_device_is_reported_before_the_model_loads(fault, fake_server, monkeypatch):
    """A gRPC server without the EdgeSampler service (UNIMPLEMENTED) and one that refuses the device's token
    (UNAUTHENTICATED) end the client before its model loads; the probe took them for reachable servers, and the
    request failed only after the load."""
    forbid_model_loading(monkeypatch)
    if fault == "no edge server":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
    else:
        address = fake_server("token")
    try:
        with pytest.raises(DeviceError) as err:
            DeviceClient(DeviceConfig(server=address, model="tiny", connect_timeout_s=5))
    finally:
        if fault == "no edge server":
            server.stop(grace=None)
    expected = {"no edge server": ("UNIMPLEMENTED", "is it a SAGE edge server?"),
                "token": ("UNAUTHENTICATED", "invalid bearer token")}[fault]  # fmt: skip
    assert err.value.code == expected[0] and expected[1] in err.value.message, err.value
    assert f"edge server {address} refused GetServerInfo" in err.value.message


def test_the_server_is_reached_before_the_model_loads(fake_server, monkeypatch):
    """A client that loads its model asks the server first, once (the first request does not ask again); with
    fallback_local it loads first, as an unreachable server then needs the model at once."""
    address = fake_server("")
    edge = fake_server.edges[""]
    asked_before_load: list[int] = []
    real_load = DeviceModel.load

    def load(config):
        asked_before_load.append(edge.info_calls)
        return real_load(config)

    monkeypatch.setattr(DeviceModel, "load", staticmethod(load))
    before = edge.info_calls
    with DeviceClient(DeviceConfig(server=address, model="tiny", adapter="none", steps=STEPS)) as client:
        assert client.generate("a red circle", seed=1).metadata["mode"] == "edge"
    assert asked_before_load == [before + 1] and edge.info_calls == before + 1
    with DeviceClient(DeviceConfig(server=address, model="tiny", adapter="none", fallback_local=True)):
        pass
    assert asked_before_load == [before + 1, before + 1]  # loaded without asking


def _accepted(fingerprint: str) -> edge_pb2.ImageResponse:
    return edge_pb2.ImageResponse(
        accepted=edge_pb2.Accepted(model_fingerprint=fingerprint, total_steps=4, branch_step=2, codec="fp16",
                                   scheduler="ddim", latent_shape=[1, 4, 2, 2])
    )  # fmt: skip


def piece(index: int, data: bytes) -> edge_pb2.ImageResponse:
    return edge_pb2.ImageResponse(chunk=edge_pb2.LatentChunk(index=index, data=data))


def test_stream_protocol_violations_are_clear_errors():
    config = DeviceConfig()
    chunk = piece(0, b"abc")
    done = edge_pb2.ImageResponse(
        done=edge_pb2.Done(chunks=1, total_bytes=3, sha256=hashlib.sha256(b"abc").hexdigest())
    )
    cases = {
        "before Accepted": [chunk],
        "chunk 1 where 0": [_accepted("f"), edge_pb2.ImageResponse(chunk=edge_pb2.LatentChunk(index=1))],
        "ended before Done": [_accepted("f"), chunk],
        "after Done": [_accepted("f"), chunk, done, chunk],
        "a second Accepted": [_accepted("f"), _accepted("f")],
        "chunk 1 is empty": [_accepted("f"), chunk, piece(1, b"")],
        "chunk 1 has 4 B, more than chunk 0": [_accepted("f"), chunk, piece(1, b"abcd")],
        "chunk 2 after a shorter one": [_accepted("f"), chunk, piece(1, b"ab"), piece(2, b"c")],
    }
    for needle, messages in cases.items():
        with pytest.raises(DeviceError, match=needle):
            collect_stream(iter(messages), "f", config)
    with pytest.raises(DeviceError, match="above the cap"):
        collect_stream(iter([_accepted("f"), chunk]), "f", DeviceConfig(max_payload_bytes=2))


def test_verify_payload_checks_size_and_frame_table():
    payload = b"0123456789"
    sha = hashlib.sha256(payload).hexdigest()
    ok = edge_pb2.Done(chunks=1, total_bytes=10, sha256=sha, frame_sizes=[6, 4], frame_names=["latent", "x"])
    assert [n for n, _ in verify_payload(payload, ok)] == ["latent", "x"]
    short = edge_pb2.Done(chunks=1, total_bytes=10, sha256=sha, frame_sizes=[4], frame_names=[])
    with pytest.raises(DeviceError, match="frame table"):
        verify_payload(payload, short)
    with pytest.raises(DeviceError, match="received 9 B"):
        verify_payload(payload[:9], ok)


def test_config_rejects_bad_values():
    for bad in (dict(server="nohost"), dict(server="host:99999"), dict(server="host:0"), dict(server=":50051"),
                dict(steps=-1), dict(share=2.0), dict(accepted_codecs=("zip",))):
        with pytest.raises(ValueError):
            DeviceConfig(**bad)


def test_config_rejects_timeouts_grpc_cannot_keep_and_a_server_name_without_tls():
    """NaN, infinite or huge timeouts would end every request at once with DEADLINE_EXCEEDED (or call the server
    unreachable); a certificate name without TLS would silently send in plaintext."""
    for bad in (dict(timeout_s=math.inf), dict(timeout_s=math.nan), dict(timeout_s=1e12), dict(connect_timeout_s=0)):
        with pytest.raises(ValueError, match="timeout must be in"):
            DeviceConfig(**bad)
    with pytest.raises(ValueError, match="needs TLS"):
        DeviceConfig(server="10.0.0.5:50051", tls_server_name="edge.example")
    DeviceConfig(server="10.0.0.5:50051", tls_server_name="edge.example", tls=True, timeout_s=3600.0)


def test_adapter_is_applied_to_the_branch_phase_and_recorded(fake_server, device_model, tmp_path):
    from sage_core.models import tiny_pipeline

    adapter = make_lora(tmp_path / "lora")
    with_lora = DeviceModel.wrap(tiny_pipeline(seed=0), DeviceConfig(adapter=adapter))
    assert with_lora.fingerprint == device_model.fingerprint  # the base model's identity
    with client_for(fake_server(""), with_lora, steps=STEPS) as client:
        adapted = client.generate("a red circle", seed=2)
    with client_for(fake_server(""), device_model, steps=STEPS) as client:
        plain = client.generate("a red circle", seed=2)
    assert adapted.metadata["adapter"] == adapter and plain.metadata["adapter"] == "none"
    assert not torch.allclose(adapted.latents, plain.latents)


def test_missing_adapter_folder_is_a_clear_error(tmp_path):
    from sage_core.models import ModelError, tiny_pipeline

    with pytest.raises(ModelError, match="does not exist"):
        DeviceModel.wrap(tiny_pipeline(seed=0), DeviceConfig(adapter=str(tmp_path / "nope")))



def test_an_overlong_prompt_is_recorded_with_the_tokens_ignored(fake_server, device_model):
    from sage_core.generate import overlong_prompts

    long = " ".join(["a red circle on the left of a blue square"] * 12)
    with client_for(fake_server(""), device_model, steps=STEPS) as client:
        short_result, long_result = client.generate("a blue square", seed=3), client.generate(long, seed=3)
        long_negative = client.generate("a blue square", seed=3, negative_prompt=f"{long} blurry")
    ignored = overlong_prompts(device_model.pipe.tokenizer, [long])[0]
    assert "ignored_tokens" not in short_result.metadata
    assert "negative_prompt_ignored_tokens" not in long_result.metadata
    assert long_result.metadata["ignored_tokens"] == ignored > 0
    assert "ignored_tokens" not in long_negative.metadata
    assert long_negative.metadata["negative_prompt_ignored_tokens"] == ignored + 1

def test_cli_generate_with_an_adapter_of_another_model_exits_2(tmp_path):
    """An adapter whose sage_adapter.json names another base model is a wrong command line: one `error:` line
    naming both models, exit 2, as docs/training.md says (it was exit 1, as for a failed run)."""
    import json

    from lora_fixtures import make_lora
    from typer.testing import CliRunner

    from device_client.cli import main

    adapter = make_lora(tmp_path / "lora")
    (tmp_path / "lora" / "sage_adapter.json").write_text(json.dumps({"base_model_fingerprint": "0123456789abcdef"}))
    res = CliRunner().invoke(main, ["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", "tiny",
                                    "--adapter", adapter, "--steps", "2"])
    assert res.exit_code == 2, res.output
    assert f"error: the adapter in {adapter} was trained on base model 0123456789abcdef" in res.output


def test_cli_generate_with_fallback_and_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from device_client.cli import main

    runner = CliRunner()
    out = tmp_path / "x.png"
    base = ["generate", "a red circle", "-o", str(out), "--server", f"127.0.0.1:{free_port()}", "--model", "tiny",
            "--adapter", "none", "--steps", "2", "--seed", "3", "--connect-timeout", "0.5"]  # fmt: skip
    res = runner.invoke(main, base)
    assert res.exit_code == 1 and "UNAVAILABLE" in res.output and "Traceback" not in res.output and not out.exists()
    res = runner.invoke(main, [*base, "--fallback-local", "--negative-prompt", "blurry"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(out)
    assert meta["mode"] == "local-fallback" and meta["seed"] == 3 and meta["prompt"] == "a red circle"
    assert meta["negative_prompt"] == "blurry" and "had no effect" not in res.output
    res = runner.invoke(main, [*base, "--fallback-local", "--negative-prompt", "blurry", "--guidance", "1",
                               "--overwrite"])
    assert res.exit_code == 0 and "note: the negative prompt had no effect: guidance 1 does not use" in res.output
    long = " ".join(["a red circle on the left of a blue square"] * 12)  # over CLIP's 77 tokens
    res = runner.invoke(main, [base[0], long, *base[2:], "--fallback-local", "--negative-prompt", long,
                               "--overwrite"])
    assert res.exit_code == 0, res.output
    for what in ("prompt", "negative prompt"):
        assert f"note: the {what} is too long: the text encoder read its start and ignored the last" in res.output
    res = runner.invoke(main, ["generate", "x", "--server", "nohost", "--model", "tiny"])
    assert res.exit_code == 2 and "host:port" in res.output  # a command-line mistake
    res = runner.invoke(main, [*base[:3], str(tmp_path), *base[4:], "--fallback-local"])  # -o a folder: refused first
    assert res.exit_code == 2 and "is a folder" in res.output and "Traceback" not in res.output


def test_cli_generate_reports_an_unreachable_server_before_loading_the_model(tmp_path, monkeypatch):
    """`sage-device generate --server` to a server that is not there ends with UNAVAILABLE before the model loads."""
    from typer.testing import CliRunner

    from device_client.cli import main

    forbid_model_loading(monkeypatch)
    out = tmp_path / "x.png"
    res = CliRunner().invoke(main, ["generate", "a red circle", "-o", str(out), "--server", f"127.0.0.1:{free_port()}",
                                    "--model", "tiny", "--connect-timeout", "0.5"])  # fmt: skip
    assert res.exit_code == 1 and "error: UNAVAILABLE: edge server" in res.output, res.output
    assert "unexpected" not in res.output and not out.exists()


def test_cli_generate_refuses_bad_arguments_before_connecting(tmp_path):
    """An existing -o file without --overwrite, an -o under a file, a name that is not .png, a seed beyond 2^63 - 1
    and a prompt that is not UTF-8 are one-line errors (exit 2) before any server is asked (none listens here)."""
    from typer.testing import CliRunner

    from device_client.cli import main
    from sage_core.seeds import MAX_SEED
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    base = ["--server", f"127.0.0.1:{free_port()}", "--model", "tiny", "--adapter", "none", "--connect-timeout", "0.5"]
    cases = {
        ("a cat", "-o", str(existing)): "exists; pass --overwrite",
        ("a cat", "-o", str(existing / "x.png")): "is a file, not a folder",
        ("a cat", "-o", str(tmp_path / "x.jpg")): "ending in .png",
        ("a cat", "-o", str(tmp_path / "X.PNG"), "--seed", str(2**64)): f"less than or equal to {2**63 - 1}",
        ("\udcff\udcfe", "-o", str(tmp_path / "y.png")): "the prompt is not valid UTF-8 text",
        ("a cat", "-o", str(tmp_path / "y.png"), "--negative-prompt", "\udcff"): "negative prompt is not valid UTF-8",
        ("a cat", "-o", str(tmp_path / "z.png"), "--timeout", "0"): "timeout must be in (0, 86400]",  # was exit 1
        ("a cat", "-o", str(tmp_path / "z.png"), "--tls-server-name", "edge"): "tls_server_name names the server",
        ("a cat", "-o", str(tmp_path / "z.png"), "--token-file", str(tmp_path / "none")): "cannot read the token file",
    }
    for args, expected in cases.items():
        res = CliRunner().invoke(main, ["generate", *args, *base], env={"COLUMNS": "300"})  # no cut in the box
        assert res.exit_code == 2 and expected in res.output and "Traceback" not in res.output, (args, res.output)
    assert existing.read_bytes() == b"keep" and not (tmp_path / "x.jpg").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")  # the demo asks for seed + i: MAX_SEED + 1 for the second
    res = CliRunner().invoke(main, ["demo", "--prompts", str(prompts), "--seed", str(MAX_SEED), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "seed must be in" in res.output and "Traceback" not in res.output, res.output


def test_the_device_command_line_does_not_import_torch(tmp_path) -> None:
    """`sage-device --help` and its argument checks answer at once: the package, its config and its CLI import no
    torch (the names they check against live in the torch-free sage_core.names), and a wrong -o is refused before
    torch loads."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, device_client, device_client.config, device_client.cli; "
            "from device_client import DeviceConfig; DeviceConfig(scheduler='euler', accepted_codecs=('int4',)); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
    code = ("import sys\nfrom device_client.cli import main\n"
            "try:\n    main(['generate', 'a cat', '-o', sys.argv[1], '--server', '127.0.0.1:1'])\n"
            "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cat.txt")], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert done.stdout.strip() == "2 False", (done.stdout, done.stderr[-2000:])
    assert "give a file name ending in .png" in done.stderr


def test_the_lazy_package_still_gives_its_submodules_and_names() -> None:
    """`import device_client` then `device_client.client` works as it did when the package imported it eagerly,
    dir() lists the public names, and an unknown name is an AttributeError."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import device_client\n"
            "assert device_client.client.DeviceClient is device_client.DeviceClient\n"
            "assert {'DeviceClient', 'read_metadata'} <= set(dir(device_client))\n"
            "try:\n    device_client.nope\nexcept AttributeError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_default_names_the_shipped_model_on_a_device_as_on_the_server():
    """`--model default` (what a server is started with) loaded a folder named "default" on a device, and the
    load benchmark and `sage-sim validate` refused it; it is the shipped model, as None is, and takes no configs."""
    import benchmarks.bench_load as bench_load
    from device_client.demo import check_model

    shipped = DeviceModel.load(DeviceConfig(adapter="none"))
    assert DeviceModel.load(DeviceConfig(model="default", adapter="none")).fingerprint == shipped.fingerprint
    check_model("default", "none")
    bench_load.check_inputs(bench_load.parse_args(["--model", "default"]))
    with pytest.raises(ValueError, match="model_config is for a single-file model, not the default model"):
        DeviceConfig(model="default", model_config="configs")

"""The device half of SAGE: request a group's branch point from the edge server, verify and decode it, run the
branch phase for the device's own prompt (sage_core.sampler.branch_phase, the same code the server and the local
CLI run), VAE-decode and return the image with its metadata.

Every failure is a `DeviceError` whose `code` is a gRPC status name (FAILED_PRECONDITION for a model mismatch,
DATA_LOSS for a payload that fails its checksum, INTERNAL for a protocol violation, UNAVAILABLE when the server
cannot be reached, ...) and whose message says what happened in one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from PIL import Image

from device_client.channel import make_channel, retry_options
from device_client.config import DEFAULT_MODEL, TINY_MODEL, DeviceConfig
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc
from sage_core.adapters import ADAPTER_NONE, load_adapter, resolve_adapter
from sage_core.codec import CodecError, CodecSpec, LatentCodec
from sage_core.generate import decode_latents, encode_prompts, generate, negative_text, overlong_prompts
from sage_core.grouping import GroupingConfig
from sage_core.models import load_pipeline, model_fingerprint, tiny_pipeline
from sage_core.outputs import save_png, to_pil
from sage_core.sampler import SCHEDULERS, BranchPoint, SamplingConfig, UNetCounter, branch_phase

LATENT_FRAME = "latent"
SOLVER_COUNTERS = ("lower_order_nums",)  # solver-state entries that are integers, sent as float frames
MAX_MESSAGE_BYTES = 16 * 2**20
# answers to the reachability probe that end a request at once: no edge server there, or credentials it refuses
REFUSING_PROBE = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
NOT_AN_EDGE_SERVER = " (no sage_edge.v1.EdgeSampler service there: is it a SAGE edge server?)"


class DeviceError(RuntimeError):
    """A request that ended without an image; `code` is a gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class DeviceModel:
    """The pipeline a device runs, the base-model fingerprint it announces and the adapter it applied."""

    pipe: Any
    fingerprint: str
    adapter: str  # a folder path or "none"
    text_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # tokenizers are not thread-safe

    @classmethod
    def load(cls, config: DeviceConfig) -> DeviceModel:
        """Load the configured model, fingerprint the base weights, then apply the adapter (if any)."""
        if config.model == TINY_MODEL:
            pipe = tiny_pipeline(seed=0)
        else:
            path = None if config.model == DEFAULT_MODEL else config.model
            pipe = load_pipeline(path, config=config.model_config)
        return cls.wrap(pipe, config)

    @classmethod
    def wrap(cls, pipe: Any, config: DeviceConfig) -> DeviceModel:
        """Fingerprint an already-loaded pipeline (before any adapter) and apply the configured adapter."""
        fingerprint = model_fingerprint(pipe)
        adapter = resolve_adapter(config.adapter, fingerprint)
        if adapter is not None:
            load_adapter(pipe, adapter)
        pipe.to(config.device)
        return cls(pipe, fingerprint, str(adapter) if adapter is not None else ADAPTER_NONE)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ReceivedLatent:
    """A verified, decoded branch point as the server sent it."""

    accepted: edge_pb2.Accepted
    done: edge_pb2.Done
    point: BranchPoint
    payload_bytes: int
    wire_bytes: int
    timings_ms: dict[str, float]


@dataclass
class DeviceResult:
    """An image and everything about how it was made."""

    image: Image.Image
    metadata: dict[str, Any]
    latents: torch.Tensor  # final latent [1, C, h, w]
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_received: int = 0  # latent payload bytes (the wire adds a little framing: metadata["wire_bytes"])

    def save(self, path: str | Path) -> Path:
        """Write the image as PNG with the metadata in text chunks (one per key, plus all of it as JSON)."""
        return save_png(self.image, path, self.metadata)


# ---------------------------------------------------------------------------------------------------- stream


def check_accepted(
    accepted: edge_pb2.Accepted, fingerprint: str, config: DeviceConfig, negative_prompt: str = ""
) -> None:
    """Refuse an Accepted message this device cannot or must not continue from (`negative_prompt`: the request's)."""
    if accepted.model_fingerprint != fingerprint:
        raise DeviceError(
            "FAILED_PRECONDITION",
            f"model fingerprint mismatch: device runs {fingerprint}, server runs {accepted.model_fingerprint or '?'}",
        )
    if accepted.codec not in config.codecs_to_accept():
        raise DeviceError("FAILED_PRECONDITION", f"server chose codec {accepted.codec!r}, not one this device accepted")
    if not 1 <= accepted.total_steps or not 0 <= accepted.branch_step <= accepted.total_steps:
        raise DeviceError("INTERNAL", f"bad schedule: branch step {accepted.branch_step} of {accepted.total_steps}")
    if (accepted.scheduler or "ddim") not in SCHEDULERS:
        raise DeviceError("FAILED_PRECONDITION", f"server uses scheduler {accepted.scheduler!r}, unknown here")
    if len(accepted.latent_shape) != 4 or accepted.latent_shape[0] != 1:
        raise DeviceError("INTERNAL", f"bad latent shape {list(accepted.latent_shape)}; expected [1, C, h, w]")
    if accepted.negative_prompt != negative_prompt and accepted.guidance > 1.0:  # without guidance it does nothing
        raise DeviceError("FAILED_PRECONDITION", negative_mismatch(accepted.negative_prompt, negative_prompt))


def negative_mismatch(used: str, asked: str) -> str:
    """The message for a shared phase run under another negative prompt than the request's."""
    if not used:
        return (f"the server ran the shared phase without this request's negative prompt {shown(asked)}: a server "
                "older than negative prompts ignores them (upgrade it)")
    return f"the server ran the shared phase under negative prompt {shown(used)}, not this request's " + (
        shown(asked) if asked else "(none)")


def shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, cut to `limit` characters."""
    text = str(text)
    return repr(text if len(text) <= limit else f"{text[:limit]}...")


def check_next_chunk(chunks: list[bytes], n: int) -> None:
    """DeviceError INTERNAL unless a chunk of `n` bytes may follow `chunks` (those received so far): no chunk is
    empty, and every chunk but the last has the server's chunk_size (chunk 0's size). So each chunk brings the
    payload nearer max_payload_bytes, and a server cannot hold a device with a stream that never ends."""
    index, size = len(chunks), len(chunks[0]) if chunks else n
    if n == 0:
        raise DeviceError("INTERNAL", f"protocol error: chunk {index} is empty")
    if n > size:
        raise DeviceError("INTERNAL", f"protocol error: chunk {index} has {n} B, more than chunk 0 ({size} B)")
    if chunks and len(chunks[-1]) < size:
        raise DeviceError("INTERNAL", f"protocol error: chunk {index} after a shorter one (only the last is shorter)")


def collect_stream(
    responses: Iterable[edge_pb2.ImageResponse], fingerprint: str, config: DeviceConfig, negative_prompt: str = ""
) -> tuple[edge_pb2.Accepted, edge_pb2.Done, bytes, int, float]:
    """Read Accepted, the chunks in order and Done; return them, the payload, wire bytes and the time of Accepted.
    Raises DeviceError on any out-of-order, missing or oversized part (`negative_prompt`: the request's)."""
    accepted: edge_pb2.Accepted | None = None
    done: edge_pb2.Done | None = None
    chunks: list[bytes] = []
    size = wire = 0
    t_accepted = 0.0
    for msg in responses:
        wire += msg.ByteSize()
        kind = msg.WhichOneof("kind")
        if done is not None:
            raise DeviceError("INTERNAL", f"protocol error: {kind} after Done")
        if kind == "accepted":
            if accepted is not None:
                raise DeviceError("INTERNAL", "protocol error: a second Accepted")
            check_accepted(msg.accepted, fingerprint, config, negative_prompt)
            accepted, t_accepted = msg.accepted, time.perf_counter()
            accepted.negative_prompt = negative_prompt  # the request's (a server older than them drops it unread)
        elif accepted is None:
            raise DeviceError("INTERNAL", f"protocol error: {kind} before Accepted")
        elif kind == "chunk":
            if msg.chunk.index != len(chunks):
                raise DeviceError("INTERNAL", f"protocol error: chunk {msg.chunk.index} where {len(chunks)} was due")
            check_next_chunk(chunks, len(msg.chunk.data))
            size += len(msg.chunk.data)
            if size > config.max_payload_bytes:
                raise DeviceError("RESOURCE_EXHAUSTED", f"latent payload above the cap of {config.max_payload_bytes} B")
            chunks.append(bytes(msg.chunk.data))
        elif kind == "done":
            done = msg.done
            if done.chunks != len(chunks):
                raise DeviceError("DATA_LOSS", f"received {len(chunks)} chunks, server sent {done.chunks}")
        else:
            raise DeviceError("INTERNAL", "protocol error: empty response message")
    if accepted is None or done is None:
        raise DeviceError("DATA_LOSS", f"stream ended before Done ({len(chunks)} chunks, {size} B received)")
    return accepted, done, b"".join(chunks), wire, t_accepted


def verify_payload(payload: bytes, done: edge_pb2.Done) -> list[tuple[str, bytes]]:
    """Check the payload against Done (size, sha256, frame table) and split it into named frames."""
    if done.total_bytes != len(payload):
        raise DeviceError("DATA_LOSS", f"received {len(payload)} B, server sent {done.total_bytes} B")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != done.sha256.lower():
        raise DeviceError(
            "DATA_LOSS", f"latent payload sha256 mismatch: got {digest[:16]}..., expected {done.sha256[:16]}..."
        )
    sizes, names = list(done.frame_sizes), list(done.frame_names)
    if len(names) == len(sizes) - 1:  # names may list the solver state only
        names = [LATENT_FRAME, *names]
    if not sizes or len(names) != len(sizes) or sum(sizes) != len(payload):
        raise DeviceError("INTERNAL", f"bad frame table: sizes {sizes} names {names} for {len(payload)} B")
    frames, offset = [], 0
    for name, n in zip(names, sizes, strict=True):
        frames.append((name, payload[offset : offset + n]))
        offset += n
    return frames


def solver_counter(name: str, value: torch.Tensor, total_steps: int) -> torch.Tensor:
    """A solver-state integer (sent as a one-element float frame, rounded: a lossy codec may blur it) as the
    scheduler keeps it; DeviceError INTERNAL when the frame holds anything but one number in [0, total_steps]."""
    number = float(value.reshape(-1)[0]) if value.numel() == 1 else math.nan
    if not -0.5 < number < total_steps + 0.5:  # also false for NaN
        shown = f"{number:g}" if value.numel() == 1 else f"{value.numel()} values"
        raise DeviceError("INTERNAL", f"bad solver state {name!r}: {shown}, expected one count in [0, {total_steps}]")
    return torch.tensor(int(round(number)))


def decode_frames(
    frames: list[tuple[str, bytes]], accepted: edge_pb2.Accepted, device: str, dtype: torch.dtype
) -> BranchPoint:
    """Decode the latent and the solver state into the branch point the device continues from."""
    try:
        codec = LatentCodec(CodecSpec(accepted.codec))
        tensors = [(name, codec.decode(frame)) for name, frame in frames]
    except CodecError as exc:
        raise DeviceError("DATA_LOSS", f"latent frame does not decode: {exc}") from None
    latent = tensors[0][1]
    if tuple(latent.shape) != tuple(accepted.latent_shape):
        raise DeviceError("INTERNAL", f"latent shape {tuple(latent.shape)} != announced {tuple(accepted.latent_shape)}")
    state: dict[str, torch.Tensor] = {}
    for name, value in tensors[1:]:
        if name in SOLVER_COUNTERS:
            state[name] = solver_counter(name, value, accepted.total_steps)
        else:
            state[name] = value.to(device=device, dtype=dtype)
    return BranchPoint(latent.to(device=device, dtype=dtype), accepted.branch_step, state)


def branch_config(accepted: edge_pb2.Accepted, scale: int) -> SamplingConfig:
    """The sampling settings the server announced, as the device's branch phase needs them."""
    try:
        return SamplingConfig(
            steps=accepted.total_steps,
            guidance=accepted.guidance,
            shared_steps=accepted.branch_step,
            scheduler=accepted.scheduler or "ddim",
            height=accepted.latent_shape[2] * scale,
            width=accepted.latent_shape[3] * scale,
            negative_prompt=accepted.negative_prompt,
        )
    except ValueError as exc:
        raise DeviceError("INTERNAL", f"server announced settings the device cannot run: {exc}") from None


# ---------------------------------------------------------------------------------------------------- client


class DeviceClient:
    """One device: a model, a channel to the edge server, `generate(prompt) -> DeviceResult`. Thread-safe.

    Without a `model` it loads the configured one, and first reaches the server (`connect`) when one is configured
    and fallback_local is off: an unreachable server, or one that is no edge server or refuses this device's
    credentials, is a DeviceError within connect_timeout_s, before the slow load. (With fallback_local the model is
    needed either way, and an unreachable server is found on the first request.)"""

    def __init__(self, config: DeviceConfig, model: DeviceModel | Any | None = None):
        self.config = config
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self._reachable = False
        try:
            if model is None:
                if config.server is not None and not config.fallback_local:
                    self.connect()
                model = DeviceModel.load(config)
            elif not isinstance(model, DeviceModel):
                model = DeviceModel.wrap(model, config)
        except BaseException:
            self.close()  # no channel outlives a client that was never made
            raise
        self.model = model

    # -- channel --

    def _stub(self) -> edge_pb2_grpc.EdgeSamplerStub:
        """A stub on a channel known to reach the server, or DeviceError UNAVAILABLE within connect_timeout_s.
        Reachability is probed once per channel with GetServerInfo (wait_for_ready), not with a connectivity
        subscription, whose polling thread outlives closed channels. A server that answers the probe with
        UNIMPLEMENTED (no edge server), UNAUTHENTICATED or PERMISSION_DENIED is that DeviceError at once (a request
        would end the same way); any other answer means it is reachable."""
        c = self.config
        if c.server is None:
            raise DeviceError("UNAVAILABLE", "no edge server configured")
        with self._lock:
            if self._channel is None:
                self._channel = make_channel(
                    c.server,
                    tls=c.tls,
                    ca_file=c.tls_ca,
                    cert_file=c.tls_cert,
                    key_file=c.tls_key,
                    server_name=c.tls_server_name,
                    token=c.token,
                    options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                             *retry_options(c.retries, c.retry_backoff_s)],
                )
            stub = edge_pb2_grpc.EdgeSamplerStub(self._channel)
        if not self._reachable:
            try:
                stub.GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=c.connect_timeout_s, wait_for_ready=True)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise DeviceError(
                        "UNAVAILABLE", f"edge server {c.server} unreachable within {c.connect_timeout_s:g} s"
                    ) from None
                if exc.code() in REFUSING_PROBE:
                    error = rpc_error(exc)
                    hint = NOT_AN_EDGE_SERVER if exc.code() == grpc.StatusCode.UNIMPLEMENTED else ""
                    message = f"edge server {c.server} refused GetServerInfo: {error.message}{hint}"
                    raise DeviceError(error.code, message) from None
            self._reachable = True
        return stub

    def connect(self) -> None:
        """Reach the server now rather than on the first request (DeviceError UNAVAILABLE if it cannot)."""
        self._stub()

    def close(self) -> None:
        """Close the channel (the model stays loaded)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._reachable = False

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_info(self) -> edge_pb2.ServerInfo:
        """What the server runs (fingerprint, defaults, codecs)."""
        try:
            return self._stub().GetServerInfo(edge_pb2.ServerInfoRequest(), timeout=self.config.connect_timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.model.fingerprint) from None

    # -- the two halves --

    def build_request(self, prompt: str, seed: int | None = None, negative_prompt: str = "") -> edge_pb2.ImageRequest:
        """The ImageRequest for a prompt (and its negative prompt) under this device's configuration."""
        c = self.config
        req = edge_pb2.ImageRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=c.steps,
            accepted_codecs=list(c.accepted_codecs),
            height=c.height,
            width=c.width,
            scheduler=c.scheduler,
            model_fingerprint=self.model.fingerprint,
            client_id=c.client_id,
        )
        if seed is not None:
            req.seed = seed
        if c.guidance is not None:
            req.guidance = c.guidance
        if c.share is not None:
            req.share = c.share
        return req

    def request_latent(self, prompt: str, seed: int | None = None, negative_prompt: str | None = "") -> ReceivedLatent:
        """Ask the server for this prompt's branch point; verify and decode it. `negative_prompt` None is none."""
        negative_prompt = negative_text(negative_prompt)
        t0 = time.perf_counter()
        stub = self._stub()
        t_conn = time.perf_counter()
        call = stub.RequestImage(self.build_request(prompt, seed, negative_prompt), timeout=self.config.timeout_s)
        try:
            accepted, done, payload, wire, t_acc = collect_stream(
                call, self.model.fingerprint, self.config, negative_prompt
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._reachable = False
            error = rpc_error(exc, self.model.fingerprint)
            waited = time.perf_counter() - t_conn
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and waited >= self.config.timeout_s:
                limit = f"{self.config.timeout_s:g} s (timeout_s, --timeout)"
                error = DeviceError(error.code, f"no latent within this device's timeout of {limit}: {error.message}")
            raise error from None
        except DeviceError:
            call.cancel()
            raise
        t_recv = time.perf_counter()
        frames = verify_payload(payload, done)
        point = decode_frames(frames, accepted, self.config.device, self.model.pipe.unet.dtype)
        t_dec = time.perf_counter()
        timings = {
            "connect": (t_conn - t0) * 1e3,
            "wait_accepted": (t_acc - t_conn) * 1e3,
            "stream": (t_recv - t_acc) * 1e3,
            "verify_decode": (t_dec - t_recv) * 1e3,
            "server_queue_wait": done.queue_wait_ms,
            "server_shared_phase": done.shared_phase_ms,
        }
        return ReceivedLatent(accepted, done, point, len(payload), wire, timings)

    def finish(self, prompt: str, received: ReceivedLatent) -> DeviceResult:
        """Branch phase for this device's prompt from the received point (under the negative prompt the server
        announced, the request's), then VAE decode."""
        pipe, acc = self.model.pipe, received.accepted
        config = branch_config(acc, pipe.vae_scale_factor)
        t0 = time.perf_counter()
        with self.model.text_lock:
            cond, uncond = encode_prompts(pipe, [prompt], config.negative_prompt)
        counter = UNetCounter()
        final = branch_phase(
            pipe.unet, pipe.scheduler.config, [received.point], [cond], uncond, config, counter, labels=[acc.group_id]
        )
        t1 = time.perf_counter()
        image = to_pil(decode_latents(pipe, final)[0])
        t2 = time.perf_counter()
        timings = {**received.timings_ms, "branch_phase": (t1 - t0) * 1e3, "vae_decode": (t2 - t1) * 1e3}
        metadata = {
            "mode": "edge",
            "prompt": prompt,
            "negative_prompt": acc.negative_prompt,
            "seed": acc.seed,
            "server": self.config.server,
            "request_id": acc.request_id,
            "group_id": acc.group_id,
            "group_size": acc.group_size,
            "min_similarity": round(float(acc.min_similarity), 6),
            "branch_step": acc.branch_step,
            "total_steps": acc.total_steps,
            "scheduler": acc.scheduler or "ddim",
            "guidance": float(acc.guidance),
            "model_fingerprint": self.model.fingerprint,
            "adapter": self.model.adapter,
            "codec": acc.codec,
            "latent_shape": list(acc.latent_shape),
            "payload_bytes": received.payload_bytes,
            "wire_bytes": received.wire_bytes,
            "device_unet_evals": counter.total,
        }
        return DeviceResult(image, metadata, final, timings, received.payload_bytes)

    # -- public entry points --

    def generate(self, prompt: str, seed: int | None = None, negative_prompt: str | None = "") -> DeviceResult:
        """An image for `prompt` (guided away from `negative_prompt`, as diffusers' argument; None is none)
        through the edge server; with fallback_local, locally when it is unreachable."""
        t0 = time.perf_counter()
        try:
            received = self.request_latent(prompt, seed, negative_prompt)
        except DeviceError as exc:
            if not (self.config.fallback_local and exc.code == "UNAVAILABLE"):
                raise
            result = self._sample_local(prompt, seed, exc.message, negative_prompt)
        else:
            try:
                result = self.finish(prompt, received)
            except (RuntimeError, ValueError) as exc:  # a torch or model failure on the device: one clear error
                if isinstance(exc, DeviceError):
                    raise
                raise DeviceError(
                    "INTERNAL", f"branch phase on the device failed: {type(exc).__name__}: {exc}"
                ) from exc
        return self._finish_metadata(result, prompt, negative_prompt, t0)

    def _finish_metadata(
        self, result: DeviceResult, prompt: str, negative_prompt: str | None, t0: float
    ) -> DeviceResult:
        """`result` with its total time since `t0` and the tokens the text encoder ignored in its metadata."""
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        result.metadata["timings_ms"] = {k: round(v, 3) for k, v in result.timings_ms.items()}
        overlong = overlong_prompts(self.model.pipe.tokenizer, [prompt, negative_text(negative_prompt)])
        for i, key in enumerate(("ignored_tokens", "negative_prompt_ignored_tokens")):
            if i in overlong:  # the text encoder read only the text's start, on the server and here
                result.metadata[key] = overlong[i]
        return result

    async def generate_async(
        self, prompt: str, seed: int | None = None, negative_prompt: str | None = ""
    ) -> DeviceResult:
        """`generate` in a worker thread, for asyncio callers."""
        return await asyncio.to_thread(self.generate, prompt, seed, negative_prompt)

    def local_config(self, negative_prompt: str = "") -> SamplingConfig:
        """Sampling settings for fully local generation: this device's request fields, else core defaults."""
        c = self.config
        kwargs: dict[str, Any] = {"share": 0.0, "negative_prompt": negative_prompt}
        if c.steps:
            kwargs["steps"] = c.steps
        if c.guidance is not None:
            kwargs["guidance"] = c.guidance
        if c.scheduler:
            kwargs["scheduler"] = c.scheduler
        kwargs["height"], kwargs["width"] = c.height or None, c.width or None
        return SamplingConfig(**kwargs)

    def generate_local(
        self, prompt: str, seed: int | None = None, reason: str = "", negative_prompt: str | None = ""
    ) -> DeviceResult:
        """Fully local sampling of one prompt (a group of one): the image sage_core.generate makes, with its metadata
        as `generate` gives it."""
        t0 = time.perf_counter()
        return self._finish_metadata(self._sample_local(prompt, seed, reason, negative_prompt), prompt,
                                     negative_prompt, t0)

    def _sample_local(self, prompt: str, seed: int | None, reason: str, negative_prompt: str | None) -> DeviceResult:
        """`generate_local`'s image and metadata without the total time and ignored-token counts."""
        negative_prompt = negative_text(negative_prompt)
        seed = seed if seed is not None else secrets.randbits(31)
        config = self.local_config(negative_prompt)
        t0 = time.perf_counter()
        out = generate(self.model.pipe, [prompt], config, GroupingConfig(), seed=seed, groups=[[0]])
        timings = {"local_sampling": (time.perf_counter() - t0) * 1e3}
        metadata = {
            "mode": "local-fallback" if reason else "local",
            "fallback_reason": reason,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "group_size": 1,
            "branch_step": 0,
            "total_steps": config.steps,
            "scheduler": config.scheduler,
            "guidance": config.guidance,
            "model_fingerprint": self.model.fingerprint,
            "adapter": self.model.adapter,
            "codec": "",
            "payload_bytes": 0,
            "wire_bytes": 0,
            "device_unet_evals": out.counter.total,
        }
        return DeviceResult(to_pil(out.images[0]), metadata, out.latents, timings, 0)


def rpc_error(exc: grpc.RpcError, fingerprint: str = "?") -> DeviceError:
    """A DeviceError with the gRPC status code of a failed call and a one-line message (`fingerprint`: the device
    model's, named when the server refused it)."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    details = " ".join(details.split())
    if name == "FAILED_PRECONDITION":
        return DeviceError(name, f"server refused (device model fingerprint {fingerprint}): {details}")
    if name == "UNAVAILABLE":
        return DeviceError(name, f"edge server unavailable: {details}")
    return DeviceError(name, details)

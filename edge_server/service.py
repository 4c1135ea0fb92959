"""The gRPC front end (thin): translate protobuf <-> engine dataclasses, stream results, map errors to status
codes; plus grpc.health.v1 health checking, server reflection, Ray start-up and graceful shutdown.

Stream of one RequestImage call: ImageResponse{accepted}, ImageResponse{chunk} x n (payload slices of at most
`chunk_size` bytes, index 0..n-1), ImageResponse{done} with the payload's sha256, its codec frame sizes and
names, and the request's metrics. Any failure ends the call with a gRPC status and a message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_server.config import BUILTIN_MODELS, ConfigError, ServerConfig
from edge_server.engine import (
    Delivery,
    Engine,
    EngineError,
    ImageSpec,
    Ticket,
    clip,
    first_line,
    worker_error_line,
)
from edge_server.metrics import EdgeMetrics
from edge_server.security import TokenAuthInterceptor, TokenTable, load_token_table, server_credentials
from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger("sage_edge.service")
T = TypeVar("T")
SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeSampler"].full_name
VERSION = "0.1.0"
LISTENING_MARKER = "SAGE_EDGE_LISTENING"
METRICS_MARKER = "SAGE_EDGE_METRICS"
DEADLINE_SLACK_S = 0.1
RAY_PROBE_TIMEOUT_S = 3.0  # a TCP connect to a cluster's GCS before ray.init (which retries an absent one forever)
RAY_THREAD = "ray-calls"  # the name of the one thread that calls ray.init and ray.shutdown (ray_thread)
RAY_STOP_WAIT_S = 15.0  # after a signal, how long a ray.init or ray.shutdown still in progress may take
MIN_CLIENT_PING_INTERVAL_MS = 1000  # clients' HTTP/2 keepalive pings at most this often are welcome (see grpc_options)


@dataclass(frozen=True)
class MalformedRequest:
    """A request body that does not parse as its method's message (a string field that is not UTF-8, a corrupt
    wire format): the servicer ends such a call with INVALID_ARGUMENT, where grpc's own parse failure is UNKNOWN
    with a Python exception in its details."""

    message_type: str
    reason: str

    def status_message(self) -> str:
        """The INVALID_ARGUMENT details."""
        return f"malformed {self.message_type}: {self.reason}"


def lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """A request deserializer for `message_class` that returns a MalformedRequest instead of raising."""

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, clip(first_line(exc), 200))

    return parse


def add_edge_sampler(servicer: edge_pb2_grpc.EdgeSamplerServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as edge_pb2_grpc.add_EdgeSamplerServicer_to_server does, with lenient_parser request
    deserializers (each method's handler must check for a MalformedRequest)."""
    handlers = {
        "RequestImage": grpc.unary_stream_rpc_method_handler(
            servicer.RequestImage,
            request_deserializer=lenient_parser(edge_pb2.ImageRequest),
            response_serializer=edge_pb2.ImageResponse.SerializeToString,
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=lenient_parser(edge_pb2.ServerInfoRequest),
            response_serializer=edge_pb2.ServerInfo.SerializeToString,
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=lenient_parser(edge_pb2.StatsRequest),
            response_serializer=edge_pb2.ServerStats.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def refuse_malformed(request: Message | MalformedRequest, context: grpc.aio.ServicerContext) -> None:
    """End the call with INVALID_ARGUMENT when its request did not parse."""
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.status_message())


def to_spec(request: edge_pb2.ImageRequest) -> ImageSpec:
    """Protobuf -> engine dataclass (unset optional fields become None)."""
    return ImageSpec(
        prompt=request.prompt,
        steps=request.steps,
        guidance=request.guidance if request.HasField("guidance") else None,
        seed=request.seed if request.HasField("seed") else None,
        share=request.share if request.HasField("share") else None,
        accepted_codecs=tuple(request.accepted_codecs),
        height=request.height,
        width=request.width,
        scheduler=request.scheduler,
        model_fingerprint=request.model_fingerprint,
        client_id=request.client_id,
        negative_prompt=request.negative_prompt,
    )


def peer_host(peer: str) -> str:
    """The host of a gRPC peer, the key of max_streams_per_host: an IPv4 address ('ipv4:10.0.0.5:40001' ->
    '10.0.0.5'); an IPv6 address's /64 network ('ipv6:[2001:db8::7]:40001' -> '2001:db8::/64': a host is handed a
    whole /64 and may send from any address in it), an IPv4-mapped one as its IPv4 address; 'unix' for every
    unix-socket peer (all on this machine); any other form whole (its first 256 characters)."""
    kind, _, rest = peer.partition(":")
    if kind.startswith("unix"):
        return "unix"
    rest = urllib.parse.unquote(rest)  # grpcio writes an IPv6 peer URI-escaped: 'ipv6:%5B::1%5D:40001'
    try:
        address = ipaddress.ip_address(rest.rpartition(":")[0].strip("[]").split("%")[0])  # no port, no IPv6 zone
    except ValueError:
        return peer[:256]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def accepted_message(d: Delivery) -> edge_pb2.ImageResponse:
    """The first message of a stream: the group the request joined and how to continue."""
    return edge_pb2.ImageResponse(
        accepted=edge_pb2.Accepted(
            request_id=d.request_id,
            group_id=d.group_id,
            group_size=d.group_size,
            branch_step=d.branch_step,
            total_steps=d.total_steps,
            scheduler=d.scheduler,
            model_fingerprint="",  # filled by the servicer
            guidance=d.guidance,
            seed=d.seed,
            codec=d.payload.codec,
            latent_shape=list(d.latent_shape),
            min_similarity=d.min_similarity,
            cached_steps=d.cached_steps,
            negative_prompt=d.negative_prompt,
        )
    )


@dataclass
class _Call:
    """One admitted RequestImage call as the servicer finishes it: its final status, payload bytes written, and
    what its log line says about its group (kept apart from the Delivery, so that the payload is not held)."""

    ticket: Ticket
    started: float
    status: str = "CANCELLED"
    sent: int = 0
    queue_wait_s: float | None = None
    group_fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    def delivered(self, d: Delivery) -> None:
        """Note the request's group (for its log line) and its queue wait (for the metrics)."""
        self.queue_wait_s = d.queue_wait_ms / 1000.0
        self.group_fields = {
            "group_id": d.group_id,
            "group_size": d.group_size,
            "codec": d.payload.codec,
            "queue_wait_ms": round(d.queue_wait_ms, 2),
            "shared_phase_ms": round(d.shared_phase_ms, 2),
        }


class EdgeSamplerServicer(edge_pb2_grpc.EdgeSamplerServicer):
    """RequestImage, GetServerInfo and GetStats over an Engine."""

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig,
        tokens: TokenTable | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.tokens = tokens  # set: the authenticated client id replaces the request's (per-client stream cap)
        self.metrics = metrics

    def _spec(self, request: edge_pb2.ImageRequest, context: grpc.aio.ServicerContext) -> ImageSpec:
        """The engine's view of a request; with token auth its client id is the one the token authenticates, and
        without, a request that names none is counted by its connection (`peer:` and the gRPC peer), so that
        anonymous devices do not share one per-client stream cap. Its host (peer_host) is the key of the per-host
        cap, which a device cannot choose."""
        spec = dataclasses.replace(to_spec(request), host=peer_host(context.peer()))
        if self.tokens is not None:
            client_id = self.tokens.client_from_metadata(context.invocation_metadata())
            spec = dataclasses.replace(spec, client_id=client_id or "")
        elif not spec.client_id:
            spec = dataclasses.replace(spec, client_id=f"peer:{context.peer()}"[:256])
        return spec

    async def RequestImage(  # noqa: N802 - gRPC method name
        self, request: edge_pb2.ImageRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Admit, wait for the group's branch point, stream it; errors end the call with a status. The whole call,
        the stream included, ends by the request's deadline: a device that stops reading (alive, so the keepalive
        does not end its connection) cannot hold its queue, client and host slots past --max-deadline-s."""
        started = time.monotonic()
        try:
            if isinstance(request, MalformedRequest):
                raise self.engine.reject(EngineError("INVALID_ARGUMENT", request.status_message()))
            ticket = self.engine.admit(self._spec(request, context), context.time_remaining())
        except EngineError as exc:
            if self.metrics is not None:
                self.metrics.observe_request(exc.code, 0, None)
            client_id = "" if isinstance(request, MalformedRequest) else clip(request.client_id, 256)
            fields = {"client_id": client_id, "peer": context.peer(), "code": exc.code, "error": exc.message}
            log.info("request_rejected", extra={"fields": fields})
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        if self.metrics is not None:
            self.metrics.active.inc()
        call = _Call(ticket, started)
        try:
            try:
                delivery = await self.engine.wait(ticket)
            except EngineError as exc:
                call.status = exc.code
                await context.abort(grpc.StatusCode[exc.code], exc.message)
            call.delivered(delivery)
            try:
                async with asyncio.timeout(ticket.deadline - time.monotonic()):
                    await self._stream(delivery, context, call)
            except TimeoutError:  # the device reads too slowly: end the call (`finally` frees its slots now)
                call.status = "DEADLINE_EXCEEDED"
                # the status follows the bytes already handed to gRPC, so the device sees it once it reads them;
                # returning (rather than aborting) leaves that wait to gRPC, with no payload held here
                context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
                context.set_details("deadline passed while the latent was streaming (the device read too slowly)")
                return
            call.status = "OK"
        finally:
            if call.status == "CANCELLED" and time.monotonic() >= ticket.deadline - DEADLINE_SLACK_S:
                call.status = "DEADLINE_EXCEEDED"  # the client's clock fired first and cancelled the call
            elif call.status == "CANCELLED" and self.engine.closed:
                call.status = "UNAVAILABLE"  # cut by the server's stop after the grace period: what the device sees
            self._finish(call)

    async def _stream(self, delivery: Delivery, context: grpc.aio.ServicerContext, call: _Call) -> None:
        """Accepted, the payload in chunks, Done; `call.sent` counts the payload bytes written."""
        message = accepted_message(delivery)
        message.accepted.model_fingerprint = self.engine.info.fingerprint
        await context.write(message)
        data = delivery.payload.data
        chunks = range(0, len(data), self.config.chunk_size)  # no empty chunk: a device refuses one
        for index, lo in enumerate(chunks):
            piece = data[lo : lo + self.config.chunk_size]
            await context.write(edge_pb2.ImageResponse(chunk=edge_pb2.LatentChunk(index=index, data=piece)))
            call.sent += len(piece)
        await context.write(
            edge_pb2.ImageResponse(
                done=edge_pb2.Done(
                    chunks=len(chunks),
                    total_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    frame_sizes=list(delivery.payload.frame_sizes),
                    frame_names=list(delivery.payload.frame_names),
                    queue_wait_ms=delivery.queue_wait_ms,
                    shared_phase_ms=delivery.shared_phase_ms,
                )
            )
        )

    def _finish(self, call: _Call) -> None:
        """Release the request in the engine, count and log it with its final status (once per call: RequestImage's
        `finally`)."""
        self.engine.release(call.ticket, call.status, call.sent)
        if self.metrics is not None:
            self.metrics.observe_request(call.status, call.sent, call.queue_wait_s)
            self.metrics.active.dec()
        fields: dict[str, Any] = {
            "request_id": call.ticket.request_id,
            "client_id": call.ticket.request.client_id,
            "status": call.status,
            "total_ms": round((time.monotonic() - call.started) * 1000.0, 2),
            "bytes": call.sent,
            **call.group_fields,
        }
        log.info("request_done", extra={"fields": fields})

    async def GetServerInfo(  # noqa: N802
        self, request: edge_pb2.ServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> edge_pb2.ServerInfo:
        """Model fingerprint, scheduler config, defaults, codecs and admission limits."""
        await refuse_malformed(request, context)
        c, info = self.config, self.engine.info
        return edge_pb2.ServerInfo(
            version=VERSION,
            model_fingerprint=info.fingerprint,
            scheduler_config_json=info.scheduler_config_json,
            default_steps=c.default_steps,
            default_guidance=c.default_guidance,
            default_share=c.default_share,
            codecs=list(c.codecs),
            max_batch=c.max_batch,
            max_wait_ms=c.max_wait_ms,
            max_steps=c.max_steps,
            max_prompt_chars=c.max_prompt_chars,
            max_image_side=c.max_image_side,
            chunk_size=c.chunk_size,
            default_height=info.default_height,
            default_width=info.default_width,
        )

    async def GetStats(  # noqa: N802
        self, request: edge_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> edge_pb2.ServerStats:
        """The engine's live counters."""
        await refuse_malformed(request, context)
        return edge_pb2.ServerStats(**self.engine.stats())


# ---- logging -------------------------------------------------------------------------------------------------
class _Formatter(logging.Formatter):
    """One line per record: JSON objects (`json`) or `time level logger event key=value ...` (`text`)."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        if self.as_json:
            entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
            entry.update(event=record.getMessage(), **fields)
            if record.exc_info:
                entry["exc"] = self.formatException(record.exc_info)
            return json.dumps(entry, default=str)
        tail = " ".join(f"{k}={one_line(str(v))}" for k, v in fields.items())
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()} {tail}".rstrip()
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def one_line(text: str) -> str:
    """`text` with every character that is not printable (a newline, a carriage return, an escape ...) written as
    its Python escape: a text log field may hold a client's value (its client id), which must not be able to end
    the record's line and forge another."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def setup_logging(config: ServerConfig) -> None:
    """Structured logs on stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(config.log_format == "json"))
    root = logging.getLogger("sage_edge")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


# ---- Ray -----------------------------------------------------------------------------------------------------
def init_ray(config: ServerConfig) -> bool:
    """Join the cluster at `ray_address` ("auto", host:port or ray://host:port) or start a small local Ray bound to
    127.0.0.1. Returns True when this process started Ray (and so must shut it down). ConfigError when the cluster
    cannot be reached (checked with a TCP connect first: ray.init waits forever for an absent GCS)."""
    import ray

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(config.ray_num_cpus)}}
    common: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True, "configure_logging": False}
    quiet_ray_driver()
    if config.ray_address is None:
        ray.init(
            num_cpus=config.ray_num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            namespace="sage-edge",
            **common,
        )
        return True
    probe_ray(config.ray_address)
    try:
        ray.init(address=config.ray_address, namespace="sage-edge", **common)
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach Ray at {config.ray_address} ({first_line(exc)}){auth_hint()}") from exc
    return False


class _DropRayThreadWarning(logging.Filter):
    """Drops Ray's 'SIGTERM handler is not set because current thread is not the main thread': ray.init runs on
    the server's Ray thread, and the server handles SIGTERM itself (stop_requested)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def quiet_ray_driver() -> None:
    """Keep Ray's native failure-signal handler (Abseil's) out of this process, unless the environment sets
    RAY_DISABLE_FAILURE_SIGNAL_HANDLER itself: it takes the SIGTERM that stops the server for a crash and prints
    a native stack dump (twice) before the clean shutdown. Ray's own processes keep theirs. Also drops Ray's
    warning that ray.init is not on the main thread."""
    from ray._private import ray_constants

    if "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" not in os.environ:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read by ray.init's core worker, not at import
    worker_log = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _DropRayThreadWarning) for f in worker_log.filters):
        worker_log.addFilter(_DropRayThreadWarning())


def auth_hint() -> str:
    """What to add to a failed join whose cluster port answered: Ray sends its token only under
    RAY_AUTH_MODE=token, and a cluster started with token auth refuses a process without it."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; its port answers, so if the cluster uses token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "~/.ray/auth_token) for this server too")


def ray_target(address: str) -> tuple[str, int]:
    """(host, port) that a `ray_address` names; "auto" is resolved as ray.init does (RAY_ADDRESS, then the address
    the last `ray start` recorded, then a running GCS). ConfigError when there is none or it is not host:port."""
    target = address.split("://", 1)[1] if "://" in address else address
    if target == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"cannot reach Ray at {address} ({first_line(exc)})") from exc
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray_address must be 'auto', host:port or ray://host:port, got {address!r}")
    return host.strip("[]"), int(port)


def probe_ray(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """ConfigError unless a TCP connection to the cluster `address` names opens within `timeout_s`."""
    host, port = ray_target(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        where = "" if f"{host}:{port}" in address else f"{host}:{port}: "
        raise ConfigError(f"cannot reach Ray at {address} ({where}{exc.strerror or exc})") from exc


def _gcs_address() -> str:
    """The address of the Ray cluster this process is connected to."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


async def start_workers(config: ServerConfig) -> tuple[list[Any], list[Any]]:
    """Create the worker actors and wait until each has loaded the model; returns (handles, infos)."""
    from ray.exceptions import RayActorError

    from edge_server.worker import make_worker_actor, worker_slots

    if config.ray_address is None and config.num_workers > (slots := worker_slots()):  # would wait forever
        raise ConfigError(
            f"num_workers {config.num_workers} needs one GPU (without one: one CPU) per worker and the local Ray has "
            f"{slots}: lower --num-workers or raise --ray-num-cpus"
        )
    workers = [make_worker_actor(config, first_start=True) for _ in range(config.num_workers)]
    try:
        failures = await asyncio.gather(*(asyncio.wrap_future(w.failure.remote().future()) for w in workers))
        if failure := next((f for f in failures if f), ""):  # a model pin that does not match, a foreign adapter
            raise ConfigError(f"the model worker could not start: {failure}")
        infos = await asyncio.gather(*(asyncio.wrap_future(w.info.remote().future()) for w in workers))
    except RayActorError as exc:  # the actor's __init__ raised anyway (out of memory, a broken install ...)
        raise ConfigError(f"the model worker could not start: {actor_error_reason(exc)}") from exc
    return workers, list(infos)


def preflight_files(config: ServerConfig) -> None:
    """ConfigError when the model or adapter folder the config names cannot be used (checked where they are read)."""
    from sage_core.adapters import ADAPTER_AUTO, ADAPTER_NONE, read_adapter_shapes
    from sage_core.models import ModelError, check_pipeline_folder

    try:
        if config.model not in BUILTIN_MODELS:
            check_pipeline_folder(Path(config.model), config.model_config)
        if config.adapter not in (ADAPTER_AUTO, ADAPTER_NONE):
            read_adapter_shapes(config.adapter)
    except ModelError as exc:
        raise ConfigError(str(exc)) from exc


def actor_error_reason(exc: BaseException) -> str:
    """The message of a Ray actor error's own exception (engine.worker_error_line), else the error's last line."""
    line = worker_error_line(exc)
    if line is not None:
        return line.partition(": ")[2]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# ---- server --------------------------------------------------------------------------------------------------
def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel options. Clients may send keepalive pings every MIN_CLIENT_PING_INTERVAL_MS, also
    without a call open: gRPC's default allows one per 5 minutes while the server sends nothing, and after the
    third earlier one it closes the connection (GOAWAY too_many_pings), so a device with a keepalive of seconds
    lost its request as UNAVAILABLE while it waited for a shared phase. The server pings a connection quiet for
    `keepalive_s` and closes it when no answer comes within `keepalive_timeout_s`, so a device that vanished
    without closing its connection gives back its queue slot then, not at its deadline (gRPC's default keepalive
    is 2 hours; grpcio 1.85 times a keepalive ping out by `grpc.http2.ping_timeout_ms`, not by
    `grpc.keepalive_timeout_ms` alone, so both are set)."""
    timeout_ms = round(config.keepalive_timeout_s * 1000)
    return [
        ("grpc.max_send_message_length", 8 * 2**20),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", round(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]


def bind_port(server: grpc.aio.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the gRPC port (0: a free one) and return it; ConfigError when host:port cannot be bound."""
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc raises where older versions returned 0
        port = 0
    if port == 0:
        raise ConfigError(f"cannot bind {address}: the port is in use or the host is not an address of this machine")
    return port


def probe_bind(host: str, port: int, what: str) -> None:
    """ConfigError when `host:port` cannot be bound now (a quick bind with SO_REUSEADDR, as grpc binds, released at
    once), so that a port in use is found before Ray starts and the model loads; port 0 always can."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot {what} {host}:{port}: {exc.strerror or exc}") from exc
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                return
            except OSError as exc:
                errors.append(exc)
    reason = errors[0].strerror if errors else "no address"
    raise ConfigError(f"cannot {what} {host}:{port}: {reason}")


def serve_metrics(metrics: EdgeMetrics, config: ServerConfig) -> int:
    """Serve /metrics on metrics_host:metrics_port and return the port; ConfigError when it cannot be bound."""
    try:
        http, _ = metrics.serve(config.metrics_host, config.metrics_port or 0)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}") from exc
    return int(http.server_port)


async def serve(config: ServerConfig) -> int:
    """Run the edge server until SIGTERM/SIGINT; then drain gracefully. Returns the process exit code."""
    setup_logging(config)
    log.info("config", extra={"fields": {"config": config.to_json()}})
    tokens = load_token_table(config)  # read the secrets first: a bad file fails before Ray starts
    credentials = server_credentials(config)
    if config.ray_address is None:  # a local Ray reads the files here: say what is wrong before starting it
        preflight_files(config)
    probe_bind(config.host, config.port, "bind")
    if config.metrics_port is not None:
        probe_bind(config.metrics_host, config.metrics_port, "serve metrics on")
    stop = stop_on_signals()  # from here on: a signal during the start stops the server cleanly too
    thread = ray_thread()
    started_ray = await start_ray(config, stop, thread)
    if started_ray is None:
        log.info("stopped_during_start", extra={"fields": {"ray": "not started"}})
        return 0
    log.info("ray_ready", extra={"fields": {"started_local": started_ray, "gcs_address": _gcs_address()}})
    try:
        started = None if stop.is_set() else await unless_stopped(start_workers(config), stop)
        if started is None:
            log.info("stopped_during_start", extra={"fields": {"started_local_ray": started_ray}})
            return 0
        workers, infos = started
        from edge_server.worker import make_worker_actor

        metrics = EdgeMetrics()
        engine = Engine(config, workers, infos, lambda: make_worker_actor(config), metrics=metrics)
        engine.start()
        for i, info in enumerate(infos):
            log.info(
                "worker_ready",
                extra={"fields": {"worker": i, "pid": info.pid, "device": info.device, "model": info.fingerprint,
                                  **({"unet_warmup": info.unet_warmup} if info.unet_warmup else {})}},
            )
        interceptors = [TokenAuthInterceptor(tokens, metrics.observe_denied)] if tokens is not None else []
        server = grpc.aio.server(
            options=grpc_options(config),
            compression=grpc.Compression.NoCompression,
            interceptors=interceptors,
        )
        servicer = EdgeSamplerServicer(engine, config, tokens, metrics)
        add_edge_sampler(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = bind_port(server, config, credentials)
        if config.metrics_port is not None:
            metrics_port = serve_metrics(metrics, config)
            print(f"{METRICS_MARKER} host={config.metrics_host} port={metrics_port}", flush=True)
            log.info("metrics", extra={"fields": {"host": config.metrics_host, "port": metrics_port}})
        log.info(
            "security",
            extra={
                "fields": {
                    "tls": credentials is not None,
                    "mutual_tls": bool(config.tls_client_ca),
                    "token_auth": tokens is not None,
                }
            },
        )
        await server.start()
        await follow_availability(engine, health_servicer, stop)
        print(f"{LISTENING_MARKER} host={config.host} port={port}", flush=True)
        log.info("listening", extra={"fields": {"host": config.host, "port": port}})
        await stop.wait()
        log.info(
            "shutting_down",
            extra={"fields": {"grace_s": config.grace_s, "in_flight": engine.stats()["active_requests"]}},
        )
        await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING
        engine.stop_accepting()
        drained = await engine.drain(config.grace_s)
        await engine.close()  # requests still waiting end UNAVAILABLE with the reason, and are logged so
        await server.stop(grace=0.5)  # time for those statuses to reach their clients; then streams are cut
        await engine.drain(1.0)  # the cut streams' handlers release their requests
        log.info("stopped", extra={"fields": {"drained": drained, **engine.stats()}})
        return 0
    finally:
        await shutdown_ray(thread)


async def start_ray(
    config: ServerConfig, stop: asyncio.Event, thread: concurrent.futures.Executor
) -> bool | None:
    """init_ray in `thread`: its result, or None when a signal came first and ray.init then failed or did not
    return within RAY_STOP_WAIT_S (ray.init cannot be interrupted, and waits forever on a local Ray whose processes
    a process-group signal killed)."""
    init = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(thread, init_ray, config))
    if await unless_stopped(asyncio.shield(init), stop) is not None:
        return init.result()
    if await finished_within(init, RAY_STOP_WAIT_S) and init.exception() is None:
        return init.result()  # Ray is up: the caller stops it
    return None


async def shutdown_ray(thread: concurrent.futures.Executor) -> None:
    """ray.shutdown (a local Ray stops; a joined cluster only loses this driver and its workers), given up after
    RAY_STOP_WAIT_S: it waits forever on a local Ray whose processes were killed (a process-group signal)."""
    import ray

    shutdown = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(thread, ray.shutdown))
    if not await finished_within(shutdown, RAY_STOP_WAIT_S):
        log.warning("ray_shutdown_abandoned", extra={"fields": {"after_s": RAY_STOP_WAIT_S}})


def ray_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that calls ray.init and ray.shutdown. It must outlive the local Ray: Ray starts its processes
    with PR_SET_PDEATHSIG, which fires when the *thread* that started them ends. Never shut down: exit_now ends the
    process without joining it, so a Ray call that never returns cannot hold up the exit (asyncio.to_thread's pool
    is joined by asyncio.run)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=RAY_THREAD)


def ray_thread_started() -> bool:
    """Whether this process has started the `ray_thread` (a call there may hang, and the interpreter's exit joins
    the thread)."""
    return any(t.name.startswith(RAY_THREAD) for t in threading.enumerate())


async def follow_availability(engine: Engine, health_servicer: Any, stop: asyncio.Event) -> None:
    """Report SERVING on health now, and from then on NOT_SERVING while every model worker is being restarted
    (a load balancer then sends new devices elsewhere; requests that come anyway wait for the restart), SERVING
    once one is back; nothing after a stop was asked for (health then stays NOT_SERVING)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def report() -> None:  # the state when it runs: reports of quick changes may interleave
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if engine.available else health_pb2.HealthCheckResponse.NOT_SERVING
        if not stop.is_set():
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)

    def changed(_available: bool) -> None:
        task = loop.create_task(report())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    engine.on_availability = changed
    await report()


async def finished_within(task: asyncio.Future[Any], timeout_s: float) -> bool:
    """Whether `task` is done within `timeout_s` (it is not cancelled when not)."""
    await asyncio.wait({task}, timeout=timeout_s)
    return task.done()


def stop_on_signals() -> asyncio.Event:
    """An event set on the first SIGTERM or SIGINT (instead of the default handlers, which end the process at once
    and would leave a local Ray's workers behind)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested, stop)
    return stop


def stop_requested(stop: asyncio.Event) -> None:
    """Set `stop`, first cancelling any pending alarm: Ray's failure-signal handler (Abseil's), which sees SIGTERM
    before Python does, takes it for a crash, dumps a native stack and arms a 3 s alarm whose SIGALRM aborts the
    process (exit 134) unless it has ended by then, as a drain with requests in flight has not."""
    signal.alarm(0)
    stop.set()


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None when `stop` is set first (`work` is then cancelled)."""
    task, waiter = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None

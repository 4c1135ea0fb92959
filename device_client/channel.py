"""The device's gRPC channel to an edge server: plaintext, TLS (a CA file or the system roots), mutual TLS (a
client certificate and key), and a bearer token sent as `authorization: Bearer <token>` on every call.

A token is never logged and never travels in plaintext except to a loopback address (tests, a local server).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from sage_core.auth import parse_token_line

TOKEN_ENV = "SAGE_EDGE_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_RETRIES = 4  # gRPC caps a retry policy's maxAttempts at 5
MAX_BACKOFF_S = 8.0


def is_loopback(address: str) -> bool:
    """Whether host:port names this machine."""
    return address.rsplit(":", 1)[0] in LOOPBACK_HOSTS


def read_token(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> str | None:
    """A bearer token from `token_file` or else the environment variable `env`. The file's first line that is not
    blank or a `#` comment holds it, bare or as `client_id:token` (a line copied from the server's token file)."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file {token_file}: {exc}") from exc
        tokens = [parsed[1] for parsed in map(parse_token_line, lines) if parsed is not None]
        if not tokens or not tokens[0]:
            raise ValueError(f"the token file {token_file} holds no token")
        return tokens[0]
    return os.environ.get(env) or None


def _read(path: str | None, what: str) -> bytes | None:
    """A PEM file's bytes (None for no path); ValueError naming the option when unreadable."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from exc


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "_BearerToken(<hidden>)"

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


class _Details(grpc.ClientCallDetails):
    """ClientCallDetails with replaced metadata (for details objects that are not namedtuples)."""

    def __init__(self, base: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def retry_options(retries: int, backoff_s: float) -> list[tuple[str, Any]]:
    """Channel options whose service config retries RequestImage `retries` times on RESOURCE_EXHAUSTED (the
    server's "queue full; retry later", sent before any response, so a retry never repeats part of a stream), the
    n-th retry after a random wait of up to `backoff_s` x 2^(n-1) seconds (at most MAX_BACKOFF_S); none for 0."""
    if retries == 0:
        return []
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": f"{backoff_s:g}s",
        "maxBackoff": f"{MAX_BACKOFF_S:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
    }
    method = {"name": [{"service": "sage_edge.v1.EdgeSampler", "method": "RequestImage"}], "retryPolicy": policy}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps({"methodConfig": [method]}))]


def make_channel(
    address: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` or a CA / client certificate is given, mutual TLS with
    `cert_file` + `key_file`, `server_name` overriding the name checked in the server certificate."""
    use_tls = tls or bool(ca_file or cert_file)
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key (and a key its certificate)")
    if token is not None and not use_tls and not is_loopback(address):
        raise ValueError(f"refusing to send a bearer token in plaintext to {address}: enable TLS")
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    if use_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file, "tls_ca"),
            private_key=_read(key_file, "tls_key"),
            certificate_chain=_read(cert_file, "tls_cert"),
        )
        channel = grpc.secure_channel(address, credentials, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token is not None else channel

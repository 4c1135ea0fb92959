"""Transport security and authentication of the gRPC port (docs/deployment.md).

- TLS: `tls_cert` + `tls_key` (PEM) make the port TLS-only; `tls_client_ca` adds mutual TLS (a client must show a
  certificate that chains to that CA, or the handshake fails before any method runs).
- Tokens: `auth_tokens_file` holds one token per line, `token` or `client_id:token` (`#` comments, blank lines
  ignored). Every method but grpc.health.v1 (left open so load balancers and container health checks can probe it;
  it tells only SERVING / NOT_SERVING) needs the metadata `authorization: Bearer <token>`, else the call ends with
  UNAUTHENTICATED before the servicer runs, streaming methods included. Tokens are compared in constant time and
  never logged. The authenticated client id (the line's `client_id`, or `token-<8 hex of its SHA-256>`) replaces
  the request's self-declared `client_id` for the per-client stream cap.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from edge_server.config import ConfigError, ServerConfig
from sage_core.auth import parse_token_line

log = logging.getLogger("sage_edge.security")
AUTH_HEADER = "authorization"
BEARER = "bearer "
MIN_TOKEN_CHARS = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # no token needed (see the module docstring)


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming the setting when it is missing or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what}: {path} is not a PEM file")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with `tls_client_ca`) credentials for the gRPC port; None for plaintext."""
    if not config.tls_cert or not config.tls_key:
        return None
    pair = (read_pem(config.tls_key, "tls_key"), read_pem(config.tls_cert, "tls_cert"))
    client_ca = read_pem(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Accepted bearer tokens (as SHA-256 digests) and the client id each one authenticates."""

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            raise ConfigError("auth_tokens_file holds no token")
        self._entries = [(_digest(token), client_id) for client_id, token in entries]

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        """Lines `token` or `client_id:token`; ConfigError for short tokens or duplicates (never echoing them)."""
        entries: list[tuple[str, str]] = []
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"auth_tokens_file: cannot read {path}: {exc}") from exc
        for number, raw in enumerate(lines, 1):
            parsed = parse_token_line(raw)
            if parsed is None:
                continue
            client_id, token = parsed
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"auth_tokens_file {path} line {number}: token shorter than {MIN_TOKEN_CHARS}")
            entries.append((client_id or f"token-{_digest(token).hex()[:8]}", token))
        if len({_digest(t) for _, t in entries}) != len(entries):
            raise ConfigError(f"auth_tokens_file {path}: the same token appears twice")
        return cls(entries)

    def client_of(self, token: str) -> str | None:
        """The client id `token` authenticates, or None; compares against every entry in constant time."""
        probe = _digest(token)
        found: str | None = None
        for digest, client_id in self._entries:
            if hmac.compare_digest(probe, digest):
                found = client_id
        return found

    def client_from_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The client id of a call's `authorization: Bearer <token>` metadata, or None."""
        token = bearer_token(metadata)
        return None if token is None else self.client_of(token)


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[: len(BEARER)].lower() == BEARER:
                return text[len(BEARER) :].strip()
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without a valid bearer token, except grpc.health.v1."""

    def __init__(self, tokens: TokenTable, on_denied: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self.on_denied = on_denied  # e.g. a metrics hook, called with the status name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        if token is not None and self.tokens.client_of(token) is not None:
            return handler
        reason = "missing bearer token" if token is None else "invalid bearer token"
        log.info("auth_denied", extra={"fields": {"method": method, "reason": reason}})
        if self.on_denied is not None:
            self.on_denied("UNAUTHENTICATED")
        return _abort_handler(handler, f"{reason}: send metadata 'authorization: Bearer <token>'")


def load_token_table(config: ServerConfig) -> TokenTable | None:
    """The token table of `auth_tokens_file`, or None when token authentication is off."""
    return TokenTable.from_file(config.auth_tokens_file) if config.auth_tokens_file else None

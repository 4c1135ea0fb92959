"""The device's one typed configuration object, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from device_client.channel import MAX_BACKOFF_S, MAX_RETRIES, is_loopback
from sage_core.names import (  # noqa: F401  (ADAPTER_*, DEFAULT_ADAPTER_CHOICE re-exported for the CLIs)
    ADAPTER_AUTO,
    ADAPTER_NONE,
    CODEC_MODES,
    DEFAULT_ADAPTER_CHOICE,
    LOSSLESS_MODES,
    MAX_STEPS,
    SCHEDULER_NAMES,
)

TINY_MODEL = "tiny"  # sage_core.models.tiny_pipeline(seed=0), what a `--model tiny` server runs
DEFAULT_MODEL = "default"  # the shipped model, as a `--model default` server names it (the same as None)
DEFAULT_PAYLOAD_CAP = 80 * 2**20  # bytes of latent payload a device agrees to buffer
MAX_TIMEOUT_S = 86_400.0  # a day; gRPC turns a deadline past 2^63 ns into DEADLINE_EXCEEDED at once


def valid_address(address: str) -> bool:
    """Whether `address` is host:port with a host and a TCP port in [1, 65535]."""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


@dataclass(frozen=True)
class DeviceConfig:
    """What a device runs and asks for. Zero / None request fields mean "the server's default"."""

    server: str | None = None  # "host:port" of the edge server; None: local sampling only
    model: str | None = None  # pipeline folder or file, "tiny", or None / "default" for the shipped default model
    model_config: str | None = None  # with a single-file model: the folder of its component configs (SD v1.5's: None)
    adapter: str = DEFAULT_ADAPTER_CHOICE  # SAGE LoRA folder, "auto" (the shipped one if made for this model) or "none"
    device: str = "cpu"  # where the branch phase and the VAE run
    steps: int = 0
    guidance: float | None = None
    share: float | None = None
    scheduler: str = ""  # "" = server default (ddim)
    height: int = 0
    width: int = 0
    accepted_codecs: tuple[str, ...] = ()  # empty: any lossless mode
    fallback_local: bool = False  # sample fully locally when the server is unreachable
    client_id: str = ""
    connect_timeout_s: float = 10.0  # to reach the server
    timeout_s: float = 300.0  # whole request deadline (queueing + shared phase + stream)
    max_payload_bytes: int = DEFAULT_PAYLOAD_CAP
    retries: int = 3  # RequestImage tries again this often on RESOURCE_EXHAUSTED (queue full), by gRPC's retry policy
    retry_backoff_s: float = 1.0  # the first retry's backoff cap; it doubles per retry, up to 8 s (gRPC adds jitter)
    # transport security (device_client/channel.py): TLS with a CA file (or the system roots when only `tls`),
    # mutual TLS with a client certificate and key, and a bearer token (never printed: repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None  # name to check in the server certificate instead of the host
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_config is not None and self.model in (None, TINY_MODEL, DEFAULT_MODEL):
            raise ValueError(f"model_config is for a single-file model, not the {self.model or 'default'} model")
        if self.server is not None and not valid_address(self.server):
            raise ValueError(f"server must be host:port with a port in [1, 65535], got {self.server!r}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [0, {MAX_STEPS}] (0: server default), got {self.steps}")
        if self.share is not None and not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")
        if self.guidance is not None and not 0.0 <= self.guidance <= 100.0:
            raise ValueError(f"guidance must be in [0, 100], got {self.guidance}")
        if self.scheduler and self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        unknown = [c for c in self.accepted_codecs if c not in CODEC_MODES]
        if unknown:
            raise ValueError(f"unknown codec modes {unknown}; known: {', '.join(CODEC_MODES)}")
        for side in (self.height, self.width):
            if side and (side < 8 or side % 8):
                raise ValueError(f"height and width must be multiples of 8 (0: default), got {side}")
        for name, seconds in (("connect timeout", self.connect_timeout_s), ("timeout", self.timeout_s)):
            if not 0 < seconds <= MAX_TIMEOUT_S:  # also false for NaN; gRPC ends longer ones at once
                raise ValueError(f"{name} must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {seconds}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries must be in [0, {MAX_RETRIES}], got {self.retries}")
        if not 0 < self.retry_backoff_s <= MAX_BACKOFF_S:  # also false for NaN
            raise ValueError(f"retry_backoff_s must be in (0, {MAX_BACKOFF_S:g}], got {self.retry_backoff_s}")
        if self.max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        if self.tls_server_name and not self.uses_tls():
            raise ValueError("tls_server_name names the server certificate: it needs TLS (tls or tls_ca)")
        if self.token is not None and not self.token.strip():
            raise ValueError("token is empty")
        if self.token is not None and self.server is not None and not self.uses_tls() and not is_loopback(self.server):
            raise ValueError(f"refusing to send a bearer token in plaintext to {self.server}: enable TLS")

    def uses_tls(self) -> bool:
        """Whether the channel to the server is TLS."""
        return self.tls or bool(self.tls_ca or self.tls_cert)

    def codecs_to_accept(self) -> tuple[str, ...]:
        """The codec modes this device will decode (empty request list means lossless only)."""
        return self.accepted_codecs or LOSSLESS_MODES

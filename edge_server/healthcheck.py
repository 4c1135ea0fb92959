"""A grpc.health.v1 probe for container health checks: exit 0 when the server answers SERVING, 1 otherwise.

    python -m edge_server.healthcheck --address 127.0.0.1:50051
    python -m edge_server.healthcheck --address 127.0.0.1:50051 --tls-ca ca.pem --tls-cert c.pem --tls-key c.key

Health needs no token (edge_server.security); under mutual TLS the probe shows a client certificate like any
client. Each option defaults to an environment variable (SAGE_HEALTH_ADDRESS, SAGE_HEALTH_TLS_CA, _TLS_CERT,
_TLS_KEY, _TLS_SERVER_NAME), so a container image's fixed HEALTHCHECK line follows the deployment's TLS set-up.
Light on imports (grpc only) so it runs every few seconds without cost.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the probe."""
    p = argparse.ArgumentParser(prog="python -m edge_server.healthcheck", description=__doc__.split("\n")[0])
    env = lambda name, default=None: os.environ.get(f"SAGE_HEALTH_{name}") or default  # noqa: E731
    p.add_argument("--address", default=env("ADDRESS", "127.0.0.1:50051"), help="host:port of the edge server")
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds before the probe fails")
    p.add_argument("--tls-ca", default=env("TLS_CA"), help="PEM CA of the server certificate (enables TLS)")
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM key of --tls-cert")
    p.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME"), help="name to check in the certificate")
    return p.parse_args(argv)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, TLS or mutual-TLS channel as the options say; ValueError for half a client key pair."""
    if bool(args.tls_cert) != bool(args.tls_key):  # grpc would abort the process on a certificate without its key
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, creds, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(serving, one-line description) of one health check."""
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    except OSError as exc:
        return False, f"cannot read a TLS file: {exc}"
    except ValueError as exc:
        return False, str(exc)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    """Run one probe; print its result; 0 when SERVING."""
    ok, what = check(parse_args(argv))
    print(f"{'healthy' if ok else 'unhealthy'}: {what}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

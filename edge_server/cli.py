"""`sage-edge-server serve`: run the edge server (gRPC front end + engine + Ray workers).

    sage-edge-server serve --model tiny --port 0                 # local Ray (the embedded default)
    ray start --head --node-ip-address=127.0.0.1 --port=6379 --include-dashboard=false
    sage-edge-server serve --ray-address auto                    # join that cluster
    sage-edge-server serve --config edge.yaml --max-wait-ms 20   # file, then flags

On start it prints one machine-readable line `SAGE_EDGE_LISTENING host=H port=N` on stdout; logs go to stderr.
SIGTERM/SIGINT: health NOT_SERVING, new requests UNAVAILABLE, in-flight streams finish within --grace-s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from edge_server.config import ConfigError, build_config
from sage_core.names import MODEL_CONFIG_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """SAGE edge server."""


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", help="YAML or TOML file of ServerConfig settings")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port; 0 picks a free one")] = None,
    model: Annotated[
        str | None, typer.Option(help="'default', 'tiny', a diffusers pipeline folder or an SD v1.x .safetensors file")
    ] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="'auto', host:port or ray://host:port to join a cluster; unset: local Ray"),
    ] = None,
    ray_num_cpus: Annotated[
        int | None,
        typer.Option(help="CPUs of a local Ray; without a GPU, each worker's torch threads (joined clusters too)"),
    ] = None,
    num_workers: Annotated[int | None, typer.Option(help="model-holding Ray actors")] = None,
    worker_pipeline: Annotated[
        int | None, typer.Option(help="windows in flight per worker (the next shares while one encodes)")
    ] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="batching window: longest wait for more requests")] = None,
    max_batch: Annotated[int | None, typer.Option(help="batching window: most requests per window")] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="admitted, unfinished requests before RESOURCE_EXHAUSTED")
    ] = None,
    tau: Annotated[float | None, typer.Option(help="grouping: least pairwise cosine similarity")] = None,
    max_group_size: Annotated[int | None, typer.Option(help="grouping: largest group")] = None,
    sharing: Annotated[str | None, typer.Option(help="'flat' (Algorithm 1) or 'adaptive' (hierarchical depth)")] = None,
    cache_mb: Annotated[float | None, typer.Option(help="cross-window latent cache size in MiB (0: off)")] = None,
    shared_condition: Annotated[
        str | None, typer.Option(help="a group's shared steps run on its 'medoid' member (default) or the 'mean'")
    ] = None,
    default_steps: Annotated[int | None, typer.Option(help="steps when a request says 0")] = None,
    default_share: Annotated[float | None, typer.Option(help="sharing ratio when a request leaves it unset")] = None,
    codecs: Annotated[str | None, typer.Option(help="codec preference, comma-separated (e.g. fp32,fp16,int8)")] = None,
    unet_compile: Annotated[
        str | None, typer.Option(help="torch.compile mode of the shared-phase UNet: none, default, reduce-overhead ...")
    ] = None,
    unet_buckets: Annotated[
        str | None, typer.Option(help="fixed UNet batch sizes, comma-separated (CFG rows), warmed at start")
    ] = None,
    unet_compile_tuning: Annotated[
        str | None, typer.Option(help="with --unet-compile: TorchInductor options: none, light (1x1 convs as "
                                 "matmuls), full (and coordinate-descent tuning: minutes more compiling)")
    ] = None,
    unet_channels_last: Annotated[
        bool | None, typer.Option(help="with --unet-compile: store the UNet's weights channels-last and "
                                  "keep the up blocks' skip concatenations channels-last in the compiled code")
    ] = None,
    attention_backend: Annotated[
        str | None, typer.Option(help="SDPA kernel of the shared-phase UNet: auto, flash, cudnn, efficient, math")
    ] = None,
    cudnn_benchmark: Annotated[
        bool | None, typer.Option(help="with --unet-buckets: cuDNN times its convolution algorithms at warm-up")
    ] = None,
    unet_quantize: Annotated[
        str | None, typer.Option(help="with --unet-compile: 'fp8' runs the UNet's linear layers in float8 "
                                  "(torchao); 'fp8-rowwise' its linear layers and 1x1 convolutions, row-wise scales; "
                                  "'fp8-static' those layers with one scale per tensor, calibrated at start; "
                                  "'fp8-static-geglu' and the feed-forward GEGLU fused (a Triton kernel); "
                                  "'fp8-static-conv' and the 3x3 convolutions in float8 (Triton)")
    ] = None,
    compile_cache: Annotated[
        str | None, typer.Option(help="with --unet-compile: folder of TorchInductor's caches, reused on restart")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="bytes per LatentChunk")] = None,
    max_streams_per_client: Annotated[
        int | None, typer.Option(help="open RequestImage streams per client before RESOURCE_EXHAUSTED")
    ] = None,
    max_streams_per_host: Annotated[
        int | None,
        typer.Option(help="open RequestImage streams per peer host (IPv4 address, IPv6 /64) before "
                     "RESOURCE_EXHAUSTED; 0 (default): off, as devices behind one NAT share an address"),
    ] = None,
    max_deadline_s: Annotated[
        float | None, typer.Option(help="server-side cap on a request's lifetime, whatever deadline it asks for")
    ] = None,
    hung_window_s: Annotated[
        float | None,
        typer.Option(help="a cancelled window still running this long (s), or a worker running a window that does "
                     "not answer this long, means a hung worker: it is restarted"),
    ] = None,
    stall_s: Annotated[
        float | None,
        typer.Option(help="a running window whose worker starts no UNet call this long (s) means a hung worker "
                     "too; 0 (default): off. For GPU serving: above one UNet call and any compile inside one"),
    ] = None,
    keepalive_s: Annotated[
        float | None, typer.Option(help="ping a connection quiet this long (s); no answer: its requests end")
    ] = None,
    keepalive_timeout_s: Annotated[float | None, typer.Option(help="how long a keepalive ping waits (s)")] = None,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate chain: serve TLS only")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    tls_client_ca: Annotated[
        str | None, typer.Option(help="PEM CA of client certificates: mutual TLS (needs --tls-cert/--tls-key)")
    ] = None,
    auth_tokens_file: Annotated[
        str | None, typer.Option(help="bearer tokens, one per line ('token' or 'client_id:token')")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="SAGE LoRA for the shared phase: 'none' (default), 'auto' (the shipped one) or a folder"),
    ] = None,
    model_sha256: Annotated[
        str | None,
        typer.Option("--model-sha256", help="refuse a model whose SHA-256 differs (see model-sha256)"),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus /metrics on this port (0: free one)")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="bind address of /metrics (default 127.0.0.1)")] = None,
    grace_s: Annotated[float | None, typer.Option(help="graceful-shutdown grace period (s)")] = None,
    worker_step_delay_ms: Annotated[float | None, typer.Option(help="test hook: sleep per UNet call")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = None,
) -> None:
    """Serve RequestImage / GetServerInfo / GetStats, health and reflection on host:port."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    try:
        cfg = build_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from edge_server.service import ray_thread_started
    from edge_server.service import serve as run_server

    try:
        code = asyncio.run(run_server(cfg))
    except ConfigError as exc:  # unreadable certificates or token file, a port that cannot be bound, no Ray there
        typer.echo(f"error: {exc}", err=True)
        if ray_thread_started():
            exit_now(2)  # a Ray call left hanging in its thread must not hold up the exit
        raise typer.Exit(2) from exc  # found before any Ray call: a plain exit (in-process callers live on)
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the served process with `code`, skipping the interpreter's teardown. By now Ray is shut down (or given up
    on) and every log line is written; the teardown would join a Ray call still hanging in its thread, and tearing
    down Ray's, gRPC's and torch's native state is not needed. (The SIGABRT once seen after a cancelled window was
    Ray's failure-signal alarm, which `service.stop_requested` now cancels.)"""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command("model-sha256")
def model_sha256_cmd(
    model: Annotated[Path, typer.Argument(help="diffusers pipeline folder or SD v1.x .safetensors file")],
    model_config: Annotated[Path | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)] = None,
) -> None:
    """Print the model's SHA-256 (the value for --model-sha256 / model_sha256; a file's is its sha256sum, also
    when it loads into --model-config's configs: the pin is the file's, the configs are checked here)."""
    from sage_core.models import ModelError, check_pipeline_folder, folder_sha256

    try:
        check_pipeline_folder(model, model_config)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(folder_sha256(model))


def main() -> None:
    """Console-script entry point (`sage-edge-server`)."""
    app()


if __name__ == "__main__":
    main()

"""`sage-device`: finish images on a device from an edge server's shared latents, and run the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from device_client.channel import MAX_RETRIES
from device_client.config import DEFAULT_ADAPTER_CHOICE, DeviceConfig
from sage_core.names import MODEL_CONFIG_HELP
from sage_core.seeds import MAX_SEED

MODEL_HELP = ("pipeline folder, SD v1.x .safetensors file, 'tiny' or 'default'; default: the shipped model (tiny "
              "until it exists)")
main = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)




def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit non-zero (2: the command line is wrong; 1: the run failed)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def check_png_out(out: Path, overwrite: bool) -> None:
    """ValueError for an -o path the image cannot go to, found before any work: sage_core.outputs'
    check_output_file rule (not a folder; an existing file only with `overwrite`, and then only an image a SAGE run
    wrote; a file that can be made there), and a name that is not .png (the data is PNG)."""
    from sage_core.outputs import check_output_file, is_sage_png

    check_output_file(out, overwrite, "an image a SAGE run wrote (a PNG with its metadata)", is_sage_png)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the image is written as PNG; give a file name ending in .png (-o)")


def check_text(text: str, what: str = "the prompt") -> None:
    """ValueError for a prompt that is not valid UTF-8 (the shell passed bytes Python kept as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text (byte {exc.start} onwards)") from exc


@main.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="what to draw")],
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="what guidance steers the image away from (diffusers' sense)")
    ] = "",
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG to write (metadata in text chunks)")] = Path("out.png"),
    server: Annotated[str | None, typer.Option("--server", help="edge server host:port; none: local sampling")] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, max=MAX_SEED, help="noise seed (the group uses its first member's)"),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="sampler steps; 0: the server's default")] = 0,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale; unset: the server's default")] = None,
    share: Annotated[float | None, typer.Option("--share", help="preferred sharing ratio beta in [0, 1]")] = None,
    scheduler: Annotated[str, typer.Option("--scheduler", help="ddim, dpmpp or euler; empty: server default")] = "",
    codec: Annotated[
        list[str] | None, typer.Option("--codec", help="codec modes this device accepts (repeat); default lossless")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help=MODEL_HELP),
    ] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)] = None,
    adapter: Annotated[
        str, typer.Option("--adapter", help="SAGE LoRA folder, 'auto' (the shipped one if made for this model), 'none'")
    ] = DEFAULT_ADAPTER_CHOICE,
    fallback_local: Annotated[
        bool, typer.Option("--fallback-local", help="sample locally if the server is unreachable")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="request deadline in seconds")] = 300.0,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", help="seconds to reach the server")] = 10.0,
    retries: Annotated[
        int, typer.Option("--retries", min=0, max=MAX_RETRIES, help="tries again on a full queue, with backoff")
    ] = 3,
    device: Annotated[str, typer.Option("--device", help="torch device for the branch phase and the VAE")] = "cpu",
    tls: Annotated[bool, typer.Option("--tls", help="TLS to the server (system CA roots unless --tls-ca)")] = False,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="PEM CA of the server certificate (TLS)")] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM client certificate (mutual TLS)")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM key of --tls-cert")] = None,
    tls_server_name: Annotated[
        str | None, typer.Option("--tls-server-name", help="name to check in the server certificate (needs TLS)")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="bearer token file; default: $SAGE_EDGE_TOKEN if set")
    ] = None,
    client_id: Annotated[str, typer.Option("--client-id", help="this device's id (informational)")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an -o image an earlier run wrote")] = False,
) -> None:
    """Request a shared latent, run the branch phase here, decode and save the image."""
    from device_client.channel import read_token
    from device_client.demo import resolve_model

    if model is None and resolve_model(None) == "tiny":
        typer.echo("note: the shipped default model is not installed yet; using the tiny random pipeline", err=True)
    try:
        check_text(prompt)
        check_text(negative_prompt, "the negative prompt")
        check_png_out(out, overwrite)
        config = DeviceConfig(
            server=server,
            model=resolve_model(model),
            model_config=model_config,
            adapter=adapter,
            device=device,
            steps=steps,
            guidance=guidance,
            share=share,
            scheduler=scheduler,
            accepted_codecs=tuple(codec or ()),
            fallback_local=fallback_local,
            timeout_s=timeout,
            connect_timeout_s=connect_timeout,
            retries=retries,
            client_id=client_id,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
            token=read_token(token_file) if server else None,
        )
    except ValueError as exc:  # a setting out of range or an unreadable token file: the command line is wrong
        fail(str(exc), code=2)
        return
    from device_client.client import DeviceClient, DeviceError  # torch: imported once the command line is checked
    from device_client.demo import check_model
    from sage_core.models import ModelError

    try:
        check_model(config.model, config.adapter, config.model_config)  # a wrong model or configs, before the server
        with DeviceClient(config) as client:
            if server:
                result = client.generate(prompt, seed, negative_prompt)
            else:
                result = client.generate_local(prompt, seed, negative_prompt=negative_prompt)
        path = result.save(out)
    except ModelError as exc:  # the model or adapter named cannot be used here: the command line is wrong
        fail(str(exc), code=2)
        return
    except (DeviceError, ValueError, OSError) as exc:
        fail(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        fail(f"unexpected {type(exc).__name__}: {exc}")
        return
    m = result.metadata
    where = f"group {m.get('group_id', '-')} of {m['group_size']}" if m["mode"] == "edge" else m["mode"]
    typer.echo(
        f"wrote {path} ({where}, seed {m['seed']}, branch step {m['branch_step']}/{m['total_steps']}, "
        f"{result.bytes_received} B latent, {result.timings_ms.get('total', 0.0):.0f} ms)"
    )
    if m.get("fallback_reason"):
        typer.echo(f"fell back to local sampling: {m['fallback_reason']}")
    if negative_prompt and m["guidance"] <= 1.0:
        typer.echo(f"note: the negative prompt had no effect: guidance {m['guidance']:g} does not use "
                   "classifier-free guidance (it needs guidance > 1)", err=True)
    for key, what in (("ignored_tokens", "prompt"), ("negative_prompt_ignored_tokens", "negative prompt")):
        if m.get(key):
            typer.echo(f"note: the {what} is too long: the text encoder read its start and ignored the last "
                       f"{m[key]} tokens, as diffusers does", err=True)


@main.command("demo")
def demo_cmd(
    prompts: Annotated[
        Path, typer.Option("--prompts", help="UTF-8 text, one prompt per line (blank and # lines skipped)")
    ] = Path("examples/prompts.txt"),
    out: Annotated[
        Path, typer.Option("--out", help="folder for images, grids, timeline.png and report.json")
    ] = Path("demo_out"),
    clients: Annotated[int, typer.Option("--clients", min=1, help="concurrent device clients")] = 8,
    model: Annotated[
        str | None,
        typer.Option("--model", help=MODEL_HELP),
    ] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)] = None,
    adapter: Annotated[
        str, typer.Option("--adapter", help="SAGE LoRA folder, 'auto' or 'none'")
    ] = DEFAULT_ADAPTER_CHOICE,
    steps: Annotated[int, typer.Option("--steps", min=0, help="sampler steps; 0: server default")] = 0,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=MAX_SEED, help="base seed: prompt i asks for seed + i")
    ] = 0,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="what guidance steers every device's image away from")
    ] = "",
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="server batching window")] = 500.0,
    server_arg: Annotated[
        list[str] | None, typer.Option("--server-arg", help="extra argument for the server (repeat)")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a previous run's output folder")] = False,
) -> None:
    """Start an edge server (local Ray), run device clients on the prompts file, write images, grids, a report."""
    from device_client.demo import DemoConfig, DemoError, check_inputs, run_demo_config
    from sage_core.models import ModelError

    try:  # every input is checked before the server starts: a mistake is exit 2
        config = DemoConfig(
            prompts_file=prompts,
            out_dir=out,
            n_clients=clients,
            model=model,
            model_config=model_config,
            adapter=adapter,
            steps=steps,
            seed=seed,
            negative_prompt=negative_prompt,
            max_wait_ms=max_wait_ms,
            server_args=tuple(server_arg or ()),
            overwrite=overwrite,
        )
        prompt_list = check_inputs(config)
    except (ModelError, ValueError, OSError) as exc:
        fail(str(exc), code=2)
    try:
        run_demo_config(config, progress=True, prompts=prompt_list)
    except (DemoError, ModelError, ValueError, OSError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        fail(f"unexpected {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()

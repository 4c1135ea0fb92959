"""`sage-sim`: simulate an edge server with shared sampling against its baselines, from a config file.

sage-sim run simulation/configs/coco_h100.yaml --out runs/sim/coco
sage-sim sweep simulation/configs/coco_h100.yaml --out runs/sim/sweep
sage-sim policies simulation/configs/policies_coco.yaml --out runs/sim/policies   # flat vs adaptive vs cache
sage-sim workload simulation/configs/validation_tiny.yaml --out runs/sim/workload.json
sage-sim run simulation/configs/validation_tiny.yaml --workload runs/sim/workload.json
sage-sim embed simulation/configs/coco_h100.yaml      # fill the embedding cache
sage-sim check simulation/configs/coco_h100.yaml      # validate only
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sage_core.names import MODEL_CONFIG_HELP
from sage_core.outputs import RUN_MARKER, OutputDirError, atomic_output_dir, check_output_dir, check_output_file
from simulation.config import ConfigError, SimConfig, load_config, to_dict

main = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console(stderr=True, soft_wrap=True, markup=False)  # paths and prompts print as given, never cut
out_console = Console(markup=False) if sys.stdout.isatty() else Console(width=150, markup=False)

ConfigArg = Annotated[Path, typer.Argument(help="YAML or JSON config file")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default runs/sim/<config name>)")]
RequestsOpt = Annotated[int | None, typer.Option("--requests", "-n", help="override the number of requests")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="override the seed")]
OverwriteOpt = Annotated[
    bool, typer.Option(help="replace a previous output (a folder with report.json; for workload, a workload file)")
]
MODEL_NAMES = "'tiny' (the test pipeline), 'default' (the shipped model), a pipeline folder or an SD v1.x .safetensors"
VALIDATE_MODEL_HELP = f"model of the server and the devices: {MODEL_NAMES}"
ModelConfigOpt = Annotated[str | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)]
EmbedderOpt = Annotated[
    str | None,
    typer.Option(help="override prompts.embedder: minilm (needs the 'sim' extra), pipeline, pipeline:PATH, hashed"),
]
EmbedderConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        help="override prompts.model_config: with --embedder pipeline:FILE (an SD v1.x .safetensors), a folder with "
        "its component configs (unet/, vae/, text_encoder/; default SD v1.5's)",
    ),
]


@contextmanager
def _clear_errors(*more: type[Exception]) -> Iterator[None]:
    """Bad input ends the command with a one-line message and exit code 2, no traceback; `more` are further
    exception types that mean the same (a device client's DeviceError, for one)."""
    try:
        yield
    except (ConfigError, OSError, OutputDirError, *more) as exc:
        console.print(Text.assemble(("error:", "red"), f" {exc}"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _output_folder(path: Path, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """An output folder checked before any work by sage_core.outputs' rule (check_output_dir): not a file, an
    existing non-empty folder only with --overwrite, and then only a previous run's output that holds none of the
    `inputs`."""
    check_output_dir(path, overwrite, inputs)
    return path


@contextmanager
def _writing(out: Path, overwrite: bool, inputs: Sequence[Path]) -> Iterator[Path]:
    """A temporary folder for a command's files that replaces `out` once all are written (on error nothing is
    left), with report.json naming the command and its files: the mark of a previous run's folder."""
    from simulation.metrics import write_json

    with atomic_output_dir(out, overwrite, inputs) as tmp:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        write_json({"command": _command(), "files": [*files, RUN_MARKER]}, tmp / RUN_MARKER)


def _command() -> str:
    """This process's command line, quoted for a shell."""
    return "sage-sim " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _inputs(config: Path, cfg: SimConfig, *more: Path | None) -> tuple[Path, ...]:
    """The files a command reads, which --overwrite must not delete with the output folder."""
    from simulation.workload import dataset_path

    return (config, dataset_path(cfg), *(p for p in more if p is not None))


def _note(line: str) -> None:
    """A note on stderr about what the command changed or assumed."""
    console.print(f"note: {line}", highlight=False, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _updater(progress: Progress, description: str) -> Callable[[int, int], None]:
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def _load(
    config: Path,
    requests: int | None,
    seed: int | None,
    embedder: str | None = None,
    model_config: str | None = None,
) -> SimConfig:
    """The config file's settings with the command line's overrides, validated."""
    cfg = load_config(config)
    changes: dict[str, Any] = {}
    if requests is not None:
        changes["requests"] = requests
    if seed is not None:
        changes["seed"] = seed
    prompts = {k: v for k, v in (("embedder", embedder), ("model_config", model_config)) if v is not None}
    if prompts:
        changes["prompts"] = dataclasses.replace(cfg.prompts, **prompts)
    return cfg.replace(**changes) if changes else cfg


def _prompts_and_embeddings(cfg: SimConfig, progress: Progress) -> tuple[list[str], Any]:
    from simulation.workload import embed_prompts, load_prompts

    prompts = load_prompts(cfg, _note)
    emb = embed_prompts(
        cfg, prompts, _updater(progress, f"embedding {len(prompts):,} prompts ({cfg.prompts.embedder})")
    )
    return prompts, emb


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['requests']:,} requests, {summary['windows']['count']:,} windows")
    for col in (
        "mode",
        "GPU-s/img",
        "GPU saving",
        "UNet saving",
        "mean N",
        "depth",
        "cache hits",
        "KiB/img",
        "p50 s",
        "p95 s",
        "p99 s",
        "SLO miss",
        "device J/img",
    ):
        table.add_column(col, justify="right")
    for name, s in summary["modes"].items():
        table.add_row(
            name,
            f"{s['gpu_seconds_per_image']:.4f}",
            f"{s['gpu_saving_vs_server']:.1%}" if "gpu_saving_vs_server" in s and name != "device" else "-",
            f"{s['unet_saving']:.1%}",
            f"{s['mean_group_size']:.2f}" if "mean_group_size" in s else "-",
            f"{s['shared_depth']['mean']:.1f}" if "shared_depth" in s else "-",
            f"{s['cache']['hit_rate']:.1%}" if s.get("cache", {}).get("hit_rate") is not None else "-",
            f"{s['bytes_down_per_image'] / 1024:.1f}",
            f"{s['latency_s']['p50']:.2f}",
            f"{s['latency_s']['p95']:.2f}",
            f"{s['latency_s']['p99']:.2f}",
            f"{s['slo_violations']:.1%}",
            f"{s['device_energy_j_per_image']:.1f}",
        )
    out_console.print(table)


@main.command()
def run(
    config: ConfigArg,
    out: OutOpt = None,
    requests: RequestsOpt = None,
    seed: SeedOpt = None,
    embedder: EmbedderOpt = None,
    model_config: EmbedderConfigOpt = None,
    workload: Annotated[
        Path | None, typer.Option(help="replay a workload file (its arrivals and prompts; settings from CONFIG)")
    ] = None,
    per_request: Annotated[bool, typer.Option(help="also write requests.csv (per-request timings)")] = False,
    plots: Annotated[bool, typer.Option(help="write dashboard.png")] = True,
    offline_ideal: Annotated[bool, typer.Option(help="also group the whole prompt pool at once (the ceiling)")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Simulate one configuration (all its modes on one workload) and write summary.json, summary.csv and a
    dashboard plot."""
    from simulation import metrics
    from simulation import plots as plotting
    from simulation.engine import server_mode_names, simulate
    from simulation.sweep import offline_mean_group_size
    from simulation.workload import build_workload, embed_prompts, read_workload_file

    with _clear_errors():
        if workload is not None and requests is not None:
            raise ConfigError("--requests/-n does not apply with --workload: the workload file's requests are run")
        cfg = _load(config, requests, seed, embedder, model_config)
        inputs = _inputs(config, cfg, workload)
        out = _output_folder(out or Path("runs/sim") / config.stem, overwrite, inputs)
        with _progress() as progress:
            if workload is not None:
                cfg, wl = read_workload_file(workload, to_dict(cfg))
                prompts = list(wl.prompts)
                emb = embed_prompts(cfg, prompts, _updater(progress, f"embedding {len(prompts):,} prompts"))
            else:
                prompts, emb = _prompts_and_embeddings(cfg, progress)
                wl = build_workload(cfg, prompts)
            servers = len(server_mode_names(cfg))
            label = f"server model: {wl.n:,} requests x {servers} mode{'s' if servers > 1 else ''}"
            result = simulate(cfg, wl, emb, _updater(progress, label))
        extra: dict[str, Any] = {"config_file": str(config)}
        if workload is not None:
            extra["workload_file"] = str(workload)
        if offline_ideal:
            n_off = offline_mean_group_size(emb, wl.prompt_ids, cfg)
            beta = cfg.sampling.shared_steps / cfg.sampling.steps
            extra["offline"] = {"mean_group_size": n_off, "ideal_saving": metrics.ideal_saving(beta, n_off)}
        summary = metrics.summarize(result, extra)
        with _writing(out, overwrite, inputs) as tmp:
            metrics.write_json(summary, tmp / "summary.json")
            rows = [metrics.flat_row(summary, m) | {"mode": m} for m in summary["modes"]]
            metrics.write_csv(rows, tmp / "summary.csv")
            if per_request:
                metrics.write_requests_csv(result, tmp / "requests.csv")
            if plots:
                plotting.run_dashboard(result, summary, tmp / "dashboard.png")
        _print_summary(summary)
        console.print(f"simulated in {result.wall_s:.1f} s; wrote {out}/")


@main.command()
def sweep(
    config: ConfigArg,
    out: OutOpt = None,
    requests: RequestsOpt = None,
    seed: SeedOpt = None,
    embedder: EmbedderOpt = None,
    model_config: EmbedderConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the config's sweep grid (window x tau x beta x load): sweep.csv, sweep.json, sweep.md (the base tau and
    beta as tables) and tradeoffs.png."""
    from simulation import metrics
    from simulation import plots as plotting
    from simulation.config import grouped_modes
    from simulation.sweep import grid, run_sweep, sweep_markdown

    with _clear_errors():
        cfg = _load(config, None, seed, embedder, model_config)
        grouped_modes(cfg, "to sweep sharing settings")
        if requests is not None:
            cfg = cfg.replace(sweep=dataclasses.replace(cfg.sweep, requests=requests))
        inputs = _inputs(config, cfg)
        out = _output_folder(out or Path("runs/sim") / f"{config.stem}-sweep", overwrite, inputs)
        with _progress() as progress:
            prompts, emb = _prompts_and_embeddings(cfg, progress)
            task = progress.add_task(
                f"sweep: {len(grid(cfg))} settings x {cfg.sweep.requests:,} requests", total=len(grid(cfg))
            )

            def on_point(i: int, n: int, row: dict[str, Any]) -> None:
                progress.update(task, completed=i)
                if not console.is_terminal:  # a log file gets one line per setting instead of a bar
                    console.print(
                        f"sweep {i}/{n}: rate {row['rate']:g} window {row['window_s']:g} tau {row['tau']:g} "
                        f"beta {row['share']:g}: saving {row['unet_saving']:.1%}, p50 {row['latency_s.p50']:.2f} s"
                    )

            rows = run_sweep(cfg, prompts, emb, on_point)
        title = (
            f"{cfg.prompts.dataset} prompts ({cfg.prompts.embedder}), {cfg.sweep.requests:,} requests per point, "
            f"{cfg.server.gpu_workers} GPU ({cfg.server.step_table})"
        )
        with _writing(out, overwrite, inputs) as tmp:
            metrics.write_csv(rows, tmp / "sweep.csv")
            metrics.write_json(rows, tmp / "sweep.json")
            plotting.sweep_figure(rows, title, tmp / "tradeoffs.png", cfg.sampling.share, cfg.grouping.tau)
            markdown = sweep_markdown(rows, cfg.sampling.share, cfg.grouping.tau)
            (tmp / "sweep.md").write_text(markdown, encoding="utf-8")
        console.print(f"{len(rows)} settings; wrote {out}/sweep.csv and tradeoffs.png")


@main.command()
def policies(
    config: ConfigArg,
    out: OutOpt = None,
    requests: RequestsOpt = None,
    seed: SeedOpt = None,
    embedder: EmbedderOpt = None,
    model_config: EmbedderConfigOpt = None,
    plots: Annotated[bool, typer.Option(help="write policies.png")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Compare the config's sharing policies (`policies:`; default flat, adaptive, adaptive + 64 MiB cache) on one
    workload: policies.json, policies.csv, policies.md and policies.png."""
    from simulation import metrics
    from simulation import plots as plotting
    from simulation.config import grouped_modes
    from simulation.policies import comparison, run_policies, table_markdown
    from simulation.workload import build_workload

    with _clear_errors():
        cfg = _load(config, requests, seed, embedder, model_config)
        grouped_modes(cfg, "to compare sharing policies")
        inputs = _inputs(config, cfg)
        out = _output_folder(out or Path("runs/sim") / f"{config.stem}-policies", overwrite, inputs)
        with _progress() as progress:
            prompts, emb = _prompts_and_embeddings(cfg, progress)
            task = progress.add_task(f"{len(cfg.policies)} policies x {cfg.requests:,} requests", total=None)

            def on_progress(done: int, total: int, name: str) -> None:
                label = f"policy {name}: {len(cfg.policies)} policies x {cfg.requests:,} requests"
                progress.update(task, completed=done, total=total, description=label)

            results = run_policies(cfg, build_workload(cfg, prompts), emb, on_progress)
        report = comparison(results, {"config_file": str(config), "command": _command()})
        with _writing(out, overwrite, inputs) as tmp:
            metrics.write_json(report, tmp / "policies.json")
            metrics.write_csv(report["table"], tmp / "policies.csv")
            (tmp / "policies.md").write_text(table_markdown(report), encoding="utf-8")
            if plots:
                plotting.policies_figure(results, report, tmp / "policies.png")
        out_console.print(table_markdown(report))
        console.print(f"wrote {out}/")


@main.command("workload")
def workload_cmd(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="workload JSON file to write")],
    requests: RequestsOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a workload file (settings, and per request: arrival time, prompt, device class, seed) for the
    simulator and the real-system runner."""
    from simulation.workload import build_workload, is_workload_file, load_prompts, write_workload_file

    with _clear_errors():
        cfg = _load(config, requests, seed)
        check_output_file(out, overwrite, "a workload file", is_workload_file)
        wl = build_workload(cfg, load_prompts(cfg, _note))
        write_workload_file(out, cfg, wl)
        console.print(f"wrote {wl.n:,} requests over {wl.arrival_s[-1]:.1f} s to {out}")


@main.command()
def embed(config: ConfigArg, embedder: EmbedderOpt = None, model_config: EmbedderConfigOpt = None) -> None:
    """Embed the config's prompt pool into the cache (so later runs start at once)."""
    from simulation.workload import embed_prompts, load_prompts

    with _clear_errors():
        cfg = _load(config, None, None, embedder, model_config)
        prompts = load_prompts(cfg, _note)
        with _progress() as progress:
            emb = embed_prompts(cfg, prompts, _updater(progress, f"embedding {len(prompts):,} prompts"))
        console.print(f"{emb.shape[0]:,} embeddings of dimension {emb.shape[1]} ({cfg.prompts.embedder})")


@main.command()
def validate(
    workload: Annotated[Path, typer.Argument(help="workload file (from `sage-sim workload`)")],
    out: OutOpt = None,
    model: Annotated[str, typer.Option(help=VALIDATE_MODEL_HELP)] = "tiny",
    model_config: ModelConfigOpt = None,
    server: Annotated[str | None, typer.Option(help="host:port of a running edge server (default: start one)")] = None,
    concurrency: Annotated[int, typer.Option(help="device clients (the most requests in flight at once)")] = 64,
    overwrite: OverwriteOpt = False,
) -> None:
    """Replay a workload through a real edge server and device clients on 127.0.0.1 and through the simulator;
    compare UNet evaluations, bytes and median latency (report.md, comparison.json, validation.png, and the
    workload as workload.json)."""
    from device_client.client import DeviceError
    from simulation import metrics, validation
    from simulation import plots as plotting
    from simulation.engine import simulate
    from simulation.workload import embed_prompts, read_workload_body, request_seeds, workload_from_body

    with _clear_errors(DeviceError):
        raw, body = read_workload_body(workload)  # read once: the folder keeps the very workload replayed
        cfg, wl = workload_from_body(body, workload)
        seeds = request_seeds(body, workload)
        out = _output_folder(out or Path("runs/sim") / f"validate-{workload.stem}", overwrite, (workload,))
        device = validation.device_config(cfg, model, model_config, server)
        console.print(f"replaying {wl.n} requests over {wl.arrival_s[-1]:.1f} s through the real system ...")
        if server is None:
            with validation.running_server(cfg, model, model_config) as address:
                records = validation.replay(cfg, wl, dataclasses.replace(device, server=address), concurrency, seeds)
        else:
            records = validation.replay(cfg, wl, device, concurrency, seeds)
        real = validation.real_totals(records)
        emb = embed_prompts(cfg, list(wl.prompts))
        result = simulate(cfg.replace(modes=("sage",)), wl, emb)
        sim = validation.sim_totals(result)
        comparison = validation.compare(sim, real)
        command = _command()
        with _writing(out, overwrite, (workload,)) as tmp:
            (tmp / "workload.json").write_bytes(raw)
            metrics.write_json(records, tmp / "real_requests.json")
            metrics.write_json({"command": command, "sim": sim, "real": real, **comparison}, tmp / "comparison.json")
            real_lat = [r["latency_s"] for r in records if "error" not in r]
            plotting.validation_figure(real_lat, result.modes["sage"].latency_s, comparison, tmp / "validation.png")
            (tmp / "report.md").write_text(validation.report_markdown(cfg, command, sim, real, comparison), "utf-8")
        out_console.print_json(data=comparison)
        console.print(f"{'PASS' if comparison['pass'] else 'FAIL'}; wrote {out}/")
        if not comparison["pass"]:
            raise typer.Exit(1)


@main.command()
def measure(
    name: Annotated[str, typer.Option(help="table name to write")],
    model: Annotated[str, typer.Option(help=f"the model to time: {MODEL_NAMES}")] = "default",
    model_config: ModelConfigOpt = None,
    out: Annotated[Path, typer.Option(help="step-times JSON to add the table to")] = Path("simulation/step_times.json"),
    batches: Annotated[str, typer.Option(help="groups per measured pass (2 samples each with CFG)")] = "1,2,4,8,16",
    threads: Annotated[int, typer.Option(help="torch threads while measuring")] = 1,
    replace: Annotated[bool, typer.Option(help="replace a table of this name already in --out")] = False,
) -> None:
    """Measure this machine's step-time table (and a device class) for a model and store it."""
    import torch

    from simulation.measure import load_measured_pipeline, measure_pipeline, read_tables, write_table

    with _clear_errors():
        try:
            sizes = tuple(int(b) for b in batches.split(","))
        except ValueError:
            raise ConfigError(f"--batches must be comma-separated integers, got {batches!r}") from None
        if min(sizes) < 1 or threads < 1:
            raise ConfigError(f"--batches and --threads must be >= 1, got {batches!r} and {threads}")
        tables = read_tables(check_output_file(out, overwrite=True))  # one that cannot take it fails before measuring
        if name in tables and not replace:
            raise ConfigError(f"{out} already holds a table {name!r}; pass --replace to replace it, or another --name")
        torch.set_num_threads(threads)
        pipe = load_measured_pipeline(model, model_config)
        table, device = measure_pipeline(pipe, sizes)
        table["model"] = model
        write_table(out, name, table)
        out_console.print_json(data=table)
        console.print(f"wrote table {name!r} to {out}")


@main.command()
def check(config: ConfigArg) -> None:
    """Validate a config file and what a run needs: the prompt file, the step-time table and the embedder (its
    package or model folder, or the cached embeddings), without simulating."""
    from simulation.engine import latent_payload_bytes, load_step_table
    from simulation.workload import check_embedder, load_prompts

    with _clear_errors():
        cfg = load_config(config)
        prompts = load_prompts(cfg, _note)
        table = load_step_table(cfg)
        embedder = f"{cfg.prompts.embedder} {check_embedder(cfg, prompts)}"
        nbytes, source = latent_payload_bytes(cfg.codec)
        console.print(
            f"ok: {config} ({len(prompts):,} prompts, embedder {embedder}, {table.name}, latent {nbytes:,} B from "
            f"{source})",
            soft_wrap=True,
        )


if __name__ == "__main__":
    main()

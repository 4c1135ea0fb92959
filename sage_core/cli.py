"""`sage-edge`: shared sampling on this machine (group, share, branch, decode) with a report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sage_core.names import MODEL_CONFIG_HELP

MODEL_HELP = "diffusers SD pipeline folder or SD v1.x .safetensors file (default: the shipped model)"
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True, markup=False)  # paths and prompts print as given


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    console.print(Text.assemble(("error:", "bold red"), f" {message}"))
    raise typer.Exit(code=2)


@app.command()
def generate(
    prompts: Annotated[Path, typer.Option(help="UTF-8 text file, one prompt per line (blank and # lines skipped)")],
    out: Annotated[Path, typer.Option(help="output folder (created; must be empty unless --overwrite)")],
    share: Annotated[float, typer.Option(help="sharing ratio beta = (T - T*)/T, in [0, 1]")] = 0.4,
    steps: Annotated[int, typer.Option(help="sampler steps T")] = 30,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale omega")] = 7.5,
    tau: Annotated[float, typer.Option(help="cosine similarity every pair of a group must reach")] = 0.8,
    max_group: Annotated[int, typer.Option(help="largest group")] = 5,
    scheduler: Annotated[str, typer.Option(help="ddim, dpmpp or euler")] = "ddim",
    shared_condition: Annotated[
        str, typer.Option(help="a group's shared steps run on its 'medoid' member or the 'mean' (the paper)")
    ] = "medoid",
    seed: Annotated[
        int, typer.Option(min=0, help="base seed: a group's noise uses seed + its first prompt's index")
    ] = 0,
    negative_prompt: Annotated[
        str, typer.Option(help="text guidance steers every image away from, as diffusers' negative_prompt")
    ] = "",
    model: Annotated[Path | None, typer.Option(help=MODEL_HELP)] = None,
    model_config: Annotated[Path | None, typer.Option(help=MODEL_CONFIG_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a previous run's output folder")] = False,
) -> None:
    """Group the prompts, run shared + branch sampling, write one PNG per prompt, a grid per group and
    report.json (groups, similarities, UNet evaluations used vs independent sampling, saving)."""
    from sage_core.generate import check_base_seed, check_negative_prompt, overlong_prompts, read_prompt_file
    from sage_core.grouping import GroupingConfig
    from sage_core.models import ModelError, load_pipeline, model_fingerprint
    from sage_core.outputs import atomic_output_dir, check_output_dir
    from sage_core.report import build_report
    from sage_core.sampler import SamplingConfig

    quiet_libraries()
    try:
        config = SamplingConfig(steps=steps, guidance=guidance, share=share, scheduler=scheduler,
                                shared_condition=shared_condition, negative_prompt=negative_prompt)
        grouping = GroupingConfig(tau=tau, max_group_size=max_group)
        texts = read_prompt_file(prompts)  # no empty, blank or over-long prompt: check_prompts holds
        check_negative_prompt(negative_prompt)
        check_base_seed(seed, len(texts))
        check_output_dir(out, overwrite, inputs=(prompts,))
        pipe = load_pipeline(model, config=model_config)
    except (ValueError, ModelError) as exc:
        fail(str(exc))
    overlong = overlong_prompts(pipe.tokenizer, texts)
    for i, n in overlong.items():
        note(f"prompt {i + 1} is too long: the text encoder reads its first {pipe.tokenizer.model_max_length} "
             f"tokens and ignores the last {n}, as diffusers does")
    negative_ignored = overlong_prompts(pipe.tokenizer, [negative_prompt]).get(0, 0)
    if negative_ignored:
        note(f"the negative prompt is too long: the text encoder reads its first {pipe.tokenizer.model_max_length} "
             f"tokens and ignores the last {negative_ignored}")
    if negative_prompt and not config.uses_cfg():
        note(f"the negative prompt has no effect: guidance {guidance:g} does not use classifier-free guidance "
             "(it needs guidance > 1)")
    from sage_core.generate import generate as run

    started = time.perf_counter()
    with console.status(f"sampling {len(texts)} prompts ({steps} steps, share {share:.0%})"):
        result = run(pipe, texts, config, grouping, seed=seed)
    seconds = time.perf_counter() - started
    model_name = str(model or "default") + (f" (configs: {model_config})" if model_config else "")
    report = build_report(result, texts, model_name=model_name, seconds=seconds, grouping=grouping,
                          seed=seed, fingerprint=model_fingerprint(pipe), ignored_tokens=overlong,
                          negative_ignored_tokens=negative_ignored)
    try:
        with atomic_output_dir(out, overwrite=overwrite, inputs=(prompts,)) as tmp:
            write_outputs(tmp, result, texts, report)
    except OSError as exc:
        fail(f"could not write {out}: {exc}")
    print_summary(report, out)


def note(message: str) -> None:
    """Print a one-line note (the run goes on)."""
    console.print(Text.assemble(("note:", "yellow"), f" {message}"))


def write_outputs(folder: Path, result, texts: list[str], report: dict) -> None:
    """images/NNNN.png (with their metadata, sage_core.report.image_metadata), groups/group_NNN.png grids,
    report.json."""
    from sage_core.outputs import labelled_grid, save_png, to_pil
    from sage_core.report import image_metadata

    (folder / "groups").mkdir()
    pils = [to_pil(img) for img in result.images]
    for entry in report["prompts"]:
        save_png(pils[entry["index"]], folder / entry["image"], image_metadata(report, entry["index"]))
    for group in report["groups"]:
        members = group["members"]
        grid = labelled_grid([pils[m] for m in members], [texts[m] for m in members])
        grid.save(folder / group["grid"])
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def print_summary(report: dict, out: Path) -> None:
    """A short table of the groups and the saving."""
    table = Table(title=f"shared sampling: {len(report['prompts'])} prompts, {len(report['groups'])} groups")
    for col in ("group", "size", "min sim", "saving (measured)", "saving (closed form)"):
        table.add_column(col, justify="right")
    for g in report["groups"]:
        table.add_row(
            str(g["id"]),
            str(len(g["members"])),
            f"{g['min_similarity']:.3f}",
            f"{g['saving']:.1%}",
            f"{g['saving_closed_form']:.1%}",
        )
    out_console = Console(markup=False, soft_wrap=True)  # stdout; paths print as given, never cut
    out_console.print(table)
    t = report["totals"]
    out_console.print(
        f"UNet evaluations: {t['unet_evaluations']} vs {t['independent_evaluations']} independent "
        f"-> saving {t['saving']:.1%} in {t['seconds']:.1f} s. Wrote {out}/"
    )


@app.command()
def info(
    model: Annotated[Path | None, typer.Option(help=MODEL_HELP)] = None,
    model_config: Annotated[Path | None, typer.Option(help=MODEL_CONFIG_HELP)] = None,
) -> None:
    """Print a model's fingerprint, components and latent size."""
    from sage_core.models import ModelError, load_pipeline, model_fingerprint

    quiet_libraries()
    try:
        pipe = load_pipeline(model, config=model_config)
    except ModelError as exc:
        fail(str(exc))
    sizes = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}
    print(
        json.dumps(
            {
                "fingerprint": model_fingerprint(pipe),
                "parameters": sizes,
                "sample_size": pipe.unet.config.sample_size,
                "vae_scale_factor": pipe.vae_scale_factor,
            }
        )
    )


def quiet_libraries() -> None:
    """Silence the model loaders' progress bars and advisory warnings; this CLI reports its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main() -> None:
    """Console-script entry point (the commands that load a model quiet its libraries; --help imports no torch)."""
    app()

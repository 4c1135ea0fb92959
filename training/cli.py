"""`sage-train`: training commands. This file holds the default-model ones (train, evaluate, judges); the SAGE
adapter commands register themselves from training/sage_cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train SAGE models.")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default_model.yaml"


@app.command("default-model")
def default_model(
    config: Annotated[Path, typer.Option(help="YAML/JSON config (training/configs/).")] = DEFAULT_CONFIG,
    device: Annotated[str | None, typer.Option(help="Override: cpu, cuda, cuda:1 ...")] = None,
    stages: Annotated[str | None, typer.Option(help="Override: comma-separated subset of vae,unet.")] = None,
    num_threads: Annotated[int | None, typer.Option(help="Override torch CPU threads.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="Override the checkpoint/work folder.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Override where the pipeline folder is saved.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set vae.max_minutes=20 "
                                                   "(value parsed as YAML).")] = None,
) -> None:
    """Train the default text-to-image model from scratch on the procedural world."""
    import yaml

    from training.default_model import load_config, train_default_model
    from training.sage_cli import _fail

    extra = {}
    for item in set_ or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        extra[key.strip()] = yaml.safe_load(value)
    try:
        cfg = load_config(
            config,
            **extra,
            device=device,
            stages=stages.split(",") if stages else None,
            num_threads=num_threads,
            work_dir=work_dir,
            output_dir=output_dir,
        )
        train_default_model(cfg)
    except ValueError as exc:
        _fail(exc)


@app.command("evaluate-default")
def evaluate_default(
    model: Annotated[str | None, typer.Option(help="Pipeline folder (default: the shipped model).")] = None,
    n: Annotated[int, typer.Option(help="Held-out captions to generate.")] = 1000,
    out: Annotated[Path, typer.Option(help="Folder for report.json and grid.png.")] = Path("runs/eval_default"),
    device: Annotated[str, typer.Option()] = "cpu",
    batch_size: Annotated[int, typer.Option()] = 50,
    num_threads: Annotated[int, typer.Option()] = 2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Evaluate a pipeline on held-out captions with the judges (oracle, FID-oracle, CLIP, diversity)."""
    from training.evaluate_default import EvalConfig, run_evaluation
    from training.sage_cli import _fail

    try:
        run_evaluation(EvalConfig(model=model, n=n, out=str(out), device=device, batch_size=batch_size,
                                  num_threads=num_threads, seed=seed))
    except ValueError as exc:
        _fail(exc)


@app.command("judges")
def judges(
    out: Annotated[Path | None, typer.Option(help="Folder for judge weights (default training/assets/judges).")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    num_threads: Annotated[int, typer.Option()] = 1,
    only: Annotated[str, typer.Option(help="Comma-separated: oracle, clip.")] = "oracle,clip",
) -> None:
    """Train the judges (attribute oracle and the world CLIP) on renders of the world."""
    from training.judges import JudgeTrainConfig, train_judges
    from training.sage_cli import _fail

    cfg = JudgeTrainConfig(device=device, num_threads=num_threads)
    if out is not None:
        cfg.out_dir = str(out)
    try:
        train_judges(cfg, only=[w.strip() for w in only.split(",") if w.strip()])
    except ValueError as exc:
        _fail(exc)


try:  # the SAGE adapter commands (groups, finetune, replicate) live in their own module
    from training.sage_cli import register as _register_sage_commands
except ImportError:  # pragma: no cover - that module is optional for the default-model commands
    _register_sage_commands = None
if _register_sage_commands is not None:
    _register_sage_commands(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

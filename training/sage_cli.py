"""`sage-train` commands of SAGE training: `groups`, `finetune`, `replicate` (registered on training/cli.py's app).

Bad input ends with one line `error: ...` and exit code 2 (a missing or malformed dataset, tau_min >= tau_max,
an adapter for another base model, a checkpoint of another config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sage_core.outputs import write_text_atomic
from training.run_checks import writable_file


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def groups(
    source: Annotated[str, typer.Option(help="world (with images) or coco (COCO 2017 captions, text)")] = "world",
    out: Annotated[Path | None, typer.Option(help="Write the grouped dataset JSON here.")] = None,
    n: Annotated[int, typer.Option(help="World captions to draw (world source).")] = 5000,
    split: Annotated[str, typer.Option(help="World split: train or heldout.")] = "train",
    seed: Annotated[int, typer.Option()] = 0,
    coco: Annotated[Path | None, typer.Option(help="COCO captions JSON (default ../shared/datasets/...).")] = None,
    embedder: Annotated[str, typer.Option(help="pipeline (CLIP text encoder) or tfidf.")] = "pipeline",
    model: Annotated[str | None, typer.Option(help="Pipeline folder (default: shipped).")] = None,
    tau_min: Annotated[float, typer.Option()] = 0.6,
    tau_max: Annotated[float, typer.Option()] = 0.9,
    max_degree: Annotated[int, typer.Option(help="Most similar in-range neighbours kept per caption.")] = 32,
    max_cliques_per_node: Annotated[int, typer.Option(help="Cliques enumerated per caption.")] = 16,
    stats: Annotated[str | None, typer.Option(help="Count groups for ranges 0.5:0.9,...")] = None,
    stats_out: Annotated[Path | None, typer.Option(help="Write the range statistics JSON here.")] = None,
    num_threads: Annotated[int, typer.Option()] = 1,
) -> None:
    """Build a grouped dataset (similarity graph + cliques of 2..5) and/or count groups per similarity range."""
    import torch

    from training import grouped_dataset as gd

    try:
        if num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {num_threads}")
        if source == "world" and n < 2:
            raise ValueError(f"--n must be >= 2 (captions to group), got {n}")
        torch.set_num_threads(num_threads)
        for path in (out, stats_out):  # before the embedding work
            if path is not None:
                writable_file(path)
        params = gd.GroupingParams(tau_min=tau_min, tau_max=tau_max, max_degree=max_degree,
                                   max_cliques_per_node=max_cliques_per_node)
        ranges = gd.parse_ranges(stats) if stats else []
        if source == "world":
            items = gd.world_items(n, seed, split)
        elif source == "coco":
            items = gd.coco_items(coco or gd.COCO_CAPTIONS)
        else:
            raise ValueError(f"unknown source {source!r}; choose world or coco")
        captions = [it["caption"] for it in items]
        emb = gd.make_embedder(embedder, model)(captions)
    except ValueError as exc:
        _fail(exc)
    meta = {"source": source, "embedder": embedder, "model": model, "n": len(items),
            "similarity_quantiles": gd.similarity_quantiles(emb)}
    if source == "world":
        meta |= {"split": split, "seed": seed}
    typer.echo(f"{len(items)} captions; pairwise cosine quantiles {json.dumps(meta['similarity_quantiles'])}")
    if ranges:
        rows = gd.range_stats(emb, ranges, params)
        for r in rows:
            typer.echo(f"  ({r['tau_min']}, {r['tau_max']}): {r['groups']} groups, {r['edges']} edges, "
                       f"{r['captions_in_a_group']} captions in a group, sizes {r['size_histogram']}")
        if stats_out:
            write_text_atomic(stats_out, json.dumps(meta | {"params": params.__dict__, "ranges": rows}, indent=1))
    if out is not None:
        ds = gd.build_dataset(items, emb, params, meta)
        gd.save_grouped_dataset(ds, out)
        typer.echo(f"{len(ds.groups)} groups -> {out} ({json.dumps(ds.meta['stats']['size_histogram'])})")


def finetune(
    config: Annotated[Path | None, typer.Option(help="YAML config (training/configs/sage_*.yaml).")] = None,
    method: Annotated[str | None, typer.Option(help="Override: sage or standard.")] = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    out_dir: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    num_threads: Annotated[int | None, typer.Option()] = None,
    max_minutes: Annotated[float | None, typer.Option()] = None,
    resume: Annotated[bool, typer.Option(help="Resume from out_dir/checkpoint.pt when it exists.")] = True,
) -> None:
    """LoRA fine-tuning of the UNet with L_SAGE (or the standard loss) on a grouped dataset."""
    from training.finetune import finetune as run
    from training.finetune import load_config
    from training.grouped_dataset import DatasetError
    from training.lora import AdapterMismatchError

    try:
        cfg = load_config(config, method=method, dataset=dataset, out_dir=out_dir, model=model, steps=steps,
                          device=device, num_threads=num_threads, max_minutes=max_minutes)
        run(cfg, resume=resume)
    except (DatasetError, AdapterMismatchError, ValueError) as exc:
        _fail(exc)


def replicate(
    config: Annotated[Path | None, typer.Option(help="YAML config (training/configs/).")] = None,
    parts: Annotated[str | None, typer.Option(help="Override: comma-separated subset of table,fig3,fig4.")] = None,
    n_groups: Annotated[int | None, typer.Option()] = None,
    out: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    num_threads: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Table 1, Fig. 3 and Fig. 4 of the paper with 95 % bootstrap intervals."""
    from training.grouped_dataset import DatasetError
    from training.lora import AdapterMismatchError
    from training.replicate import load_config
    from training.replicate import replicate as run

    try:
        cfg = load_config(config, parts=parts.split(",") if parts else None, n_groups=n_groups, out=out,
                          device=device, num_threads=num_threads)
        run(cfg)
    except (DatasetError, AdapterMismatchError, ValueError, FileNotFoundError) as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    """Add the SAGE training commands to the `sage-train` app."""
    app.command("groups")(groups)
    app.command("finetune")(finetune)
    app.command("replicate")(replicate)

"""Sweep mode: every combination of window x tau x beta x load, each a full paired run, one row per point."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sage_core.grouping import GroupingConfig, group_by_similarity
from simulation.config import GROUPED_NAMES, SimConfig, grouped_modes, validate
from simulation.engine import simulate, single_torch_thread
from simulation.metrics import flat_row, ideal_saving, summarize
from simulation.workload import build_workload

PointFn = Callable[[int, int, dict[str, Any]], None]


def grid(cfg: SimConfig) -> list[dict[str, float]]:
    """The sweep points: the product of the sweep lists, each empty list standing for the base value."""
    sw = cfg.sweep
    axes = {
        "rate": sw.rate or (cfg.arrivals.rate,),
        "window_s": sw.window_s or (cfg.server.window_s,),
        "tau": sw.tau or (cfg.grouping.tau,),
        "share": sw.share or (cfg.sampling.share,),
    }
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def point_config(cfg: SimConfig, point: dict[str, float]) -> SimConfig:
    """The base config with one sweep point's values (and sweep.requests requests)."""
    out = dataclasses.replace(
        cfg,
        requests=cfg.sweep.requests,
        arrivals=dataclasses.replace(cfg.arrivals, rate=point["rate"]),
        server=dataclasses.replace(cfg.server, window_s=point["window_s"]),
        grouping=dataclasses.replace(cfg.grouping, tau=point["tau"]),
        sampling=dataclasses.replace(cfg.sampling, share=point["share"]),
    )
    validate(out)
    return out


def offline_mean_group_size(
    embeddings: np.ndarray, prompt_ids: np.ndarray, cfg: SimConfig, limit: int = 30_000
) -> float:
    """Mean group size when the request stream's prompts (the first `limit` requests) are grouped as one
    window: what an unbounded batching window would reach on this stream."""
    gcfg = GroupingConfig(
        tau=cfg.grouping.tau, max_group_size=cfg.grouping.max_group_size, candidates=cfg.grouping.candidates
    )
    emb = embeddings[prompt_ids[:limit]]
    with single_torch_thread():
        groups = group_by_similarity(emb, gcfg)
    return emb.shape[0] / len(groups)


def run_sweep(
    cfg: SimConfig,
    prompts: Sequence[str],
    embeddings: np.ndarray,
    on_point: PointFn | None = None,
    offline_ideal: bool = True,
) -> list[dict[str, Any]]:
    """Run every grid point; returns one flat row per point for the first grouped mode (sage, else sage_server;
    ConfigError without one), with the other modes' latency and GPU cost alongside (columns prefixed by the mode,
    e.g. `server.`)."""
    mode = grouped_modes(cfg, "to sweep sharing settings")[0]
    points = grid(cfg)
    offline: dict[float, float] = {}
    rows = []
    for i, point in enumerate(points):
        pcfg = point_config(cfg, point)
        extra: dict[str, Any] = {}
        workload = build_workload(pcfg, prompts)
        if offline_ideal:
            if point["tau"] not in offline:  # the prompt stream does not depend on load, window or beta
                offline[point["tau"]] = offline_mean_group_size(embeddings, workload.prompt_ids, pcfg)
            n_off = offline[point["tau"]]
            beta = pcfg.sampling.shared_steps / pcfg.sampling.steps
            extra["offline"] = {"mean_group_size": n_off, "ideal_saving": ideal_saving(beta, n_off)}
        result = simulate(pcfg, workload, embeddings)
        summary = summarize(result, extra)
        row = flat_row(summary, mode)
        for other in ("server", "device", "sage_server"):
            if other in summary["modes"] and other != row["mode"]:
                o = summary["modes"][other]
                row[f"{other}.latency_s.p50"] = o["latency_s"]["p50"]
                row[f"{other}.latency_s.p95"] = o["latency_s"]["p95"]
                row[f"{other}.gpu_seconds_per_image"] = o["gpu_seconds_per_image"]
                if other == "sage_server":
                    row["sage_server.gpu_saving_vs_server"] = o.get("gpu_saving_vs_server")
        rows.append(row)
        if on_point:
            on_point(i + 1, len(points), row)
    return rows


def _nearest(values: set[float], target: float, name: str) -> tuple[float, str]:
    """The value of `values` nearest `target` (the smaller on a tie), and how to name it: `name value`, with the
    config's value in brackets when the sweep did not run it."""
    best = min(values, key=lambda v: (round(abs(v - target), 12), v))
    return best, f"{name} {best:g}" + ("" if best == target else f" (nearest swept to the config's {target:g})")


def base_slice(rows: Sequence[dict[str, Any]], share: float, tau: float) -> tuple[float, float, str, str]:
    """The (beta, tau) slice shown as the base: the config's values, or the nearest the sweep ran when it did not
    run them; and their labels for titles."""
    b, b_label = _nearest({r["share"] for r in rows}, share, "beta")
    t, t_label = _nearest({r["tau"] for r in rows}, tau, "tau")
    return b, t, b_label, t_label


def mode_name(rows: Sequence[dict[str, Any]]) -> str:
    """The short name of the grouped mode the sweep rows describe (SAGE or SAGE on server)."""
    return GROUPED_NAMES.get(rows[0].get("mode", "sage"), "SAGE") if rows else "SAGE"


def sweep_markdown(rows: Sequence[dict[str, Any]], share: float, tau: float) -> str:
    """Markdown tables of the base slice (base_slice: the config's share and tau, or the nearest swept): per load
    and window, the groups, the saving against the ideal, GPU cost and latency of the grouped mode and of the
    other modes present; then saving per (tau, beta)."""
    share, tau, beta_label, tau_label = base_slice(rows, share, tau)
    name = mode_name(rows)
    base = sorted(
        (r for r in rows if r["share"] == share and r["tau"] == tau), key=lambda r: (r["rate"], r["window_s"])
    )
    cols = [
        ("load req/s", "rate", "{:g}"),
        ("window s", "window_s", "{:g}"),
        ("mean window", "mean_window_requests", "{:.1f}"),
        ("mean N", "mean_group_size", "{:.3f}"),
        ("saving", "unet_saving", "{:.1%}"),
        ("ideal (stream)", "offline_ideal_saving", "{:.1%}"),
        (f"GPU-s/img {name}", "gpu_seconds_per_image", "{:.4f}"),
        ("GPU-s/img server", "server.gpu_seconds_per_image", "{:.4f}"),
        ("GPU-s/img SAGE on server", "sage_server.gpu_seconds_per_image", "{:.4f}"),
        (f"p50 s {name}", "latency_s.p50", "{:.2f}"),
        (f"p95 s {name}", "latency_s.p95", "{:.2f}"),
        ("p50 s server", "server.latency_s.p50", "{:.2f}"),
        ("p50 s SAGE on server", "sage_server.latency_s.p50", "{:.2f}"),
        ("p50 s device", "device.latency_s.p50", "{:.2f}"),
    ]
    cols = [c for c in cols if base[0].get(c[1]) is not None]
    lines = [
        f"Base slice: {beta_label}, {tau_label}.",
        "",
        "| " + " | ".join(c[0] for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in cols) + " |" for r in base]
    rates, windows = max(r["rate"] for r in rows), max(r["window_s"] for r in rows)
    top = [r for r in rows if r["rate"] == rates and r["window_s"] == windows]
    taus, shares = sorted({r["tau"] for r in top}), sorted({r["share"] for r in top})
    lines += [
        "",
        f"Saving (ideal with the whole stream grouped) at {rates:g} req/s, window {windows:g} s:",
        "",
        "| tau \\ beta | " + " | ".join(f"{b:g}" for b in shares) + " |",
        "|---|" + "---|" * len(shares),
    ]
    for t in taus:
        cells = []
        for b in shares:
            r = next((r for r in top if r["tau"] == t and r["share"] == b), None)
            ideal = r.get("offline_ideal_saving") if r else None
            cells.append(f"{r['unet_saving']:.1%} ({ideal:.1%})" if r and ideal is not None else "-")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

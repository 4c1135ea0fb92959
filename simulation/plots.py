"""Plots a person can read at a glance: one dashboard per run, trade-off curves per sweep (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from simulation.engine import SimResult  # noqa: E402

MODE_COLORS = {"sage": "#1b9e77", "server": "#d95f02", "device": "#7570b3", "sage_server": "#e7298a"}
MODE_LABELS = {
    "sage": "SAGE (shared on server, branch on device)",
    "server": "independent, on server",
    "device": "fully on device",
    "sage_server": "SAGE, all on server",
}
BREAKDOWN = ("uplink", "window_wait", "queue_wait", "gpu_job", "downlink", "device")
DPI = 72


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def run_dashboard(result: SimResult, summary: dict[str, Any], path: Path) -> Path:
    """Six panels: latency CDF, GPU-s per image, UNet evaluations, group sizes, bytes, latency breakdown."""
    modes = list(result.modes)
    s = summary["modes"]
    fig, ax = plt.subplots(2, 3, figsize=(14, 7.5))
    st = summary["settings"]
    fig.suptitle(
        f"{result.n:,} requests, {st['dataset']} prompts, {st['arrivals']['process']} {st['rate']:g} req/s, "
        f"window {st['window_s']:g} s, tau {st['tau']:g}, beta {st['share']:g}, {st['gpu_workers']} GPU "
        f"({st['step_table']})",
        fontsize=11,
    )
    # 1. latency CDF
    a = ax[0, 0]
    for m in modes:
        lat = np.sort(result.modes[m].latency_s)
        a.plot(lat, np.linspace(0, 1, lat.size), color=MODE_COLORS[m], label=m)
    a.axvline(result.cfg.slo_s, color="k", ls=":", lw=1, label=f"SLO {result.cfg.slo_s:g} s")
    a.set_xscale("log")
    a.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set(xlabel="end-to-end latency (s)", ylabel="fraction of requests", title="Latency CDF")
    a.legend(fontsize=8)
    # 2. GPU-seconds per image
    a = ax[0, 1]
    vals = [s[m]["gpu_seconds_per_image"] for m in modes]
    bars = a.bar(modes, vals, color=[MODE_COLORS[m] for m in modes])
    a.set_ylim(0, 1.15 * max(max(vals), 1e-9))
    for b, m in zip(bars, modes, strict=True):
        sav = s[m].get("gpu_saving_vs_server")
        if sav is not None and m != "server" and s[m]["gpu_seconds_per_image"] > 0:
            a.annotate(f"-{sav:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    a.set(ylabel="GPU-seconds per image", title="Server GPU cost")
    # 3. UNet evaluations per image, server and device
    a = ax[0, 2]
    srv = [s[m]["unet_evals_server_per_image"] for m in modes]
    dev = [s[m]["unet_evals_device_per_image"] for m in modes]
    a.bar(modes, srv, color="#555555", label="on the server")
    a.bar(modes, dev, bottom=srv, color="#bbbbbb", label="on the device")
    for i, m in enumerate(modes):
        if s[m]["unet_saving"] > 0.0005:
            a.annotate(f"-{s[m]['unet_saving']:.1%}", (i, srv[i] + dev[i]), ha="center", va="bottom", fontsize=9)
    a.set_ylim(0, 1.25 * max(x + y for x, y in zip(srv, dev, strict=True)))
    a.set(ylabel="UNet evaluations per image", title="UNet evaluations (saving vs independent)")
    a.legend(fontsize=8, loc="upper right", ncol=2)
    # 4. group sizes
    a = ax[1, 0]
    grouped = next((m for m in ("sage", "sage_server") if m in s and "group_size_hist" in s[m]), None)
    if grouped:
        hist = s[grouped]["group_size_hist"]
        a.bar(list(hist), list(hist.values()), color=MODE_COLORS[grouped])
        a.set_title(
            f"Group sizes: {s[grouped]['groups']:,} groups, mean N {s[grouped]['mean_group_size']:.2f}\n"
            f"saving {s[grouped]['unet_saving']:.1%} = beta(1-1/N); full groups would give "
            f"{s[grouped]['ideal_saving_full_groups']:.1%}",
            fontsize=10,
        )
        a.set(xlabel="group size", ylabel="groups")
    else:
        a.set_axis_off()
    # 5. bytes per image
    a = ax[1, 1]
    down = [s[m]["bytes_down_per_image"] / 1024 for m in modes]
    up = [s[m]["bytes_up_per_image"] / 1024 for m in modes]
    a.bar(modes, down, color=[MODE_COLORS[m] for m in modes], label="down")
    a.bar(modes, up, bottom=down, color="#cccccc", label="up")
    a.set(ylabel="KiB per image", title=f"Network bytes (latent {summary['latent_bytes']:,} B)")
    # 6. latency breakdown (means)
    a = ax[1, 2]
    bottom = np.zeros(len(modes))
    cmap = plt.get_cmap("tab10")
    for j, part in enumerate(BREAKDOWN):
        v = np.asarray([s[m]["breakdown_mean_s"][part] for m in modes])
        a.bar(modes, v, bottom=bottom, color=cmap(j), label=part.replace("_", " "))
        bottom += v
    a.set(ylabel="seconds (mean)", title="Where the time goes")
    a.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _series(rows: Sequence[dict[str, Any]], x: str, y: str, by: str) -> dict[Any, tuple[list, list]]:
    out: dict[Any, tuple[list, list]] = {}
    for r in sorted(rows, key=lambda r: (r[by], r[x])):
        xs, ys = out.setdefault(r[by], ([], []))
        xs.append(r[x])
        ys.append(r[y])
    return out


def sweep_figure(rows: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """Trade-off curves from sweep rows of the sage mode (one row per setting): saving vs window per load,
    median and p95 latency vs window per load, saving vs latency over every setting, and saving vs beta per tau."""
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(title, fontsize=11)
    beta0, tau0 = _most_common(rows, "share"), _most_common(rows, "tau")
    base = [r for r in rows if r["share"] == beta0 and r["tau"] == tau0]
    cmap = plt.get_cmap("viridis")
    loads = sorted({r["rate"] for r in rows})
    color = {rate: cmap(i / max(1, len(loads) - 1)) for i, rate in enumerate(loads)}
    # 1. saving vs window, per load, with the ideal at the offline group size
    a = ax[0, 0]
    for rate, (xs, ys) in _series(base, "window_s", "unet_saving", "rate").items():
        a.plot(xs, ys, "o-", color=color[rate], label=f"{rate:g} req/s")
    offline = [r.get("offline_ideal_saving") for r in base if r.get("offline_ideal_saving") is not None]
    if offline:
        a.axhline(offline[0], color="k", ls="--", lw=1, label="ideal, whole stream grouped")
    a.axhline(beta0 * (1 - 1 / base[0]["max_group_size"]), color="grey", ls=":", lw=1, label="ideal, full groups")
    a.set(
        xscale="log",
        xlabel="batching window (s)",
        ylabel="UNet evaluations saved",
        title=f"Saving (beta {beta0:g}, tau {tau0:g})",
    )
    a.legend(fontsize=8)
    # 2. latency vs window, per load
    a = ax[0, 1]
    for rate, (xs, ys) in _series(base, "window_s", "latency_s.p50", "rate").items():
        a.plot(xs, ys, "o-", color=color[rate], label=f"p50, {rate:g} req/s")
    for rate, (xs, ys) in _series(base, "window_s", "latency_s.p95", "rate").items():
        a.plot(xs, ys, "s--", color=color[rate], alpha=0.6)
    a.set(
        xscale="log",
        yscale="log",
        xlabel="batching window (s)",
        ylabel="latency (s); dashed: p95",
        title="Latency cost",
    )
    a.legend(fontsize=8)
    # 3. saving vs median latency, every setting
    a = ax[1, 0]
    for rate in loads:
        pts = [r for r in rows if r["rate"] == rate]
        a.scatter(
            [r["latency_s.p50"] for r in pts],
            [r["unet_saving"] for r in pts],
            color=color[rate],
            s=18,
            label=f"{rate:g} req/s",
        )
    a.set(xscale="log", xlabel="median latency (s)", ylabel="UNet evaluations saved", title="Trade-off, every setting")
    a.legend(fontsize=8)
    # 4. saving vs beta per tau (largest load, largest window)
    a = ax[1, 1]
    top = [r for r in rows if r["rate"] == loads[-1] and r["window_s"] == max(x["window_s"] for x in rows)]
    for tau, (xs, ys) in _series(top, "share", "unet_saving", "tau").items():
        a.plot(xs, ys, "o-", label=f"tau {tau:g}")
    a.set(xlabel="sharing ratio beta", ylabel="UNet evaluations saved", title=f"Saving vs beta ({loads[-1]:g} req/s)")
    a.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _most_common(rows: Sequence[dict[str, Any]], key: str) -> Any:
    vals = [r[key] for r in rows]
    return max(set(vals), key=lambda v: (vals.count(v), v))


def validation_figure(
    real_latency: Sequence[float], sim_latency: np.ndarray, comparison: dict[str, Any], path: Path
) -> Path:
    """Latency CDFs of the real replay and the simulation, and the three acceptance quantities side by side."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for lat, label, color in ((real_latency, "real system", "#d95f02"), (sim_latency, "simulator", "#1b9e77")):
        xs = np.sort(np.asarray(lat))
        ax[0].plot(xs, np.linspace(0, 1, xs.size), color=color, label=label)
    ax[0].set(xlabel="end-to-end latency (s)", ylabel="fraction of requests", title="Latency CDF, same workload")
    ax[0].legend()
    checks = comparison["checks"]
    names = list(checks)
    ratio = [checks[k]["sim"] / checks[k]["real"] if checks[k]["real"] else 0.0 for k in names]
    colors = ["#1b9e77" if checks[k]["ok"] else "#d62728" for k in names]
    ax[1].bar(names, ratio, color=colors)
    for i, k in enumerate(names):
        tol = checks[k]["tolerance"]
        ax[1].plot([i - 0.4, i + 0.4], [1 + tol, 1 + tol], "k:", lw=1)
        ax[1].plot([i - 0.4, i + 0.4], [1 - tol, 1 - tol], "k:", lw=1)
        ax[1].annotate(f"{checks[k]['rel_diff']:+.1%}", (i, ratio[i]), ha="center", va="bottom")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set(ylabel="simulated / real", title="Agreement (dotted: tolerance)")
    fig.tight_layout()
    return _save(fig, path)

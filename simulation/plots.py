"""Plots a person can read at a glance: one dashboard per run, trade-off curves per sweep (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from simulation.config import GROUPED_NAMES  # noqa: E402
from simulation.engine import SimResult  # noqa: E402
from simulation.sweep import base_slice, mode_name  # noqa: E402

MODE_COLORS = {"sage": "#1b9e77", "server": "#d95f02", "device": "#7570b3", "sage_server": "#e7298a"}
MODE_LABELS = {
    "sage": "SAGE (shared on server, branch on device)",
    "server": "independent, on server",
    "device": "fully on device",
    "sage_server": "SAGE, all on server",
}
BREAKDOWN = ("uplink", "window_wait", "queue_wait", "gpu_job", "downlink", "device")
DPI = 72

def stacked_steps(a, labels: list[str], server: list[float], device: list[float], savings: list[float]) -> None:
    """Server and device steps per image as stacked bars, each annotated with its saving (when there is one)."""
    a.bar(labels, server, color="#555555", label="on the server")
    a.bar(labels, device, bottom=server, color="#bbbbbb", label="on the device")
    for i, saving in enumerate(savings):
        if saving > 0.0005:
            a.annotate(f"-{saving:.1%}", (i, server[i] + device[i]), ha="center", va="bottom", fontsize=9)


def series_colors(n: int) -> list[str]:
    """`n` distinct colours, none of them a mode's (MODE_COLORS), for series drawn beside the modes."""
    taken = {c.lower() for c in MODE_COLORS.values()}
    palette = [matplotlib.colors.to_hex(c) for name in ("Dark2", "tab10") for c in plt.get_cmap(name).colors]
    free = list(dict.fromkeys(c for c in palette if c not in taken))
    if n > len(free):  # more series than the palettes hold: spread the rest over a continuous map
        free += [matplotlib.colors.to_hex(plt.get_cmap("turbo")(i / (n - len(free)))) for i in range(n - len(free))]
    return free[:n]


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
    a.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
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
            a.annotate(f"{-sav:+.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    a.set(ylabel="GPU-seconds per image", title="Server GPU cost")
    # 3. UNet evaluations per image, server and device
    a = ax[0, 2]
    srv = [s[m]["unet_evals_server_per_image"] for m in modes]
    dev = [s[m]["unet_evals_device_per_image"] for m in modes]
    stacked_steps(a, modes, srv, dev, [s[m]["unet_saving"] for m in modes])
    a.set_ylim(0, 1.25 * max(x + y for x, y in zip(srv, dev, strict=True)))
    a.set(ylabel="UNet evaluations per image", title="UNet evaluations (saving vs independent)")
    a.legend(fontsize=8, loc="upper right", ncol=2)
    # 4. group sizes
    a = ax[1, 0]
    grouped = next((m for m in ("sage", "sage_server") if m in s and "group_size_hist" in s[m]), None)
    if grouped:
        hist = s[grouped]["group_size_hist"]
        a.bar(list(hist), list(hist.values()), color=MODE_COLORS[grouped])
        g = s[grouped]
        offline = summary.get("offline")
        if offline:
            ceiling = f"whole stream grouped: {offline['ideal_saving']:.1%} (N {offline['mean_group_size']:.2f})"
        elif "ideal_saving_full_groups" in g:
            ceiling = f"full groups: {g['ideal_saving_full_groups']:.1%}"
        else:
            hits = g["cache"]["hit_rate"]
            cache = f", cache hits {hits:.0%}" if hits is not None else ""
            ceiling = f"{g['sharing']}, mean depth {g['shared_depth']['mean']:.1f}{cache}"
        rule = " = beta(1-1/N)" if "ideal_saving" in g else ""
        a.set_title(
            f"Group sizes: {g['groups']:,} groups, mean N {g['mean_group_size']:.2f}\n"
            f"saving {g['unet_saving']:.1%}{rule}; {ceiling}",
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


def _series(
    rows: Sequence[dict[str, Any]], x: str, y: str, by: str, x_value: str | None = None
) -> dict[Any, tuple[list, list]]:
    """{value of `by`: (xs, ys)} with points ordered by `x`; the xs plotted are `x_value` when given."""
    out: dict[Any, tuple[list, list]] = {}
    for r in sorted(rows, key=lambda r: (r[by], r[x])):
        xs, ys = out.setdefault(r[by], ([], []))
        xs.append(r[x_value or x])
        ys.append(r[y])
    return out


def sweep_figure(rows: Sequence[dict[str, Any]], title: str, path: Path, share: float, tau: float) -> Path:
    """Trade-off curves from sweep rows (one per setting; `share` and `tau` pick the base slice, or the nearest
    swept values, as base_slice says in the titles): saving vs window per load against the ideal, latency vs
    window per load against the server baseline, saving vs median latency per tau, and saving vs beta per tau."""
    share, tau, beta_label, tau_label = base_slice(rows, share, tau)
    label = f"{beta_label}, {tau_label}"
    name = mode_name(rows)
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(title, fontsize=11)
    base = [r for r in rows if r["share"] == share and r["tau"] == tau]
    loads = sorted({r["rate"] for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {rate: cmap(i / max(1, len(loads) - 1)) for i, rate in enumerate(loads)}
    # 1. saving vs window, per load, against the ideal with the whole stream grouped
    a = ax[0, 0]
    for rate, (xs, ys) in _series(base, "window_s", "unet_saving", "rate").items():
        a.plot(xs, ys, "o-", color=color[rate], label=f"{rate:g} req/s")
    offline = [r["offline_ideal_saving"] for r in base if r.get("offline_ideal_saving") is not None]
    if offline:
        a.axhline(offline[0], color="k", ls="--", lw=1, label="ideal beta(1-1/N), whole stream grouped")
    top = max([r["unet_saving"] for r in base] + offline)
    a.set_ylim(0, 1.25 * top if top > 0 else 1)
    a.set(xscale="log", xlabel="batching window (s)", ylabel="UNet evaluations saved")
    a.set_title(f"Saving\n{label}", fontsize=10)
    a.legend(fontsize=8)
    # 2. latency vs window, per load, with the independent server baseline
    a = ax[0, 1]
    for rate, (xs, ys) in _series(base, "window_s", "latency_s.p50", "rate").items():
        a.plot(xs, ys, "o-", color=color[rate], label=f"{name} p50, {rate:g} req/s")
    for rate, (xs, ys) in _series(base, "window_s", "latency_s.p95", "rate").items():
        a.plot(xs, ys, "o--", color=color[rate], alpha=0.5, lw=1)
    if all("server.latency_s.p50" in r for r in base):
        for rate, (xs, ys) in _series(base, "window_s", "server.latency_s.p50", "rate").items():
            a.plot(xs, ys, "x:", color=color[rate], lw=1)
    a.set(xscale="log", yscale="log", xlabel="batching window (s)", ylabel="latency (s)")
    server = "; independent on server p50 (dotted)" if all("server.latency_s.p50" in r for r in base) else ""
    a.set_title(f"Latency, {label}\n{name} p50 (solid), p95 (dashed){server}", fontsize=9)
    a.legend(fontsize=8)
    # 3. saving vs median latency at the top load, one curve per tau (points: windows)
    a = ax[1, 0]
    busiest = [r for r in rows if r["rate"] == loads[-1] and r["share"] == share]
    for t, (lat, ys) in _series(busiest, "window_s", "unet_saving", "tau", x_value="latency_s.p50").items():
        a.plot(lat, ys, "o-", label=f"tau {t:g}")
    a.set(xscale="log", xlabel=f"{name} median latency (s)", ylabel="UNet evaluations saved")
    a.set_title(f"Trade-off at {loads[-1]:g} req/s, {beta_label}\n(points: windows)", fontsize=10)
    a.legend(fontsize=8)
    # 4. saving vs beta per tau (largest load, largest window)
    a = ax[1, 1]
    widest = max(r["window_s"] for r in rows)
    top_rows = [r for r in rows if r["rate"] == loads[-1] and r["window_s"] == widest]
    for t, (xs, ys) in _series(top_rows, "share", "unet_saving", "tau").items():
        a.plot(xs, ys, "o-", label=f"tau {t:g}")
    a.set(xlabel="sharing ratio beta", ylabel="UNet evaluations saved")
    a.set_title(f"Saving vs beta ({loads[-1]:g} req/s, window {widest:g} s)")
    a.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


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


def policies_figure(results: dict[str, SimResult], report: dict[str, Any], path: Path) -> Path:
    """Four panels, one colour per sharing policy (its first grouped mode: sage, else sage_server): latency CDF
    against the baselines, steps per image on the server and the device, the shared depths requests got, and GPU
    cost with the cache's hit rate."""
    names = list(results)
    labels = [n.replace(" (", "\n(") for n in names]  # long names on two lines under the bars
    colors = dict(zip(names, series_colors(len(names)), strict=True))
    grouped = next(m for m in GROUPED_NAMES if m in results[names[0]].modes)
    short = GROUPED_NAMES[grouped]
    sage = {name: report["policies"][name]["modes"][grouped] for name in names}
    st = report["settings"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(
        f"{report['requests']:,} {st['dataset']} requests, {st['rate']:g} req/s, windows <= "
        f"{st['max_window_requests']} requests / {st['window_s']:g} s, {st['gpu_workers']} GPU ({st['step_table']})",
        fontsize=11,
    )
    # 1. latency CDF of SAGE under each policy, and the baselines
    a = ax[0, 0]
    for name in names:
        lat = np.sort(results[name].modes[grouped].latency_s)
        a.plot(lat, np.linspace(0, 1, lat.size), color=colors[name], label=f"{short}, {name}")
    for mode in report["baselines"]:
        lat = np.sort(results[names[0]].modes[mode].latency_s)
        a.plot(lat, np.linspace(0, 1, lat.size), color=MODE_COLORS[mode], ls="--", lw=1, label=MODE_LABELS[mode])
    a.set(xlabel="end-to-end latency (s)", ylabel="fraction of requests", title="Latency CDF")
    a.legend(fontsize=8)
    # 2. trajectory steps per image, server and device
    a = ax[0, 1]
    srv = [sage[n]["server_steps_per_image"] for n in names]
    dev = [sage[n]["device_steps_per_image"] for n in names]
    stacked_steps(a, labels, srv, dev, [sage[n]["unet_saving"] for n in names])
    a.set_ylim(0, 1.2 * max(x + y for x, y in zip(srv, dev, strict=True)))
    a.set(ylabel="sampler steps per image", title="Steps per image (saving vs independent)")
    a.legend(fontsize=8, loc="lower right")
    # 3. shared depth per request
    a = ax[1, 0]
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        hist = sage[n]["shared_depth_hist"]
        depths = np.asarray([int(d) for d in hist]) + (j - (len(names) - 1) / 2) * width
        a.bar(depths, np.asarray(list(hist.values())) / report["requests"], width, color=colors[n], label=n)
    a.set(xlabel="shared steps (from the server)", ylabel="fraction of requests", title="Shared depth per request")
    a.legend(fontsize=8)
    # 4. GPU cost and cache hits
    a = ax[1, 1]
    gpu = [sage[n]["gpu_seconds_per_image"] for n in names]
    bars = a.bar(labels, gpu, color=[colors[n] for n in names])
    for b, n in zip(bars, names, strict=True):
        hits = sage[n]["cache"]
        note = f"cache hits {hits['hit_rate']:.0%}" if hits["lookups"] else "no cache"
        a.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    server = report["baselines"].get("server")
    if server:
        a.axhline(server["gpu_seconds_per_image"], color=MODE_COLORS["server"], ls="--", lw=1, label="independent")
        a.legend(fontsize=8)
    a.set_ylim(0, 1.2 * max([*gpu, server["gpu_seconds_per_image"] if server else 0.0]))
    a.set(ylabel="GPU-seconds per image", title="Server GPU cost")
    fig.tight_layout()
    return _save(fig, path)

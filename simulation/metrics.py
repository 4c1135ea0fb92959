"""Summaries of a simulation run: what a decision maker reads (JSON, CSV), from the engine's per-request arrays.

Savings are reported two ways:
- UNet evaluations (server + device) against independent sampling of every request (T steps, 2 evaluations per
  step with CFG): realized `unet_saving`, next to `ideal_saving` = beta * (1 - 1/N) for the realized mean group
  size N (the two agree by construction: the check is that the engine counts what the paper counts) and
  `ideal_saving_full_groups` = beta * (1 - 1/max_group_size).
  These two are reported for the flat policy without a cache only: under the adaptive policy every group has
  its own depth and the realized `unet_saving` is the figure.
- GPU-seconds on the server against the `server` baseline of the same run (batching efficiency included).
- Per grouped mode, the sharing policy's own figures: trajectory steps per image on the server and on the
  device, each request's shared depth (mean and histogram), latents sent, and the latent cache's lookups, hit
  rate and steps taken from it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from simulation.config import to_dict
from simulation.engine import ModeResult, SimResult

LATENCY_QUANTILES = {"p50": 50, "p95": 95, "p99": 99}


def _latency(lat: np.ndarray) -> dict[str, float]:
    out = {k: float(np.percentile(lat, q)) for k, q in LATENCY_QUANTILES.items()}
    out["mean"] = float(lat.mean())
    out["max"] = float(lat.max())
    return out


def ideal_saving(share: float, mean_group_size: float) -> float:
    """The paper's fraction of UNet evaluations saved: beta * (1 - 1/N)."""
    return share * (1.0 - 1.0 / mean_group_size) if mean_group_size > 0 else 0.0


def mode_summary(result: SimResult, m: ModeResult) -> dict[str, Any]:
    """The headline numbers of one mode."""
    cfg, n = result.cfg, result.n
    per_step = cfg.sampling.unet_samples_per_step
    independent = n * cfg.sampling.steps * per_step
    evals = m.unet_evals_server + m.unet_evals_device
    beta = cfg.sampling.shared_steps / cfg.sampling.steps
    out: dict[str, Any] = {
        "mode": m.name,
        "images": n,
        "gpu_seconds_per_image": m.gpu_seconds / n,
        "gpu_utilization": (
            m.gpu_seconds / (cfg.server.gpu_workers * m.gpu_busy_span_s) if m.gpu_busy_span_s > 0 else 0.0
        ),
        "unet_evals_per_image": evals / n,
        "unet_evals_server_per_image": m.unet_evals_server / n,
        "unet_evals_device_per_image": m.unet_evals_device / n,
        "unet_saving": 1.0 - evals / independent,
        "bytes_down_per_image": float(m.bytes_down.mean()),
        "bytes_up_per_image": float(m.bytes_up.mean()),
        "latency_s": _latency(m.latency_s),
        "slo_s": cfg.slo_s,
        "slo_violations": float(np.mean(m.latency_s > cfg.slo_s)),
        "device_seconds_per_image": float(m.device_s.mean()),
        "device_energy_j_per_image": float(m.energy_j.mean()),
        "breakdown_mean_s": {
            "uplink": float(m.uplink_s.mean()),
            "window_wait": float(m.window_wait_s.mean()),
            "queue_wait": float(m.queue_wait_s.mean()),
            "gpu_job": float(m.gpu_job_s.mean()),
            "downlink": float(m.downlink_s.mean()),
            "device": float(m.device_s.mean()),
        },
        "windows": int(m.window_sizes.shape[0]),
        "mean_window_requests": float(m.window_sizes.mean()) if m.window_sizes.size else 0.0,
        "mean_job_batch_samples": float(m.job_batch_samples.mean()) if m.job_batch_samples.size else 0.0,
        "grouping_calls": m.grouping_calls,
    }
    if m.group_sizes.size and m.name in ("sage", "sage_server"):
        groups = int(m.group_sizes.shape[0])
        hist = np.bincount(m.group_sizes, minlength=cfg.grouping.max_group_size + 1)[1:]
        out.update(
            {
                "groups": groups,
                "mean_group_size": n / groups,
                "group_size_hist": {str(i + 1): int(c) for i, c in enumerate(hist)},
                "requests_in_shared_groups": float(m.group_sizes[m.group_sizes > 1].sum() / n),
            }
        )
        if cfg.grouping.sharing == "flat" and not cfg.grouping.cache_mb:
            out["ideal_saving"] = ideal_saving(beta, n / groups)
            out["ideal_saving_full_groups"] = ideal_saving(beta, cfg.grouping.max_group_size)
        out.update(policy_summary(result, m))
    return out


def policy_summary(result: SimResult, m: ModeResult) -> dict[str, Any]:
    """A grouped mode's sharing figures: steps per image on each side, shared depths, latents sent, the cache."""
    g, n = result.cfg.grouping, result.n
    per_step = result.cfg.sampling.unet_samples_per_step
    lookups = m.cache_lookups
    return {
        "sharing": g.sharing,
        "cache_mb": g.cache_mb,
        "server_steps_per_image": m.unet_evals_server / per_step / n,
        "device_steps_per_image": m.unet_evals_device / per_step / n,
        "shared_depth": {"mean": float(m.depth.mean()), "min": int(m.depth.min()), "max": int(m.depth.max())},
        "shared_depth_hist": {str(d): int(c) for d, c in enumerate(np.bincount(m.depth)) if c},
        "deliveries_per_image": m.deliveries / n,
        "cache": {
            "lookups": lookups,
            "hits": m.cache_hits,
            "hit_rate": m.cache_hits / lookups if lookups else None,
            "cached_steps_per_image": m.cached_steps / n,
        },
    }


def summarize(result: SimResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's JSON summary: settings, windows, one entry per mode, paired savings against the baselines."""
    cfg = result.cfg
    modes = {name: mode_summary(result, m) for name, m in result.modes.items()}
    if "server" in modes:
        base = modes["server"]["gpu_seconds_per_image"]
        for s in modes.values():
            s["gpu_saving_vs_server"] = 1.0 - s["gpu_seconds_per_image"] / base if base > 0 else 0.0
    if "device" in modes:
        base = modes["device"]["device_energy_j_per_image"]
        for s in modes.values():
            s["device_energy_saving_vs_device"] = 1.0 - s["device_energy_j_per_image"] / base if base > 0 else 0.0
    ws = result.window_sizes
    summary: dict[str, Any] = {
        "requests": result.n,
        "seed": cfg.seed,
        "settings": {
            "arrivals": to_dict(cfg.arrivals),
            "rate": cfg.arrivals.rate,
            "window_s": cfg.server.window_s,
            "max_window_requests": cfg.server.max_window_requests,
            "sharing": cfg.grouping.sharing,
            "tau": cfg.grouping.tau,
            "max_group_size": cfg.grouping.max_group_size,
            "adaptive_taus": list(cfg.grouping.adaptive_taus),
            "adaptive_max_sizes": list(cfg.grouping.adaptive_max_sizes),
            "depth_schedule": [list(p) for p in cfg.grouping.depth_schedule],
            "cache_mb": cfg.grouping.cache_mb,
            "share": cfg.sampling.share,
            "shared_steps": cfg.sampling.shared_steps,
            "steps": cfg.sampling.steps,
            "gpu_workers": cfg.server.gpu_workers,
            "step_table": result.step_table,
            "dataset": cfg.prompts.dataset,
            "embedder": cfg.prompts.embedder,
            "codec": f"{cfg.codec.mode}/{cfg.codec.level}",
        },
        "latent_bytes": result.latent_bytes,
        "latent_bytes_source": result.latent_bytes_source,
        "windows": {
            "count": int(ws.shape[0]),
            "mean_requests": float(ws.mean()) if ws.size else 0.0,
            "p95_requests": float(np.percentile(ws, 95)) if ws.size else 0.0,
        },
        "modes": modes,
        "wall_s": result.wall_s,
        "timings_s": result.timings,
    }
    summary.update(extra or {})
    return summary


def flat_row(summary: dict[str, Any], mode: str) -> dict[str, Any]:
    """One CSV row: run settings and one mode's numbers, nested keys joined with '.'."""
    row: dict[str, Any] = {k: v for k, v in summary["settings"].items() if not isinstance(v, dict)}
    row["requests"] = summary["requests"]
    row["mean_window_requests"] = summary["windows"]["mean_requests"]
    row["latent_bytes"] = summary["latent_bytes"]
    for k, v in summary.get("offline", {}).items():
        row[f"offline_{k}"] = v
    _flatten(summary["modes"][mode], "", row)
    return row


def _flatten(d: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows to CSV with the union of their keys (first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_json(obj: Any, path: Path) -> None:
    """Indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n", encoding="utf-8")


def write_requests_csv(result: SimResult, path: Path) -> None:
    """Per-request timings of every mode (for validation against a real run)."""
    rows = []
    for name, m in result.modes.items():
        for i in range(result.n):
            rows.append(
                {
                    "mode": name,
                    "request": i,
                    "latency_s": round(float(m.latency_s[i]), 6),
                    "window_wait_s": round(float(m.window_wait_s[i]), 6),
                    "queue_wait_s": round(float(m.queue_wait_s[i]), 6),
                    "gpu_job_s": round(float(m.gpu_job_s[i]), 6),
                    "downlink_s": round(float(m.downlink_s[i]), 6),
                    "device_s": round(float(m.device_s[i]), 6),
                    "bytes_down": int(m.bytes_down[i]),
                }
            )
    write_csv(rows, path)

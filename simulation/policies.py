"""Paired comparison of sharing policies: one workload, each of the config's `policies` (flat, adaptive and
adaptive with a latent cache by default) simulated in the grouped modes (sage, sage_server), the baselines
(server, device) once, since they do not depend on the policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from simulation.config import GROUPED_MODES, SimConfig, grouped_modes, policy_config
from simulation.engine import SimResult, simulate
from simulation.metrics import summarize
from simulation.workload import Workload

TABLE_KEYS = (
    ("step saving", "unet_saving"),
    ("server steps/img", "server_steps_per_image"),
    ("device steps/img", "device_steps_per_image"),
    ("mean depth", "shared_depth.mean"),
    ("cache hit rate", "cache.hit_rate"),
    ("GPU-s/img", "gpu_seconds_per_image"),
    ("GPU saving vs server", "gpu_saving_vs_server"),
    ("KiB down/img", "bytes_down_per_image"),
    ("p50 s", "latency_s.p50"),
    ("p95 s", "latency_s.p95"),
    ("p99 s", "latency_s.p99"),
    ("device s/img", "device_seconds_per_image"),
)

POLICY_SETTINGS = (
    "sharing",
    "tau",
    "max_group_size",
    "adaptive_taus",
    "adaptive_max_sizes",
    "depth_schedule",
    "cache_mb",
    "share",
    "shared_steps",
)
ProgressFn = Callable[[int, int, str], None]  # (requests done, of all policies, policy now running)


def run_policies(
    cfg: SimConfig, workload: Workload, embeddings: np.ndarray, progress: ProgressFn | None = None
) -> dict[str, SimResult]:
    """Per policy name, a SimResult holding its grouped modes and the shared baselines, all on `workload`.
    `progress` counts requests through the server model over all policies' grouped modes."""
    grouped = grouped_modes(cfg, "to compare sharing policies")
    baselines = tuple(m for m in cfg.modes if m not in GROUPED_MODES)
    base = simulate(cfg.replace(modes=baselines), workload, embeddings).modes if baselines else {}
    results = {}
    per_policy = workload.n * len(grouped)
    total = per_policy * len(cfg.policies)
    for i, variant in enumerate(cfg.policies):
        done = i * per_policy
        if progress:
            progress(done, total, variant.name)
        on_step = (lambda d, _t, o=done, v=variant.name: progress(o + d, total, v)) if progress else None
        result = simulate(policy_config(cfg, i).replace(modes=grouped), workload, embeddings, on_step)
        results[variant.name] = dataclasses.replace(result, modes={**result.modes, **base})
    return results


def _get(summary: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key; None where the summary has none (a saving against a mode that was not run)."""
    for key in dotted.split("."):
        if key not in summary:
            return None
        summary = summary[key]
    return summary


def comparison(results: dict[str, SimResult], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison's JSON: shared settings, per policy its settings and mode summaries, and one table row
    per policy and grouped mode."""
    summaries = {name: summarize(r) for name, r in results.items()}
    first = next(iter(summaries.values()))
    rows = []
    for name, s in summaries.items():
        for mode in GROUPED_MODES:
            if mode in s["modes"]:
                m = s["modes"][mode]
                rows.append({"policy": name, "mode": mode} | {key: _get(m, key) for _, key in TABLE_KEYS})
    baselines = {k: v for k, v in first["modes"].items() if k not in GROUPED_MODES}
    return {
        "requests": first["requests"],
        "seed": first["seed"],
        "settings": {k: v for k, v in first["settings"].items() if k not in POLICY_SETTINGS},
        "latent_bytes": first["latent_bytes"],
        "windows": {name: s["windows"] for name, s in summaries.items()},
        "policies": {
            name: {
                "settings": {k: s["settings"][k] for k in POLICY_SETTINGS},
                "modes": {k: v for k, v in s["modes"].items() if k in GROUPED_MODES},
            }
            for name, s in summaries.items()
        },
        "baselines": baselines,
        "table": rows,
        "wall_s": {name: r.wall_s for name, r in results.items()},
    } | (extra or {})


def table_markdown(report: dict[str, Any]) -> str:
    """The comparison table as Markdown, one row per policy and grouped mode, then the baselines."""
    head = ["policy", "mode", *(label for label, _ in TABLE_KEYS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["table"]:
        lines.append("| " + " | ".join([row["policy"], row["mode"], *(_cell(row, k) for _, k in TABLE_KEYS)]) + " |")
    for mode, s in report["baselines"].items():
        cells = [_cell_from(s, k) for _, k in TABLE_KEYS]
        lines.append("| (baseline) | " + mode + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], key: str) -> str:
    return _format(key, row.get(key))


def _cell_from(summary: dict[str, Any], key: str) -> str:
    return _format(key, _get(summary, key))


def _format(key: str, value: Any) -> str:
    """A table cell: percentages for savings and rates, KiB for bytes, four decimals for GPU-seconds (as `run`
    prints them), two otherwise."""
    if value is None:
        return "-"
    if "saving" in key or "rate" in key:
        return f"{value:.1%}"
    if key.startswith("bytes"):
        return f"{value / 1024:.1f}"
    if key.startswith("gpu_seconds"):
        return f"{value:.4f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)

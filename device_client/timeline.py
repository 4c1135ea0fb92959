"""The demo's timeline: one bar per request, from its start to its image, split where its time went (waiting for a
window and a worker, the shared phase on the server, the rest of the way to the latent, the branch phase and the
VAE on the device). Requests of one group share a colour band and their server segments line up: the shared phase
ran once for them. Drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = {  # name -> (legend label, colour)
    "queue": ("waiting for a window and a worker (server)", "#bdbdbd"),
    "shared": ("shared phase, once per window (server)", "#d95f02"),
    "transfer": ("grouping, codec, stream, latent decode", "#7570b3"),
    "branch": ("branch phase (device)", "#1b9e77"),
    "vae": ("VAE decode (device)", "#66a61e"),
    "local": ("all steps on the device (server unreachable)", "#e6ab02"),
    "failed": ("ended without an image", "#e7298a"),
}


@dataclass(frozen=True)
class Segment:
    """One part of a request's bar: its phase, start and length in milliseconds since the clients started."""

    phase: str
    start_ms: float
    length_ms: float


def segments(started_ms: float, latency_ms: float, status_ok: bool, timings: dict[str, float]) -> list[Segment]:
    """A request's bar from its device's timings: the server's queue wait and shared phase are cut to the time
    the device waited for the latent (they are the server's clock); a failed request is one segment."""
    if not status_ok:
        return [Segment("failed", started_ms, latency_ms)]
    if "local_sampling" in timings:
        return [Segment("local", started_ms, timings["local_sampling"])]
    to_latent = sum(timings.get(k, 0.0) for k in ("connect", "wait_accepted", "stream", "verify_decode"))
    queue = min(max(timings.get("server_queue_wait", 0.0), 0.0), to_latent)
    shared = min(max(timings.get("server_shared_phase", 0.0), 0.0), to_latent - queue)
    lengths = [("queue", queue), ("shared", shared), ("transfer", to_latent - queue - shared),
               ("branch", timings.get("branch_phase", 0.0)), ("vae", timings.get("vae_decode", 0.0))]  # fmt: skip
    out, t = [], started_ms
    for phase, length in lengths:
        if length > 0:
            out.append(Segment(phase, t, length))
            t += length
    return out


def group_labels(records: Sequence[Any], groups: dict[str, list[int]]) -> dict[int, str]:
    """Each request's row label: its index and, in a group of two or more, the group's number n (report.json's
    groups[n], grids/group_00n.png) and size; "alone" in a group of one; its status when it has no image."""
    labels = {r.index: f"#{r.index} {r.status}" for r in records}
    for n, members in enumerate(groups.values()):
        for m in members:
            labels[m] = f"#{m} group {n} ({len(members)})" if len(members) > 1 else f"#{m} alone"
    return labels


def bar(record: Any) -> list[Segment]:
    """`segments` of a demo RequestRecord (index, status, started_ms, latency_ms, metadata)."""
    timings = record.metadata.get("timings_ms", {}) if record.metadata else {}
    return segments(record.started_ms, record.latency_ms, record.status == "OK", timings)


def write_timeline(records: Sequence[Any], groups: dict[str, list[int]], path: Path) -> Path | None:
    """timeline.png for the demo's records: rows by group (every other group of two or more shaded), then the
    requests without an image by start; None (nothing written) when there is no request."""
    from matplotlib.figure import Figure

    if not records:
        return None
    grouped = {m for members in groups.values() for m in members}
    order = [m for members in groups.values() for m in members]
    order += sorted((r.index for r in records if r.index not in grouped), key=lambda i: records[i].started_ms)
    bars = {r.index: bar(r) for r in records}
    fig = Figure(figsize=(10, 1.6 + 0.3 * len(order)), layout="constrained")
    ax = fig.add_subplot()
    shaded = [members for members in groups.values() if len(members) > 1][::2]
    for members in shaded:
        rows = [order.index(m) for m in members]
        ax.axhspan(min(rows) - 0.5, max(rows) + 0.5, color="#f0f0f0", zorder=0)
    for row, i in enumerate(order):
        for s in bars[i]:
            ax.barh(row, s.length_ms / 1e3, left=s.start_ms / 1e3, height=0.7, color=PHASES[s.phase][1], zorder=2)
    labels = group_labels(records, groups)
    ax.set_yticks(range(len(order)), [labels[i] for i in order], fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)  # the first row on top
    ax.set_xlim(left=0.0)
    ax.set_xlabel("seconds since the device clients started")
    clients = len({r.client for r in records if r.client})
    ax.set_title(f"{len(records)} requests, {clients} device clients: where each request's time went")
    used = {s.phase for segs in bars.values() for s in segs}
    handles = [_patch(color, label) for phase, (label, color) in PHASES.items() if phase in used]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def _patch(color: str, label: str) -> Any:
    """A legend entry."""
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)

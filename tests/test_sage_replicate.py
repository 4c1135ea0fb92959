"""The replication driver end to end on tiny pipelines, tiny adapters and untrained judges (plumbing only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sage_core.models import tiny_pipeline
from training.finetune import FinetuneConfig, finetune
from training.grouped_dataset import GroupedDataset, save_grouped_dataset, world_items
from training.lora import LoraSettings, load_adapter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory) -> Path:
    items = world_items(8, seed=0, split="train")
    path = tmp_path_factory.mktemp("ds") / "groups.json"
    return save_grouped_dataset(GroupedDataset(items, [[0, 1, 2], [3, 4], [5, 6, 7]], {}), path)


def _cfg(dataset_path: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(dataset=str(dataset_path), out_dir=str(out), steps=2, batch_groups=2, lr=1e-3, checkpoint_every=2,
                log_every=1, progress=False, lora=LoraSettings(rank=2, alpha=2.0))
    return FinetuneConfig(**(base | kw))


def _random_judges():
    import open_clip

    from training import judges
    from training.replicate import Judges

    torch.manual_seed(0)
    name = judges.register_world_clip()
    model = open_clip.create_model(name)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    clip = judges.ClipJudge(model, open_clip.get_tokenizer(name), int(size), open_clip.OPENAI_DATASET_MEAN,
                            open_clip.OPENAI_DATASET_STD, "cpu")
    return Judges(judges.AttributeOracle().eval(), clip)


def test_replication_smoke_on_tiny_models(dataset_path, tmp_path) -> None:
    from training.replicate import ReplicateConfig, replicate

    adapters = {}
    for method in ("standard", "sage"):
        cfg = _cfg(dataset_path, tmp_path / method, method=method)
        adapters[method] = finetune(cfg, pipe=tiny_pipeline(0), log=lambda s: None)
    pipes = {"pretrained": tiny_pipeline(0)}
    for method, folder in adapters.items():
        pipes[method] = tiny_pipeline(0)
        load_adapter(pipes[method], folder)
    cfg = ReplicateConfig(out=str(tmp_path / "out"), cache=str(tmp_path / "cache"), eval_items=24, n_groups=3,
                          tau_min=-1.0, tau_max=1.0, shares=(0.5,), fig3_ranges=((-1.0, 1.0),), fig3_share=0.5,
                          fig4_shared_steps=(2,), steps=4, guidance=2.0, chunk_groups=2, bootstrap=20,
                          fid_bootstrap=5,
                          standard_adapter=str(adapters["standard"]), sage_adapter=str(adapters["sage"]))
    res = replicate(cfg, pipes=pipes, jd=_random_judges(), log=lambda s: None)
    rows = res["table"]["rows"]
    assert set(rows) == {"independent/pretrained", "independent/standard", "shared50/pretrained",
                         "shared50/standard", "shared50/sage"}
    groups = res["table"]["groups"]
    from sage_core.generate import saving_closed_form

    want = sum(len(g) * saving_closed_form(2, 4, len(g)) for g in groups) / sum(len(g) for g in groups)
    assert rows["shared50/sage"]["cost_saving_measured"] == pytest.approx(want)
    assert rows["independent/pretrained"]["cost_saving_measured"] == 0.0
    for r in rows.values():
        for k, (lo, hi) in r["ci95"].items():
            assert lo <= hi, k
    for f in ("table.md", "results.json", "fig3_similarity.png", "fig4_shared_steps.png"):
        assert (tmp_path / "out" / f).is_file(), f
    assert "SAGE FT" in (tmp_path / "out" / "table.md").read_text()


def test_row_cache_is_keyed_by_the_model_weights_not_its_path(tmp_path, monkeypatch) -> None:
    from training import replicate as rep

    generated: list[int] = []

    def fake_row(pipe, es, k, independent, cfg) -> dict:
        generated.append(k)
        return {"images": np.zeros((1, 2, 2, 3), np.uint8), "unet_evals": 1, "independent_evals": 1}

    monkeypatch.setattr(rep, "generate_row", fake_row)
    monkeypatch.setattr(rep, "per_item_scores", lambda images, es, jd: {})
    cfg = rep.ReplicateConfig(cache=str(tmp_path / "cache"), standard_adapter=str(tmp_path / "none"),
                              sage_adapter=str(tmp_path / "none"))  # model None: the shipped default, by path
    es = rep.EvalSet("t", [], [], (0.0, 1.0), 0)
    specs = [("independent/pretrained", "pretrained", 0, True)]
    old, retrained = tiny_pipeline(0), tiny_pipeline(1)  # the same path (cfg.model) before and after retraining
    rep.run_rows(specs, es, {"pretrained": old}, None, cfg, log=lambda s: None)
    rep.run_rows(specs, es, {"pretrained": old}, None, cfg, log=lambda s: None)
    assert len(generated) == 1  # same weights: the cached row is reused
    rep.run_rows(specs, es, {"pretrained": retrained}, None, cfg, log=lambda s: None)
    assert len(generated) == 2  # other weights at the same path: generated again, not the stale row

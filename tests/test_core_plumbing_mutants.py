"""Mutation audit of sage_core's model plumbing: models, unet_buckets, latent_cache, adapters, outputs, config_files,
seeds, names, report and auth. Each test here fails on a hand-made mutant (a plausible bug) that the existing tests
let through, and checks behaviour a user relies on: which paths count as a model file, what a pin or fingerprint
covers, which cached latents a request may reuse, which adapters load, what a run writes and which token lines a
server reads. Tiny models and files only: no network, no GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_single_file import ldm_state_dict, write_configs

from sage_core import models, unet_buckets
from sage_core.adapters import ADAPTER_FILE, INFO_FILE, AdapterMismatchError, check_adapter, resolve_adapter
from sage_core.adaptive import DepthSchedule
from sage_core.auth import parse_token_line
from sage_core.generate import GenerationResult, generate
from sage_core.grouping import GroupingConfig
from sage_core.latent_cache import CacheSettings, LatentCache, point_bytes
from sage_core.models import (
    SD15_SCHEDULER_CONFIG,
    ModelError,
    check_pipeline_folder,
    folder_sha256,
    load_pipeline,
    read_single_file_config,
    state_fingerprint,
    tiny_pipeline,
    verify_pin,
)
from sage_core.outputs import (
    OutputDirError,
    atomic_output_dir,
    check_output_dir,
    check_work_dir,
    is_sage_png,
    labelled_grid,
    read_metadata,
    save_png,
    to_pil,
)
from sage_core.report import build_report, image_metadata
from sage_core.sampler import BranchPoint, SamplingConfig
from sage_core.seeds import MAX_SEED, check_base_seed
from sage_core.unet_buckets import BucketedUNet

SETTINGS = CacheSettings("abc123", steps=10, height=64, width=64, guidance=7.5, guidance_end=None, scheduler="ddim")
SCHEDULE = DepthSchedule(((0.8, 0.2), (0.9, 0.4), (0.99, 0.6)))


def unit(angle: float) -> np.ndarray:
    """A unit vector at `angle` radians from e0 in the e0-e1 plane (cosine similarity cos(angle) with e0)."""
    v = np.zeros(8, np.float32)
    v[0], v[1] = np.cos(angle), np.sin(angle)
    return v


def points(*depths: int, value: float = 0.0) -> dict[int, BranchPoint]:
    """Branch points of a 1x4x4x4 latent at these depths."""
    return {d: BranchPoint(torch.full((1, 4, 4, 4), value + d), d) for d in depths}


# ------------------------------------------------------------------------------------------------------ models


def test_a_missing_upper_case_safetensors_path_is_reported_as_a_missing_model_file(tmp_path: Path) -> None:
    """A .SAFETENSORS name counts as a single-file model whatever its case, so a typo reads 'model file'."""
    with pytest.raises(ModelError, match="model file .* does not exist"):
        check_pipeline_folder(tmp_path / "V1-5.SAFETENSORS")


def test_a_config_folder_with_a_model_folder_is_refused(tmp_path: Path) -> None:
    """--model-config names configs for a single file: with a pipeline folder it is an error, not ignored."""
    with pytest.raises(ModelError, match="config folder .* is for a single-file checkpoint"):
        check_pipeline_folder(tmp_path, config=tmp_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline saved as a diffusers folder (safetensors)."""
    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_pipeline(seed=1).save_pretrained(path, safe_serialization=True)
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    """A copy of the saved folder to change."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


@pytest.mark.parametrize("component", ["tokenizer", "scheduler"])
def test_a_folder_without_its_tokenizer_or_scheduler_is_refused_naming_it(saved: Path, tmp_path: Path,
                                                                          component: str) -> None:
    """The check names a missing tokenizer/ or scheduler/ before diffusers fails on it."""
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / component)
    with pytest.raises(ModelError, match=f"missing {component}/"):
        check_pipeline_folder(folder)


def test_a_folder_pin_covers_the_model_files_only(saved: Path, tmp_path: Path) -> None:
    """Notes beside the model and pickle files (never loaded) leave the pin as it is; model_index.json counts."""
    folder = copy_of(saved, tmp_path)
    pin = folder_sha256(folder)
    (folder / "README.md").write_text("my notes", encoding="utf-8")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never loaded")
    assert folder_sha256(folder) == pin
    index = folder / "model_index.json"
    index.write_text(index.read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert folder_sha256(folder) != pin


def test_a_pin_names_its_files(saved: Path, tmp_path: Path) -> None:
    """The same bytes under another file name are another folder: the relative paths are part of the pin."""
    folder = copy_of(saved, tmp_path)
    pin = folder_sha256(folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert folder_sha256(folder) != pin


def test_a_pin_is_read_as_sha256sum_prints_it(saved: Path) -> None:
    """A pin pasted in upper case or with a newline still matches; a wrong one is refused."""
    pin = folder_sha256(saved)
    verify_pin(saved, f" {pin.upper()}\n")
    with pytest.raises(ModelError, match="does not match its SHA-256 pin"):
        verify_pin(saved, pin[::-1])


def test_the_shipped_default_model_missing_says_to_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no --model and the shipped model gone, the error says so, not that some folder does not exist."""
    monkeypatch.setattr(models, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(ModelError, match="the shipped default model is missing .* reinstall the project or pass"):
        load_pipeline()


def test_tokenizer_files_built_afresh_give_sd15_s_ids(tmp_path: Path) -> None:
    """On a machine without the cached tokenizer, the files built from open_clip's BPE give CLIP's 49408 ids."""
    import open_clip

    from sage_core.models import CLIP_VOCAB_SIZE, build_clip_tokenizer, write_clip_tokenizer_files

    tok = build_clip_tokenizer(write_clip_tokenizer_files(tmp_path / "tok"))
    reference = open_clip.tokenizer.SimpleTokenizer()
    text = "a photo of a cat on a skateboard, über café"
    assert len(tok) == CLIP_VOCAB_SIZE and tok(text).input_ids == [49406, *reference.encode(text), 49407]


def test_the_tokenizer_reads_77_tokens_as_sd15_s_text_encoder() -> None:
    """The offline CLIP tokenizer truncates a long prompt to CLIP's 77 positions, start and end tokens included."""
    from sage_core.models import CLIP_BOS, CLIP_EOS, build_clip_tokenizer

    tok = build_clip_tokenizer()
    ids = tok(" ".join(["cat"] * 100), truncation=True).input_ids
    assert tok.model_max_length == 77 and len(ids) == 77 and ids[0] == CLIP_BOS and ids[-1] == CLIP_EOS


def test_a_reason_is_one_line_of_at_most_240_characters() -> None:
    """A user's-file error quotes its cause on one line, cut to 240 characters; an empty cause reads as its type."""
    from sage_core.models import _one_line

    assert _one_line(ValueError("x" * 240)) == "x" * 240
    assert _one_line(ValueError("a\n  b" + "y" * 300)) == ("a b" + "y" * 300)[:237] + "..."
    assert _one_line(KeyError()) == "KeyError"


def test_an_in_memory_fingerprint_covers_the_text_encoder_and_the_scheduler() -> None:
    """Two pipelines that differ only in a text-encoder weight, or in their noise schedule, are two models."""
    from diffusers import DDIMScheduler

    base = state_fingerprint(tiny_pipeline(seed=0))
    text = tiny_pipeline(seed=0)
    with torch.no_grad():
        text.text_encoder.get_input_embeddings().weight[0, 0] += 1e-3
    schedule = tiny_pipeline(seed=0)
    schedule.scheduler = DDIMScheduler.from_config(schedule.scheduler.config, beta_end=0.02)
    assert len({base, state_fingerprint(text), state_fingerprint(schedule)}) == 3


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SD v1.x single-file checkpoint and a folder of its component configs."""
    from safetensors.torch import save_file

    pipe = tiny_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("single")
    save_file(ldm_state_dict(pipe), str(folder / "tiny.safetensors"))
    return folder / "tiny.safetensors", write_configs(pipe, folder / "configs")


def configs_copy(single: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the configs folder to change."""
    return Path(shutil.copytree(single[1], tmp_path / "configs"))


def test_a_config_folder_without_a_scheduler_gets_sd15_s(single: tuple[Path, Path], tmp_path: Path) -> None:
    """scheduler/ is optional in a config folder: SD v1.5's DDIM settings stand in."""
    folder = configs_copy(single, tmp_path)
    shutil.rmtree(folder / "scheduler")
    assert read_single_file_config(folder).scheduler == SD15_SCHEDULER_CONFIG


def test_a_config_that_is_not_an_object_is_named(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A config.json holding a list is reported as such."""
    folder = configs_copy(single, tmp_path)
    (folder / "vae" / "config.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ModelError, match=r"vae/config.json is not a JSON object"):
        read_single_file_config(folder)


def test_the_config_folder_s_tokenizer_is_used_and_fingerprinted(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A tokenizer/ in the config folder is the pipeline's tokenizer, and changing it changes the model's identity."""
    folder = configs_copy(single, tmp_path)
    before = read_single_file_config(folder).digest
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text(encoding="utf-8")) | {"model_max_length": 40}),
                      encoding="utf-8")
    assert read_single_file_config(folder).digest != before
    assert load_pipeline(single[0], config=folder).tokenizer.model_max_length == 40


def test_a_schedule_of_another_length_is_refused(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A file whose betas have another number of timesteps than the scheduler's is another schedule."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(single[0]))
    tensors["betas"] = tensors["betas"][:500].clone()
    save_file(tensors, str(tmp_path / "short.safetensors"))
    with pytest.raises(ModelError, match="another noise schedule"):
        load_pipeline(tmp_path / "short.safetensors", config=single[1])


# ------------------------------------------------------------------------------------------------ latent_cache


def test_hit_rate_is_hits_over_all_lookups() -> None:
    """One hit and one miss make a hit rate of one half."""
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, unit(0.0), seed=1, points=points(2, 4))
    assert cache.lookup(SETTINGS, unit(0.0)) is not None
    assert cache.lookup(SETTINGS, unit(1.5)) is None
    assert cache.stats.hit_rate() == 0.5


def test_the_memory_bound_counts_the_solver_state() -> None:
    """A point's bytes include its solver state (a multistep scheduler's history), not the latents alone."""
    latents, history = torch.zeros(1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4)
    point = BranchPoint(latents, 3, {"model_outputs": history})
    assert point_bytes(point) == (latents.numel() + history.numel()) * 4
    cache = LatentCache(latents.numel() * 4 * 2, SCHEDULE)
    assert not cache.insert(SETTINGS, unit(0.0), seed=1, points={3: point})


@pytest.mark.parametrize("max_bytes, min_depth", [(-1, 1), (100, 0)])
def test_a_cache_needs_a_byte_budget_and_a_positive_minimum_depth(max_bytes: int, min_depth: int) -> None:
    """A minimum depth of 0 would hand out "hits" that start at step 0 (no saving): refused when made."""
    with pytest.raises(ValueError, match="max_bytes must be >= 0 and min_depth >= 1"):
        LatentCache(max_bytes, SCHEDULE, min_depth=min_depth)


@pytest.mark.parametrize("bad", [np.array([np.nan, 1.0]), np.array([np.inf, 0.0]), np.zeros(2)])
def test_a_direction_that_is_not_finite_is_refused(bad: np.ndarray) -> None:
    """A NaN or infinite embedding is no cache key: insert and lookup refuse it instead of matching nothing."""
    cache = LatentCache(1 << 20, SCHEDULE)
    with pytest.raises(ValueError, match="finite, non-zero"):
        cache.insert(SETTINGS, bad, seed=1, points=points(2))
    with pytest.raises(ValueError, match="finite, non-zero"):
        cache.lookup(SETTINGS, bad)


def test_of_two_entries_as_deep_the_closer_one_is_returned() -> None:
    """Two cached groups allow the same depth: the request starts from the one whose conditioning is closer."""
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, unit(0.30), seed=1, points=points(2))
    cache.insert(SETTINGS, unit(0.05), seed=2, points=points(2))
    cache.insert(SETTINGS, unit(0.20), seed=3, points=points(2))
    hit = cache.lookup(SETTINGS, unit(0.0))
    assert hit is not None and hit.entry.seed == 2 and hit.similarity == pytest.approx(np.cos(0.05))


def test_a_point_exactly_at_the_minimum_depth_is_a_hit() -> None:
    """min_depth is the shallowest usable depth, inclusive."""
    cache = LatentCache(1 << 20, SCHEDULE, min_depth=2)
    cache.insert(SETTINGS, unit(0.0), seed=1, points=points(2))
    hit = cache.lookup(SETTINGS, unit(0.0))
    assert hit is not None and hit.point.step == 2


@pytest.mark.parametrize("depth", [0, 11])
def test_a_point_outside_the_schedule_is_refused(depth: int) -> None:
    """Depth 0 (no step shared) and a depth past the run's steps are no cache entries."""
    cache = LatentCache(1 << 20, SCHEDULE)
    with pytest.raises(ValueError, match=f"point at step {depth} filed under depth {depth}"):
        cache.insert(SETTINGS, unit(0.0), seed=1, points=points(depth))
    assert len(cache) == 0


def test_nothing_to_keep_is_not_kept() -> None:
    """A group with no points inserts nothing and says so."""
    cache = LatentCache(1 << 20, SCHEDULE)
    assert not cache.insert(SETTINGS, unit(0.0), seed=1, points={})
    assert len(cache) == 0 and cache.stats.entries == 0


def test_the_entry_count_follows_evictions() -> None:
    """After an insert evicts older entries, the entries statistic is the cache's size."""
    size = point_bytes(points(4)[4])
    cache = LatentCache(size, SCHEDULE)
    for seed in range(3):
        assert cache.insert(SETTINGS, unit(0.0), seed=seed, points=points(4))
    assert len(cache) == cache.stats.entries == 1 and cache.stats.evictions == 2 and cache.stats.bytes == size


def test_the_cache_keeps_its_own_copy_of_the_points() -> None:
    """A caller reusing its dict of points after inserting it does not change what the cache holds."""
    cache = LatentCache(1 << 20, SCHEDULE)
    mine = points(2, 4)
    cache.insert(SETTINGS, unit(0.0), seed=1, points=mine)
    mine.clear()
    hit = cache.lookup(SETTINGS, unit(0.0))
    assert hit is not None and hit.point.step == 4


def test_the_depth_histogram_counts_every_hit() -> None:
    """Each hit adds one to its depth's bin."""
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, unit(0.0), seed=1, points=points(2, 6))
    for _ in range(3):
        cache.lookup(SETTINGS, unit(0.0))
    cache.lookup(SETTINGS, unit(0.0), max_depth=3)
    assert cache.stats.depth_histogram == {6: 3, 2: 1} and cache.stats.steps_saved == 20


# ------------------------------------------------------------------------------------------------ unet_buckets


@pytest.mark.parametrize("buckets", [[0, 2], [], [-1]])
def test_buckets_must_be_positive_batch_sizes(tiny_pipe, buckets: list[int]) -> None:
    """A bucket of 0 rows (or none at all) is refused when the UNet is wrapped, not at the first call."""
    with pytest.raises(ValueError, match="buckets must be positive batch sizes"):
        BucketedUNet(tiny_pipe.unet, buckets)


@pytest.mark.parametrize("timestep", [torch.tensor(500), 500], ids=["0-d tensor", "int"])
def test_one_timestep_for_all_rows_gives_the_bare_unet_s_rows(tiny_pipe, timestep: torch.Tensor | int) -> None:
    """A timestep shared by every row (a 0-d tensor or a number, as diffusers' pipelines pass it) is not sliced."""
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        bare = unet(x, timestep, encoder_hidden_states=c, return_dict=False)[0]
        bucketed = BucketedUNet(unet, [2])(x, timestep, encoder_hidden_states=c)[0]
    torch.testing.assert_close(bucketed, bare, rtol=1e-4, atol=1e-5)


def test_bucketed_calls_return_tuples_only(tiny_pipe) -> None:
    """return_dict=True is refused with a message rather than answered with a tuple the caller indexes wrongly."""
    x, t, c = unet_buckets.sample_inputs(tiny_pipe.unet, 1, 8, tokens=4)
    with pytest.raises(ValueError, match="returns tuples only"):
        BucketedUNet(tiny_pipe.unet, [1])(x, t, encoder_hidden_states=c, return_dict=True)


def test_with_cuda_graphs_an_output_survives_the_next_call(tiny_pipe) -> None:
    """A CUDA-graph replay writes every output into the same memory: a bucketed UNet marked `graphs` copies each
    result out, so the caller's tensor from one step is not overwritten by the next."""
    buffer = torch.zeros(2, 4, 8, 8)

    class Replaying:
        config, device, dtype = tiny_pipe.unet.config, torch.device("cpu"), torch.float32

        def __call__(self, x: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor]:
            buffer.copy_(x)
            return (buffer,)

    unet = BucketedUNet(Replaying(), [2], graphs=True)
    c = torch.zeros(2, 4, 32)
    first = unet(torch.ones(2, 4, 8, 8), torch.tensor([1, 1]), encoder_hidden_states=c)[0]
    unet(torch.full((2, 4, 8, 8), 2.0), torch.tensor([1, 1]), encoder_hidden_states=c)
    assert torch.equal(first, torch.ones(2, 4, 8, 8))


def test_sample_inputs_take_the_latent_side_asked_for(tiny_pipe) -> None:
    """Warm-up inputs are `latent_side` wide (the serving size), the model's sample size only by default."""
    x, t, c = unet_buckets.sample_inputs(tiny_pipe.unet, 2, 8, tokens=5)
    assert x.shape == (2, 4, 8, 8) and t.tolist() == [500, 500] and c.shape == (2, 5, 32)
    assert unet_buckets.sample_inputs(tiny_pipe.unet, 1)[0].shape[-1] == tiny_pipe.unet.config.sample_size


def test_auto_is_no_backend_to_pin(tiny_pipe) -> None:
    """Backend "auto" is PyTorch's choice: wrapping a UNet to pin it is a ValueError naming the real backends."""
    with pytest.raises(ValueError, match="attention backend must be one of flash, cudnn, efficient, math"):
        unet_buckets.AttentionBackendUNet(tiny_pipe.unet, "auto")


def test_a_compile_cache_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A file where the compile cache folder goes is a ValueError, before the environment is touched."""
    (tmp_path / "cache").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        unet_buckets.use_compile_cache(tmp_path / "cache")


def test_empty_compiled_libraries_are_pruned_at_any_depth_and_only_those(tmp_path: Path) -> None:
    """Inductor keeps its libraries in nested folders: every empty .so goes, a 1-byte or real one stays."""
    nested = tmp_path / "aa" / "bb"
    nested.mkdir(parents=True)
    (nested / "empty.so").write_bytes(b"")
    (nested / "tiny.so").write_bytes(b"x")
    (tmp_path / "top.so").write_bytes(b"")
    assert sorted(p.name for p in unet_buckets.prune_empty_libraries(tmp_path)) == ["empty.so", "top.so"]
    assert sorted(p.name for p in tmp_path.rglob("*.so")) == ["tiny.so"]


@pytest.mark.parametrize("mode, quantize, on_aten", [("default", "fp8-rowwise", True), ("max-autotune", "fp8", False),
                                                     ("max-autotune-no-cudagraphs", "fp8", False),
                                                     ("reduce-overhead", "none", False)])
def test_float8_gemms_go_to_aten_unless_autotuning_was_asked(mode: str, quantize: str, on_aten: bool) -> None:
    """Outside max-autotune float8 GEMMs stay on ATen's kernels (no Triton template benchmarking at first call)."""
    assert unet_buckets.float8_gemms_on_aten(mode, quantize) is on_aten


def test_calibration_inputs_follow_the_seed(tiny_pipe) -> None:
    """Static float8's calibration draws its latents from `seed`: the same seed the same inputs, another seed not."""
    seen: list[torch.Tensor] = []

    class Recording:
        config, device, dtype = tiny_pipe.unet.config, torch.device("cpu"), torch.float32

        def __call__(self, x: torch.Tensor, *args: object, **kwargs: object) -> None:
            seen.append(x)

    cond = torch.zeros(2, 4, 32)
    for seed in (3, 3, 4):
        unet_buckets.unet_calibration(cond, 8, timesteps=(999,), seed=seed)(Recording())
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


def test_room_for_buckets_counts_the_variants_compiled_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's recompile limit is shared by every UNet of the process: the room made for new buckets adds the
    variants already compiled, so a second compiled UNet's buckets still compile, and the limit is restored after."""
    import torch._dynamo

    monkeypatch.setattr(unet_buckets, "compiled_variants", lambda: 5)
    limit = torch._dynamo.config.recompile_limit
    with unet_buckets.room_for_buckets(3):
        assert torch._dynamo.config.recompile_limit == limit + 3 + 5
    assert torch._dynamo.config.recompile_limit == limit


def test_cache_counts_since_subtract_each_counter() -> None:
    """The lookups between two readings: hits from hits, misses from misses."""
    later, earlier = unet_buckets.CacheCounts(5, 9), unet_buckets.CacheCounts(2, 4)
    assert later.since(earlier) == unet_buckets.CacheCounts(3, 5)


# ---------------------------------------------------------------------------------------------------- adapters


TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 16 in the tiny UNet


def write_lora(folder: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A LoRA folder whose file holds zero tensors of these names and shapes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(folder / ADAPTER_FILE))
    return folder


def test_convolution_layers_and_text_encoder_keys_are_accepted(tiny_pipe, tmp_path: Path) -> None:
    """A LoRA of a convolution (4-d matrices) fits, and its text-encoder layers are left to diffusers."""
    folder = write_lora(tmp_path / "lora", {
        "unet.conv_in.lora.down.weight": (2, 4, 3, 3), "unet.conv_in.lora.up.weight": (8, 2, 1, 1),
        f"unet.{TO_K}.lora.down.weight": (2, 32), f"unet.{TO_K}.lora.up.weight": (16, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": (2, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight": (32, 2),
    })  # fmt: skip
    assert check_adapter(tiny_pipe.unet, folder) == 2


@pytest.mark.parametrize("shapes, message", [
    ({f"unet.{TO_K}.lora.down.weight": (2, 32), f"unet.{TO_K}.lora.up.weight": (24, 2)}, "maps 32 -> 24 features"),
    ({f"unet.{TO_K}.lora.down.weight": (2, 32)}, "needs both the down"),
    ({"text_encoder.x.lora.down.weight": (2, 32)}, "holds no UNet LoRA weights"),
])  # fmt: skip
def test_a_lora_that_does_not_fit_the_unet_is_refused(tiny_pipe, tmp_path: Path, shapes: dict, message: str) -> None:
    """Another output width, half a pair, or no UNet layer at all: refused before diffusers sees the file."""
    with pytest.raises(AdapterMismatchError, match=message):
        check_adapter(tiny_pipe.unet, write_lora(tmp_path / "lora", shapes))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_an_adapter_checks_against_a_unet_that_already_has_one(tmp_path: Path) -> None:
    """After one LoRA is loaded (peft wraps the layers), a second is still checked by the layers' plain names."""
    from lora_fixtures import make_lora

    from sage_core.adapters import load_adapter

    pipe = tiny_pipeline(seed=0)
    folder = make_lora(tmp_path / "lora")
    assert load_adapter(pipe, folder) == load_adapter(pipe, folder, adapter_name="second") > 0
    assert set(pipe.get_list_adapters()["unet"]) == {"sage", "second"}


def test_an_adapter_whose_info_file_is_not_an_object_is_checked_by_shapes_only(tmp_path: Path) -> None:
    """A sage_adapter.json holding a list records no base model: the folder is accepted, not a traceback."""
    (tmp_path / INFO_FILE).write_text("[1, 2]", encoding="utf-8")
    assert resolve_adapter(str(tmp_path), "f" * 16) == tmp_path


# ----------------------------------------------------------------------------------------------------- outputs


def test_images_are_rounded_to_8_bits_as_diffusers_does() -> None:
    """to_pil rounds (diffusers' numpy_to_pil) rather than truncating: 0.999 is 255, 0.5 is 128."""
    from diffusers.image_processor import VaeImageProcessor

    image = np.array([[[0.999, 0.5, 0.0021]]], dtype=np.float32)
    assert np.asarray(to_pil(image)).tolist() == [[[255, 128, 1]]]
    assert np.array_equal(np.asarray(to_pil(image)), np.asarray(VaeImageProcessor.numpy_to_pil(image[None])[0]))


def test_values_outside_the_unit_range_saturate() -> None:
    """A decoder's overshoot is clipped to black or white, never wrapped around to the other end."""
    image = np.array([[[-0.2, 1.3, 1.0]]], dtype=np.float32)
    assert np.asarray(to_pil(image)).tolist() == [[[0, 255, 255]]]


def test_png_text_chunks_hold_json_for_values_that_are_not_strings(tmp_path: Path) -> None:
    """Image viewers see each setting as its own chunk: strings as they are, the rest as JSON (true, not True)."""
    from PIL import Image

    meta = {"prompt": "a cat", "guidance": 7.5, "cached": True, "sizes": {"w": 8}, "note": None}
    path = save_png(Image.new("RGB", (2, 2)), tmp_path / "x.png", meta)
    with Image.open(path) as img:
        text = dict(img.text)
    assert text["sage.prompt"] == "a cat" and text["sage.cached"] == "true" and text["sage.note"] == "null"
    assert json.loads(text["sage.sizes"]) == {"w": 8} and read_metadata(path) == meta


def test_only_a_png_a_run_wrote_counts_as_one(tmp_path: Path) -> None:
    """A photo, a text file, half a PNG or a missing path is not a SAGE image (False, never an exception)."""
    from PIL import Image

    ours = save_png(Image.new("RGB", (2, 2)), tmp_path / "ours.png", {"prompt": "a cat"})
    photo = tmp_path / "photo.png"
    Image.new("RGB", (2, 2)).save(photo)
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    (tmp_path / "half.png").write_bytes(ours.read_bytes()[:30])
    assert is_sage_png(ours)
    assert not any(is_sage_png(tmp_path / n) for n in ("photo.png", "notes.png", "half.png", "missing.png"))


def a_previous_run(folder: Path) -> Path:
    """A folder that looks like a run's output (report.json) with an image in it."""
    (folder / "images").mkdir(parents=True)
    (folder / "report.json").write_text("{}", encoding="utf-8")
    (folder / "images" / "0000.png").write_bytes(b"png")
    return folder


def test_an_empty_folder_needs_no_overwrite_and_a_foreign_one_is_kept(tmp_path: Path) -> None:
    """An empty folder is written into as it is; --overwrite replaces only a previous run's output."""
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(OutputDirError, match="not a previous run's output"):
        check_output_dir(foreign, overwrite=True)
    check_output_dir(a_previous_run(tmp_path / "run"), overwrite=True)


def test_overwrite_refuses_a_folder_holding_an_input_at_any_depth(tmp_path: Path) -> None:
    """A prompt file deep inside the folder to replace is this run's input: refused."""
    out = a_previous_run(tmp_path / "run")
    (out / "inputs" / "today").mkdir(parents=True)
    prompts = out / "inputs" / "today" / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(OutputDirError, match="holds this run's input"):
        check_output_dir(out, overwrite=True, inputs=(prompts,))


def test_a_failed_run_leaves_the_previous_output_and_no_temporary_folder(tmp_path: Path) -> None:
    """The run writes into a sibling temporary folder: an error removes it and keeps the old output whole."""
    out = a_previous_run(tmp_path / "run")
    with pytest.raises(RuntimeError, match="decoder failed"), atomic_output_dir(out, overwrite=True) as tmp:
        assert tmp.parent == out.parent
        (tmp / "report.json").write_text("half", encoding="utf-8")
        raise RuntimeError("decoder failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / "report.json").read_text(encoding="utf-8") == "{}"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text("new", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_a_work_folder_that_cannot_be_written_is_refused() -> None:
    """sage-train's folder must take files: /proc exists, but nothing can be made in it."""
    with pytest.raises(OutputDirError, match="/proc cannot be written"):
        check_work_dir(Path("/proc"))


def test_grid_captions_fit_their_cell() -> None:
    """A caption exactly as long as a cell's line is drawn whole; the grid is one cell per image plus a label."""
    from sage_core.outputs import _wrap

    assert _wrap("x" * 26, 26) == "x" * 26 and _wrap("x" * 27, 26) == "x" * 25 + "…"
    from PIL import Image

    grid = labelled_grid([Image.new("RGB", (4, 4))] * 3, ["a", "b", "c"], cell=32)
    assert grid.size == (96, 32 + 28)


# ------------------------------------------------------------------------------------------------------- seeds


def test_the_last_prompt_may_use_the_largest_seed() -> None:
    """seed + (prompts - 1) may reach MAX_SEED exactly, and no further."""
    check_base_seed(MAX_SEED - 1, 2)
    check_base_seed(MAX_SEED, 1)
    check_base_seed(0, 0)
    with pytest.raises(ValueError, match="seed must be in"):
        check_base_seed(MAX_SEED, 2)


# ------------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, kind", [("ddim", "DDIMScheduler"), ("dpmpp", "DPMSolverMultistepScheduler"),
                                        ("euler", "EulerDiscreteScheduler")])
def test_each_scheduler_name_makes_that_scheduler(tiny_pipe, name: str, kind: str) -> None:
    """The names the front ends check (sage_core.names) map to the sampler's scheduler of that name."""
    from sage_core.sampler import make_scheduler

    assert type(make_scheduler(tiny_pipe.scheduler.config, name, 4)).__name__ == kind


# ------------------------------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def run_of_three(tiny_pipe) -> GenerationResult:
    """Three prompts in a pair and a singleton, 2 DDIM steps with guidance, one step shared."""
    config = SamplingConfig(steps=2, guidance=2.0, shared_steps=1)
    prompts = ["a red cube", "a red ball", "a blue sky"]
    return generate(tiny_pipe, prompts, config, GroupingConfig(), seed=7, groups=[[0, 1], [2]])


def report_of(result: GenerationResult, **kwargs: object) -> dict:
    """The run report of `run_of_three`'s result, base seed 7."""
    prompts = ["a red cube", "a red ball", "a blue sky"]
    return build_report(result, prompts, model_name="tiny", seconds=1.0, grouping=GroupingConfig(), seed=7,
                        fingerprint="f" * 16, **kwargs)


def test_a_singleton_group_reports_similarity_one(run_of_three: GenerationResult) -> None:
    """A group of one prompt has no pairs: its similarities read 1.0, as the image metadata does."""
    single = report_of(run_of_three)["groups"][1]
    assert single["members"] == [2]
    assert single["min_similarity"] == single["mean_similarity"] == 1.0


# -------------------------------------------------------------------------------------------------------- auth


def test_a_token_line_splits_at_its_first_colon() -> None:
    """`client:token` splits at the first colon, so a token may hold colons; blanks around either are dropped."""
    assert parse_token_line("dev-1:abc:def") == ("dev-1", "abc:def")
    assert parse_token_line("  dev-1 :  tok  ") == ("dev-1", "tok")
    assert parse_token_line("  tok ") == ("", "tok")
    assert parse_token_line("# dev-1:tok") is None and parse_token_line("   ") is None


def test_report_totals_and_each_image_s_seed(run_of_three: GenerationResult) -> None:
    """Totals count prompts per group; each image's metadata carries its own group's seed (base seed + the index
    of the group's first member), which reproduces it, not the run's base seed."""
    report = report_of(run_of_three)
    totals = report["totals"]
    assert totals["mean_group_size"] == 1.5 and totals["independent_evaluations"] == 3 * 2 * 2
    assert totals["unet_evaluations"] == sum(g["unet_evaluations"] for g in report["groups"]) < 12
    assert totals["saving"] == pytest.approx(1 - totals["unet_evaluations"] / 12)
    assert [g["seed"] for g in report["groups"]] == run_of_three.seeds == [7, 9]
    assert [image_metadata(report, i)["seed"] for i in range(3)] == [7, 7, 9]
    assert image_metadata(report, 2)["group_size"] == 1 and image_metadata(report, 0)["group_size"] == 2

def test_a_cut_tokenizer_cache_is_written_again_not_read(tmp_path: Path) -> None:
    """A first run killed while writing the cached tokenizer left a cut merges.txt, and every later run read it
    without an error and gave other token ids (a server and a device could disagree on a prompt). The files are
    written whole or not at all, and a cut or garbled cache is written again."""
    from sage_core.models import build_clip_tokenizer, write_clip_tokenizer_files

    folder = write_clip_tokenizer_files(tmp_path / "tok")
    text = "a photograph of an astronaut riding a horse"
    want = build_clip_tokenizer(folder)(text).input_ids
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no .part left
    merges = folder / "merges.txt"
    merges.write_text("\n".join(merges.read_text(encoding="utf-8").splitlines()[:20_000]) + "\n", encoding="utf-8")
    assert build_clip_tokenizer(folder)(text).input_ids == want
    (folder / "vocab.json").write_text('{"a": 0', encoding="utf-8")
    assert build_clip_tokenizer(folder)(text).input_ids == want


def test_two_writers_of_one_file_never_share_a_part_file(tmp_path: Path) -> None:
    """Every writer had the same `<name>.part`: two processes or threads writing one file (two first runs building
    the tokenizer cache) wrote into one part file, and the first rename could publish the other's half-written
    bytes. Each writer now has its own part; the file ends whole, as one of them wrote it."""
    import threading

    from sage_core.outputs import replacing

    path = tmp_path / "vocab.json"
    inside, parts = threading.Barrier(2), []

    def write(text: str) -> None:
        with replacing(path) as part:
            parts.append(part)
            part.write_text(text[: len(text) // 2], encoding="utf-8")
            inside.wait(5)  # both writers are halfway at once
            with part.open("a", encoding="utf-8") as fh:
                fh.write(text[len(text) // 2 :])
            inside.wait(5)

    texts = ["a" * 1000, "b" * 1000]
    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(set(parts)) == 2 and path.read_text(encoding="utf-8") in texts
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]

"""Algorithm 1 end to end on one machine: encode, group, shared phase, branch phase, decode.

The edge server and the device split exactly these steps between them; this module is what the local CLI,
the tests' reference and the evaluation scripts call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sage_core.adaptive import GroupNode, flat_plan, leaf_of, root_index, run_shared_plan, unshared_roots
from sage_core.grouping import GroupingConfig, group_by_similarity, text_embeddings
from sage_core.names import MAX_PROMPT_CHARS
from sage_core.sampler import (
    BranchPoint,
    SamplingConfig,
    UNetCounter,
    branch_phase,
    initial_noises,
    make_scheduler,
    uncond_of,
)
from sage_core.seeds import MAX_SEED, check_base_seed  # noqa: F401  (re-exported for the CLIs)


def check_prompts(prompts: Sequence[str], negative_prompt: str = "") -> None:
    """Raise ValueError on an empty prompt list, an empty prompt or an over-long one (the negative prompt too)."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt {i + 1} is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}")
    check_negative_prompt(negative_prompt)


def check_negative_prompt(text: str) -> None:
    """Raise ValueError on a negative prompt longer than a prompt may be ("" is none), or one that is not valid
    UTF-8 (a command line's bytes Python kept as surrogates)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the negative prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the negative prompt is not valid UTF-8 text (byte {exc.start} onwards)") from None


def negative_text(value: str | None) -> str:
    """A caller's negative prompt as text: None (diffusers' default) is none, ""; anything but text is a
    ValueError (protobuf would turn None into "" without a word, and other values fail deep in the tokenizer)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"negative_prompt must be text, got {type(value).__name__}")
    return value


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a UTF-8 text file, one a line, stripped; blank lines and lines starting with '#' are skipped.
    A missing or empty file, text that is not UTF-8 and an over-long prompt are ValueErrors naming the line."""
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a folder, not a text file")
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not prompt text
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {exc.reason}") from exc
    stripped = [(n, line.strip()) for n, line in enumerate(lines, 1)]
    numbered = [(n, line) for n, line in stripped if line and not line.startswith("#")]
    if not numbered:
        raise ValueError(f"prompt file {path} holds no prompts")
    for n, prompt in numbered:
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path}:{n}: the prompt is {len(prompt)} characters long; "
                             f"the limit is {MAX_PROMPT_CHARS}")
    return [prompt for _, prompt in numbered]


def overlong_prompts(tokenizer, prompts: Sequence[str]) -> dict[int, int]:
    """The prompts longer than the text encoder reads, as {index: how many of their tokens it ignores}: it reads
    the first `tokenizer.model_max_length` (start and end tokens included), as StableDiffusionPipeline does."""
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
    return {i: n - limit for i, n in enumerate(lengths) if n > limit}


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level text embeddings c^m [M, L, D] and the unconditional embedding [1, L, D] (of `negative_prompt`,
    the empty prompt by default), computed exactly as StableDiffusionPipeline computes them."""
    return text_embeddings(pipe, prompts)[0], negative_embedding(pipe, negative_prompt)


def negative_embedding(pipe, negative_prompt: str = "") -> torch.Tensor:
    """The unconditional embedding [1, L, D] of classifier-free guidance: the negative prompt's, or the empty
    prompt's, as StableDiffusionPipeline encodes `negative_prompt` (once, not per prompt)."""
    return text_embeddings(pipe, [negative_prompt])[0]


def latent_shape(pipe, config: SamplingConfig) -> tuple[int, int, int, int]:
    """Shape [1, C, h, w] of one latent for the pipeline at the configured (or default) image size."""
    scale = pipe.vae_scale_factor
    height = config.height or pipe.unet.config.sample_size * scale
    width = config.width or pipe.unet.config.sample_size * scale
    return (1, pipe.unet.config.in_channels, height // scale, width // scale)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode final latents to float images [M, H, W, 3] in [0, 1], as the stock pipeline does."""
    vae = pipe.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])


def saving_closed_form(shared_steps: int, steps: int, group_size: int) -> float:
    """beta * (1 - 1/N): the fraction of UNet evaluations a group of N saves by sharing k of T steps."""
    return shared_steps / steps * (1.0 - 1.0 / group_size)


@dataclass
class GenerationResult:
    """Everything a run produced and measured."""

    images: np.ndarray  # [M, H, W, 3] float in [0, 1]
    latents: torch.Tensor  # final latents [M, C, h, w]
    groups: list[list[int]]
    seeds: list[int]  # one per group: the seed of its shared noise
    pooled: np.ndarray  # [M, D] embeddings the grouping used
    counter: UNetCounter
    config: SamplingConfig

    def independent_evaluations(self, members: int | None = None) -> int:
        """UNet evaluations independent sampling needs for `members` prompts (all by default)."""
        n = len(self.images) if members is None else members
        return n * self.config.steps * (2 if self.config.uses_cfg() else 1)


def group_noises(pipe, groups: Sequence[Sequence[int]], seed: int, config: SamplingConfig) -> tuple[list, list]:
    """One shared noise per group, seeded by `seed` + the index of its first member, and those seeds."""
    shape = latent_shape(pipe, config)
    scheduler = make_scheduler(pipe.scheduler.config, config.scheduler, config.steps)
    seeds = [seed + g[0] for g in groups]
    return initial_noises(shape, seeds, scheduler, pipe.unet.dtype, pipe.unet.device), seeds


def run_plan(
    pipe,
    roots: Sequence[GroupNode],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noises: Sequence[torch.Tensor],
    config: SamplingConfig,
    counter: UNetCounter,
) -> torch.Tensor:
    """Run a grouping plan: each level of groups batched in one `advance` from its parents' points (the roots
    from their shared noise) on its mean embedding, then every prompt's branch phase from its deepest group
    (`uncond`: one unconditional embedding [1, L, D], or one per prompt whose groups never mix them).
    Evaluations are counted under the index of each prompt's root group. Returns final latents [M, C, h, w]."""
    unet, sched = pipe.unet, pipe.scheduler.config
    root_of = root_index(roots)
    starts = [BranchPoint(noise, 0) for noise in noises]
    points = run_shared_plan(unet, sched, roots, starts, cond, uncond, config, counter)
    leaves = leaf_of(roots)
    order = sorted(leaves)
    final = branch_phase(
        unet,
        sched,
        [points[id(leaves[m])] for m in order],
        [cond[m : m + 1] for m in order],
        uncond_of(uncond, order),
        config,
        counter,
        labels=[root_of[id(leaves[m])] for m in order],
    )
    latents = torch.empty_like(final)
    latents[order] = final
    return latents


def generate(
    pipe,
    prompts: Sequence[str],
    config: SamplingConfig,
    grouping: GroupingConfig,
    seed: int = 0,
    groups: Sequence[Sequence[int]] | None = None,
    plan: Sequence[GroupNode] | None = None,
) -> GenerationResult:
    """Shared sampling for a batch of prompts (Algorithm 1). With share 0, or all singletons, every image is
    the one StableDiffusionPipeline makes with generator seed `seed + prompt index` (and `config.negative_prompt`
    as its `negative_prompt`, one for the whole batch). `groups` fixes the
    partition; `plan` gives a hierarchical plan (sage_core.adaptive) instead of one depth for all."""
    # 1. check inputs and encode the prompts (line 1)
    check_prompts(prompts, config.negative_prompt)
    cond, pooled_t = text_embeddings(pipe, prompts)
    uncond = negative_embedding(pipe, config.negative_prompt)
    pooled = pooled_t.float().cpu().numpy()
    # 2. partition into groups (line 2)
    if plan is None:
        groups = [list(g) for g in groups] if groups is not None else group_by_similarity(pooled, grouping)
        plan = flat_plan(groups, pooled, config.branch_step())
    roots = unshared_roots(plan)
    groups = [sorted(root.members) for root in roots]
    # 3. one shared noise per group (line 4); lines 5-13 run inside run_plan
    noises, seeds = group_noises(pipe, groups, seed, config)
    counter = UNetCounter()
    latents = run_plan(pipe, roots, cond, uncond, noises, config, counter)
    # 4. decode (line 14)
    images = decode_latents(pipe, latents)
    return GenerationResult(images, latents, groups, seeds, pooled, counter, config)

"""The seed range every front end checks: plain Python, no torch, so the edge server's front end (which must not
import torch) and the local tools share one definition."""

from __future__ import annotations

MAX_SEED = 2**63 - 1  # the largest seed a run may use: torch.Generator.manual_seed takes a signed 64-bit value


def check_base_seed(seed: int, prompts: int) -> None:
    """Raise ValueError unless every seed a run of `prompts` prompts may use, `seed` + a prompt's index, lies in
    [0, MAX_SEED] (`sage_core.generate.group_noises`)."""
    if not 0 <= seed <= MAX_SEED - max(prompts - 1, 0):
        raise ValueError(f"seed must be in [0, 2^63 - 1 - (prompts - 1)] = [0, {MAX_SEED - max(prompts - 1, 0)}] "
                         f"for {prompts} prompts, got {seed}")

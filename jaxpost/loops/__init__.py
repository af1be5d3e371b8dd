"""Training loops and the recipe registry that `config.algorithm` selects from.

A recipe is a loss plus the loop that drives it. The offline loop (`jaxpost.loops.offline`)
serves every algorithm that trains on a fixed dataset (SFT now; DPO and reward models are a loss
and a `register` call away); the online loop (rollout -> reward -> update) will serve PPO / GRPO.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How `config.algorithm` trains.

    loss: "module:function" of a `loss_fn(cfg, params, batch, rng) -> (loss_sum, weight_sum,
    aux)`, imported on use so the registry stays importable without every loss's dependencies.
    loop: "offline" (fixed dataset) or "online" (rollouts).
    """

    name: str
    loss: str
    loop: str = "offline"

    def loss_fn(self) -> Callable:
        module, _, fn = self.loss.partition(":")
        return getattr(importlib.import_module(module), fn)


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


register(Recipe("sft", loss="jaxpost.losses.sft:sft_loss"))

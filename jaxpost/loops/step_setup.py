"""The step side of a stage: optimizer, loss, train state and the jitted train / eval steps.

Everything comes from `jaxpost.steps` (builders) and the recipe's loss; this module only maps
the config onto them, so every recipe trains through the same compiled-once step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxpost import optim, steps
from jaxpost.loops import Recipe


@dataclasses.dataclass
class Built:
    train_step: Any
    eval_step: Any
    state: Any
    abstract_state: Any


def build(cfg, model_cfg, mesh, recipe: Recipe, base, lora_params, *, num_steps, learning_rate):
    """Train state (fresh, sharded over `mesh`) and the steps for one stage."""
    trainable = "full" if lora_params is None else "lora"
    optimizer = steps.make_optimizer(optim.config_from(cfg.optimizer, num_steps, learning_rate))
    loss_fn = recipe.loss_fn()
    state = steps.init_train_state(
        model_cfg,
        {"base": base, "lora": lora_params},
        optimizer,
        mesh,
        trainable=trainable,
        rng=jax.random.key(cfg.seed),
    )
    train_step = steps.make_train_step(
        model_cfg, loss_fn, optimizer, mesh, trainable=trainable, grad_accum=cfg.train.grad_accum
    )
    eval_step = steps.make_eval_step(model_cfg, loss_fn, mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    return Built(train_step, eval_step, state, abstract)


def params_of(state) -> tuple[dict, Any]:
    """(base params, LoRA params or None) of a train state."""
    return state.params["base"], state.params["lora"]

"""HF PEFT adapter directories for `jaxpost.lora` (`adapter_config.json` +
`adapter_model.safetensors`), in the layout `peft.PeftModel.from_pretrained` loads onto a
`transformers` causal LM and `PeftModel.save_pretrained` writes.

Call these through `lora.save_peft` / `lora.load_peft`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
from jax.experimental import multihost_utils

from jaxpost.lora import (
    HF_MODULES,
    LoraParams,
    adaptable_kernels,
    axes_meta,
    check,
    validate_hparams,
)
from jaxpost.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Where the decoder layers sit among the modules of the HF model peft wraps: a text-only causal
# LM's, and a multimodal Gemma 3's (Gemma3ForConditionalGeneration, as transformers >= 4.52
# names it), whose language model jaxpost loads and trains.
TEXT_LAYERS = "model.layers"
MULTIMODAL_LAYERS = "model.language_model.layers"
_KEY = re.compile(
    r"base_model\.model\.(model\.(?:language_model\.)?layers)\.(\d+)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight"
)
# init_lora_weights values with which peft changes the base weights when it loads the adapter
# (PiSSA, OLoRA, CorDA and LoftQ take their initial factors out of the base), or runs another
# forward (MiCA): such an adapter means something else on the unchanged base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def layers_prefix(base_model_name_or_path: str | os.PathLike | None, model_type: str) -> str:
    """TEXT_LAYERS, or MULTIMODAL_LAYERS when the base is a local multimodal Gemma 3 directory
    (model_type "gemma3"). A hub id cannot be looked at offline: its adapter is written for a
    text-only model."""
    config = Path(base_model_name_or_path or "") / "config.json"
    if base_model_name_or_path is None or not config.is_file():
        if base_model_name_or_path is not None and model_type.startswith("gemma3"):
            warnings.warn(
                f"{base_model_name_or_path} is not a local model directory, so whether it is a "
                "multimodal Gemma 3 (whose layers peft finds under model.language_model) cannot "
                "be checked: the adapter names a text-only model's layers. Pass the local "
                "directory as base_model_name_or_path for a multimodal one",
                stacklevel=3,
            )
        return TEXT_LAYERS
    try:
        source_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return TEXT_LAYERS
    return MULTIMODAL_LAYERS if source_type == "gemma3" else TEXT_LAYERS


def save_peft(
    cfg: ModelConfig,
    lora: LoraParams,
    path: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None = None,
) -> None:
    """Write an HF PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained` loads.

    adapter_model.safetensors holds, per layer i and module,
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in] (float32) and
    ....lora_B.weight [out, r]; adapter_config.json the matching LoraConfig. For a local
    multimodal Gemma 3 base the layers are model.language_model.layers.{i} and target_modules
    a regex over them, so that peft adapts the language model only (not the vision tower's
    modules of the same names). Under several processes (`jax.distributed`) every process must
    call it (factors sharded over them are gathered); process 0 writes.
    """
    check(cfg, lora)
    base = base_model_name_or_path or lora.base_model_name_or_path
    layers = layers_prefix(base, cfg.model_type)
    tensors = {}
    for block, module in lora.modules:
        factors = lora.params["layers"][block][module]
        a, b = (_to_host(factors[k]) for k in ("a", "b"))
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.{layers}.{i}.{HF_MODULES[(block, module)]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    hf_modules = sorted(HF_MODULES[m] for m in lora.modules)
    targets = (
        sorted(m.split(".")[1] for m in hf_modules)
        if layers == TEXT_LAYERS
        else rf"{re.escape(layers)}\.\d+\.(?:{'|'.join(map(re.escape, hf_modules))})"
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base is None else os.fspath(base),
        "r": lora.rank,
        "lora_alpha": alpha,
        "use_rslora": lora.use_rslora,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    if jax.process_index() == 0:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxpost.lora.save_peft")


def _to_host(x) -> np.ndarray:
    """A float32 host copy of a factor, gathered (a collective) when spread over processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype=np.float32)


# Options of a PEFT LoraConfig that change the math and are not implemented, with their no-op
# values.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "use_qalora": (False, None),
    "exclude_modules": (None, [], ""),
    "alora_invocation_tokens": (None, []),
    "layer_replication": (None, []),
    "use_bdlora": (None, False),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "velora_config": (None, {}),
}


def _peft_targets(target_modules, n_layers: int, layers: str) -> set[tuple[int, str]]:
    """(layer, HF module name) pairs that PEFT's target_modules selects among ours."""
    names = [(i, hf) for i in range(n_layers) for hf in HF_MODULES.values()]
    full = lambda i, hf: f"{layers}.{i}.{hf}"
    if target_modules == "all-linear":
        return set(names)
    if isinstance(target_modules, str):
        return {(i, hf) for i, hf in names if re.fullmatch(target_modules, full(i, hf))}
    targets = list(target_modules or [])
    return {
        (i, hf)
        for i, hf in names
        if any(full(i, hf) == t or full(i, hf).endswith("." + t) for t in targets)
    }


def _check_adapter_files(path: Path) -> None:
    """FileNotFoundError naming what is missing, and what the directory holds instead."""
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (a PEFT adapter directory)")
    if (path / CONFIG_FILE).is_file() and (path / "adapter_model.bin").is_file():
        raise FileNotFoundError(
            f"{path} holds adapter_model.bin (a PyTorch pickle) and no {WEIGHTS_FILE}; jaxpost "
            "reads safetensors only: save the adapter again with peft's "
            "save_pretrained(..., safe_serialization=True)"
        )
    named = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}"))
    missing = CONFIG_FILE if not (path / CONFIG_FILE).is_file() else WEIGHTS_FILE
    raise FileNotFoundError(
        f"{path / missing} not found: {path} is not a PEFT adapter directory"
        + (
            f"; it holds named adapters in {named} (peft saves a non-default adapter name "
            "in a subdirectory): pass one of them"
            if named
            else ""
        )
    )


def load_peft(cfg: ModelConfig, path: str | os.PathLike, dtype=jnp.float32) -> LoraParams:
    """Read an HF PEFT LoRA adapter directory (save_peft's or peft's save_pretrained output).

    Every targeted module must be adapted in every layer with the config's rank; DoRA,
    per-module rank/alpha patterns, LoRA biases, modules_to_save and the like are rejected.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    _check_adapter_files(path)
    where = str(config_path)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; expected 'LORA'")
    for option, neutral in _UNSUPPORTED.items():
        value = config.get(option)
        if option in config and value not in neutral:
            raise ValueError(
                f"{where}: {option}={value!r} is not supported; expected {neutral[0]!r}"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r}: peft changes the base model's weights when "
            "it loads this adapter, and jaxpost adds the factors to the base as it is. Save it "
            "as a plain LoRA adapter with peft: model.save_pretrained(out, "
            "path_initial_model_for_weight_conversion=<the adapter as initialised>)"
        )
    # Absent entries take LoraConfig's defaults (r=8, lora_alpha=8), as peft reads them.
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout") or 0.0)
    validate_hparams(rank, alpha if alpha is not None else -1, dropout)

    # Through the flax loader, which reads bfloat16 (numpy's cannot); factors are small.
    weights = {
        k: np.asarray(v, dtype=np.float32)
        for k, v in safetensors.flax.load_file(str(weights_path)).items()
    }
    found: dict[tuple[int, str, str], np.ndarray] = {}
    unexpected = []
    first = next((m for m in map(_KEY.fullmatch, weights) if m), None)
    layers = first.group(1) if first else TEXT_LAYERS  # one layout for every tensor
    for name, array in weights.items():
        m = _KEY.fullmatch(name)
        if m is None or m.group(1) != layers or int(m.group(2)) >= cfg.num_layers:
            unexpected.append(name)
        else:
            found[(int(m.group(2)), m.group(3), m.group(4))] = array
    matched = [m for m in map(_KEY.fullmatch, unexpected) if m and m.group(1) == layers]
    beyond = [int(m.group(2)) for m in matched if int(m.group(2)) >= cfg.num_layers]
    if unexpected and len(beyond) == len(unexpected):
        raise ValueError(
            f"{weights_path}: the adapter has factors for layer {max(beyond)} and the model "
            f"has {cfg.num_layers} layers: an adapter for another model?"
        )
    if unexpected:
        raise ValueError(
            f"{weights_path}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + f"; expected base_model.model.{layers}.{{0..{cfg.num_layers - 1}}}."
            "{self_attn.[qkvo]_proj|mlp.(gate|up|down)_proj}.lora_[AB].weight"
        )
    selected = _peft_targets(config.get("target_modules"), cfg.num_layers, layers)
    in_weights = {(i, hf) for i, hf, _ in found}
    modules = sorted({hf for _, hf in selected | in_weights})
    for i in range(cfg.num_layers):
        for hf in modules:
            for ab in "AB":
                if (i, hf, ab) not in found:
                    name = f"base_model.model.{layers}.{i}.{hf}.lora_{ab}.weight"
                    why = (
                        "jaxpost adapts a module in every layer or in none"
                        if (i, hf) not in selected
                        else f"target_modules={config.get('target_modules')!r} selects it"
                    )
                    raise ValueError(f"{weights_path}: missing tensor {name!r} ({why})")
    extra = sorted(in_weights - selected)
    if extra:
        raise ValueError(
            f"{weights_path}: holds factors for {layers}.{extra[0][0]}.{extra[0][1]}, "
            f"which target_modules={config.get('target_modules')!r} does not select"
        )

    kernels = adaptable_kernels(cfg)
    ours = {hf: key for key, hf in HF_MODULES.items()}
    tree: dict = {"layers": {}}
    paths = []
    for hf in modules:
        block, module = ours[hf]
        path_ = f"layers/{block}/{module}/kernel"
        _, fan_in, fan_out = kernels[path_][0]
        a, b = [], []
        for i in range(cfg.num_layers):
            for ab, want, out in (("A", (rank, fan_in), a), ("B", (fan_out, rank), b)):
                t = found[(i, hf, ab)]
                if t.shape != want:
                    raise ValueError(
                        f"{weights_path}: {layers}.{i}.{hf}.lora_{ab}.weight has shape "
                        f"{t.shape}, expected {want} (r={rank} from {CONFIG_FILE}, "
                        f"{cfg.model_type} dims from the model config)"
                    )
                out.append(t.T)
        tree["layers"].setdefault(block, {})[module] = {
            "a": jnp.asarray(np.stack(a), dtype),
            "b": jnp.asarray(np.stack(b), dtype),
        }
        paths.append(path_)
    return LoraParams(
        tree,
        int(rank),
        float(alpha),
        bool(config.get("use_rslora", False)),
        dropout,
        tuple(sorted(paths)),
        axes_meta(sorted(paths), kernels),
        config.get("base_model_name_or_path"),
    )

"""Every config in configs/ loads, validates, documents its run command, and builds its model."""

import importlib.util
from pathlib import Path

import jax
import pytest

from jaxpost import config as jconfig
from jaxpost import models

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
# Variants worth checking beyond the default; every file is also checked with arg=None.
VARIANTS = {
    "quickstart.py": ["test", "size=tiny"],
    "sft_full.py": ["cpu", "cpu,size=small", "cpu,size=1b"],
    "sft_lora.py": ["cpu", "cpu,rank=4"],
    "qlora.py": ["cpu", "cpu,size=100m"],
}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_dir_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.py", "sft_full.py", "sft_lora.py", "qlora.py"} <= names


@pytest.mark.parametrize(
    "path, arg",
    [(p, None) for p in CONFIGS] + [(CONFIG_DIR / n, a) for n, vs in VARIANTS.items() for a in vs],
    ids=lambda x: x.name if isinstance(x, Path) else str(x),
)
def test_config_validates(path, arg):
    module = _load(path)
    cfg = module.get_config(arg)
    for devices in (1, 8):
        jconfig.validate(cfg, num_devices=devices)
    if cfg.model.hf_path is None:
        # The full-size model's shapes, without allocating it.
        mcfg = jconfig.model_config(cfg)
        shapes = jax.eval_shape(lambda: models.init(mcfg, jax.random.key(0)))
        n = sum(x.size for x in jax.tree.leaves(shapes))
        assert n == mcfg.num_params()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_docstring_holds_the_run_command(path):
    doc = _load(path).__doc__ or ""
    assert f"python -m jaxpost.train --config=configs/{path.name}" in doc


def test_unknown_variant_names_the_nearest():
    module = _load(CONFIG_DIR / "quickstart.py")
    with pytest.raises(jconfig.ConfigError, match="did you mean 'test'"):
        module.get_config("tset")

"""Config schema validation: typos name the nearest key, wrong types and impossible values fail."""

import json

import ml_collections
import pytest

from jaxpost import config as jconfig
from jaxpost import config_inputs, models

from tiny_models import TINY_SHAPE

TINY_ARCH = {**TINY_SHAPE, "vocab_size": 64}


def _cfg() -> ml_collections.ConfigDict:
    c = jconfig.defaults()
    c.model.arch = ml_collections.ConfigDict(TINY_ARCH)
    c.data.task = "arithmetic"
    c.train.steps = 10
    return c


def _problems(cfg, **kw) -> str:
    with pytest.raises(jconfig.ConfigError) as info:
        jconfig.validate(cfg, **kw)
    return str(info.value)


def test_valid_config_passes():
    cfg = _cfg()
    assert jconfig.validate(cfg, num_devices=8) is cfg
    assert jconfig.model_config(cfg).hidden_size == 32


def test_typo_names_the_nearest_key():
    cfg = _cfg()
    cfg.train.stpes = 3  # a config file may add keys; validation must catch them
    msg = _problems(cfg)
    assert "'train.stpes'" in msg and "'train.steps'" in msg


def test_typo_in_section_name():
    cfg = _cfg()
    cfg.optimiser = ml_collections.ConfigDict({"learning_rate": 1e-3})
    msg = _problems(cfg)
    assert "'optimiser'" in msg and "'optimizer'" in msg


def test_typo_in_model_arch_names_modelconfig_field():
    cfg = _cfg()
    cfg.model.arch.hiden_size = 48
    msg = _problems(cfg)
    assert "model.arch.hiden_size" in msg and "model.arch.hidden_size" in msg


def test_wrong_type_names_key_and_types():
    cfg = _cfg()
    # Replacing a whole section bypasses ConfigDict's per-field type locking.
    cfg.train = ml_collections.ConfigDict({**cfg.train.to_dict(), "batch_size": "8"})
    msg = _problems(cfg)
    assert "train.batch_size='8'" in msg and "expected int" in msg


def test_bool_is_not_an_int_and_int_is_a_float():
    cfg = _cfg()
    cfg.train = ml_collections.ConfigDict({**cfg.train.to_dict(), "steps": True})
    assert "train.steps=True" in _problems(cfg)
    cfg = _cfg()
    cfg.optimizer = ml_collections.ConfigDict({**cfg.optimizer.to_dict(), "learning_rate": 1})
    jconfig.validate(cfg)


def test_batch_not_divisible_by_data_axes():
    cfg = _cfg()
    cfg.mesh.data, cfg.mesh.fsdp = 8, 1
    cfg.train.batch_size = 12
    msg = _problems(cfg, num_devices=8)
    assert "train.batch_size=12" in msg and "(data=8 = 8)" in msg


def test_fsdp_rest_resolved_from_device_count():
    cfg = _cfg()
    cfg.mesh.data, cfg.mesh.fsdp = 2, -1
    cfg.train.batch_size = 4  # 2 x 4 = 8 shards on 8 devices
    assert "(data=2 x fsdp=4 = 8)" in _problems(cfg, num_devices=8)
    cfg.train.batch_size = 16
    jconfig.validate(cfg, num_devices=8)


def test_mesh_larger_than_devices():
    cfg = _cfg()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1, 4
    assert "needs 16 devices; have 8" in _problems(cfg, num_devices=8)


def test_impossible_values_listed_together():
    cfg = _cfg()
    cfg.lora.rank = 0
    cfg.lora.dropout = 1.5
    cfg.optimizer.schedule = "cosin"
    cfg.optimizer.min_lr_ratio = 1.5
    cfg.algorithm = "stf"
    msg = _problems(cfg)
    assert "optimizer.min_lr_ratio=1.5 must be in [0, 1]" in msg
    assert "lora.rank=0 must be > 0" in msg
    assert "lora.dropout=1.5" in msg
    assert "optimizer.schedule='cosin'" in msg
    assert "algorithm='stf'" in msg and "did you mean 'sft'" in msg


def test_invalid_model_arch_reports_modelconfig_error():
    cfg = _cfg()
    cfg.model.arch.num_kv_heads = 3
    assert "num_heads=4 must be a multiple of num_kv_heads=3" in _problems(cfg)


def test_missing_data_and_model():
    cfg = jconfig.defaults()
    msg = _problems(cfg)
    assert "model.arch is empty" in msg and "no training data" in msg


def test_json_round_trip():
    cfg = _cfg()
    again = jconfig.from_json(jconfig.to_json(cfg))
    assert again.to_dict() == jconfig.from_json(jconfig.to_json(again)).to_dict()
    assert again.model.arch.hidden_size == 32


def test_parse_arg_variants_and_typo():
    arg = jconfig.parse_arg("cpu,size=small,steps=7", cpu=False, size="tiny", steps=100)
    assert arg.cpu is True and arg.size == "small" and arg.steps == 7
    with pytest.raises(jconfig.ConfigError, match="did you mean 'size'"):
        jconfig.parse_arg("szie=small", cpu=False, size="tiny")


def test_parse_arg_names_a_variant_of_the_wrong_type():
    with pytest.raises(jconfig.ConfigError, match=r"variant rank='abc': expected int \(default 16"):
        jconfig.parse_arg("cpu,rank=abc", cpu=False, rank=16)


def test_command_line_none_and_task_options():
    """`--config.K=None` sets every key the schema lets be None (the flag parser of a typed key
    refused the string 'None': eval_batches, num_epochs, b1, grad_clip_norm, targets), and
    `--config.data.task_options.NAME=VALUE` sets a task option (no schema key to override)."""
    from jaxpost import train

    argv = ["prog", "--config=c.py:test", "--config.train.eval_batches=None",
            "--config.data.num_epochs", "None", "--config.optimizer.b1=None",
            "--config.optimizer.grad_clip_norm=None", "--config.lora.targets=None",
            "--config.data.task_options.max_digits=2", "--config.data.task_options.ops=+-",
            "--config.train.steps=None", "--config.train.steps=5"]  # fmt: skip
    rest, taken = train._take_overrides(argv)
    assert rest == ["prog", "--config=c.py:test", "--config.train.steps=5"]  # the last wins
    cfg = _cfg()
    cfg.train.eval_batches, cfg.data.num_epochs, cfg.optimizer.b1 = 2, 1, 0.8
    cfg.lora.targets = ("q",)
    cfg.lock()
    train._apply_overrides(cfg, taken)
    assert cfg.train.eval_batches is None and cfg.data.num_epochs is None
    assert cfg.optimizer.b1 is None and cfg.optimizer.grad_clip_norm is None
    assert cfg.lora.targets is None
    assert cfg.data.task_options.to_dict() == {"max_digits": 2, "ops": "+-"}
    jconfig.validate(cfg)

    with pytest.raises(jconfig.ConfigError, match=r"train.steps takes a value of type int"):
        train._apply_overrides(cfg, {"train.steps": "None"})
    with pytest.raises(jconfig.ConfigError, match="train.stepz=None: no such config key"):
        train._apply_overrides(cfg, {"train.stepz": "None"})
    with pytest.raises(jconfig.ConfigError, match="task_options.ops needs a value"):
        train._apply_overrides(cfg, {"data.task_options.ops": None})
    train._apply_overrides(cfg, {"data.task_options.ops": "{[1]: 2}"})  # not a literal: text
    assert cfg.data.task_options.ops == "{[1]: 2}"


def test_task_options_checked_against_the_task():
    cfg = _cfg()
    cfg.data.task_options.max_digits = 2
    jconfig.validate(cfg)
    cfg.data.task_options.max_digit = 2
    msg = _problems(cfg)
    assert "'data.task_options.max_digit'" in msg
    assert "did you mean 'data.task_options.max_digits'" in msg


def test_file_data_with_a_built_in_model_has_no_tokenizer():
    cfg = _cfg()
    cfg.data.task = None
    cfg.data.train_path = "train.jsonl"
    assert "data.train_path needs a tokenizer" in _problems(cfg)


def test_a_task_and_a_data_file_are_not_both_taken():
    """A built-in task with a data file would silently train on the task: refused, naming how
    to unset the task from the command line (where None arrives as the string 'None')."""
    cfg = _cfg()
    cfg.data.train_path = "train.jsonl"
    msg = _problems(cfg)
    assert "data.task='arithmetic' and data.train_path are both set" in msg
    assert "--config.data.task=None" in msg
    cfg.data.task = "None"  # as `--config.data.task=None` sets it
    cfg.model.hf_path = "/some/model"
    jconfig.validate(cfg)
    assert cfg.data.task is None
    # A held-out file alone: unsetting the task would leave nothing to train on; say both.
    cfg = _cfg()
    cfg.data.eval_path = "eval.jsonl"
    msg = _problems(cfg)
    assert "data.eval_path is set with data.task='arithmetic'" in msg
    assert "set --config.data.task=None and --config.data.train_path" in msg


def test_an_unknown_task_is_named_before_anything_runs():
    cfg = _cfg()
    cfg.data.task = "arithmetc"
    msg = _problems(cfg)
    assert "data.task='arithmetc'; built-in tasks are ['arithmetic']; did you mean" in msg


# What the config points at on disk (`config_inputs.check`) -----------------------------------


def _inputs_problems(cfg) -> str:
    with pytest.raises(jconfig.ConfigError) as info:
        config_inputs.check(cfg)
    return str(info.value)


def test_inputs_missing_paths_are_listed_together(tmp_path):
    cfg = _cfg()
    cfg.model.hf_path = str(tmp_path / "nope")
    cfg.data.train_path = str(tmp_path / "train.jsonl")
    cfg.data.eval_path = str(tmp_path / "eval.txt")
    msg = _inputs_problems(cfg)
    assert f"model.hf_path='{tmp_path}/nope' is not a directory" in msg
    assert f"data.train_path: data file '{tmp_path}/train.jsonl' does not exist" in msg
    assert "data.eval_path: cannot tell the format of" in msg


def test_inputs_hf_dir_needs_config_weights_and_tokenizer(tmp_path):
    cfg = _cfg()
    cfg.model.hf_path = str(tmp_path)
    (tmp_path / "README.md").write_text("not a model")
    msg = _inputs_problems(cfg)
    assert "is not an HF model directory: it has no config.json, no *.safetensors weights, " in msg
    assert "no tokenizer.json or tokenizer.model (it holds ['README.md'])" in msg


def test_inputs_lora_targets_checked_against_the_model(tmp_path):
    # A built-in model, then an HF directory (config.json of the same model; the files are
    # only looked for, not read).
    cfg = _cfg()
    cfg.lora.enabled = True
    cfg.lora.targets = ("layers/attn/qq/kernel",)
    assert "lora.targets: LoRA target 'layers/attn/qq/kernel' matches no layer kernel" in (
        _inputs_problems(cfg)
    )
    hf = models.config_to_hf(jconfig.model_config(cfg))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("")
    cfg.model.hf_path = str(tmp_path)
    assert "matches no layer kernel" in _inputs_problems(cfg)
    cfg.lora.targets = ("layers/attn/(q|v)/kernel",)
    assert config_inputs.check(cfg) is cfg


def test_inputs_resume_false_refuses_a_workdir_with_checkpoints(tmp_path):
    cfg = _cfg()
    cfg.workdir = str(tmp_path)
    cfg.checkpoint.resume = False
    assert config_inputs.check(cfg) is cfg  # nothing there yet
    for step in (9, 10):
        (tmp_path / "sft" / "checkpoints" / str(step)).mkdir(parents=True)
    msg = _inputs_problems(cfg)
    assert "checkpoint.resume=False, but workdir" in msg and "(sft/9, sft/10)" in msg
    assert (tmp_path / "sft" / "checkpoints" / "10").is_dir()  # nothing deleted
    cfg.checkpoint.resume = True
    assert config_inputs.check(cfg) is cfg

"""From a validated config to a finished run: model, data, stages, evaluation, artifacts.

`Run.create(cfg)` prepares the work directory, mesh, model and tokenizer; `run_recipe` runs the
optional "pretrain" stage (full training from the initial weights) and then the recipe's stage
(LoRA or full), each through the offline loop with its own checkpoint directory, so a restarted
run resumes inside whichever stage it was in. With a built-in task the held-out accuracy is
printed before and after the recipe's stage.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import socket
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxpost import config as jconfig
from jaxpost import lora as jlora
from jaxpost import models, sharding, train_state
from jaxpost import tokenizer as jtokenizer
from jaxpost.checkpoint import Checkpointer
from jaxpost.checksums import fingerprint
from jaxpost.loops import Recipe, data_setup, evaluation, step_setup
from jaxpost.loops.offline import LoopSettings, run_offline
from jaxpost.metrics import MetricsWriter, plot_curves
from jaxpost.preemption import PreemptionGuard


@dataclasses.dataclass
class Run:
    cfg: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    model_cfg: models.ModelConfig
    params: dict
    tokenizer: Any
    task: Any  # jaxpost.data.tasks.Task or None
    writer: MetricsWriter
    guard: PreemptionGuard | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    lock: Any = None  # the work directory's lock file (`lock_workdir`), held until close()

    @classmethod
    def create(cls, cfg: ml_collections.ConfigDict) -> Run:
        workdir = Path(cfg.workdir).absolute()
        lock = None
        try:
            try:
                # One process of a multi-process run holds it: its processes share the directory.
                lock = lock_workdir(workdir) if jax.process_index() == 0 else None
                writer = MetricsWriter(
                    workdir, jsonl=cfg.metrics.jsonl, tensorboard=cfg.metrics.tensorboard
                )
                if jax.process_index() == 0:
                    (workdir / "config.json").write_text(jconfig.to_json(cfg))
            except OSError as e:  # read-only, a path through a file, no permission
                raise WorkdirUnusable(f"cannot use the work directory {str(workdir)!r}: {e}") from e
            writer.echo(f"work directory: {workdir}")
            mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
            task, tokenizer = data_setup.task_and_tokenizer(cfg)
            model_cfg, params = load_model(cfg, mesh)
            if tokenizer.vocab_size > model_cfg.vocab_size:
                raise jconfig.ConfigError(
                    f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                    f"is {model_cfg.vocab_size}; raise model.arch.vocab_size"
                )
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        writer.echo(
            f"model: {model_cfg.model_type} {model_cfg.num_params() / 1e6:.2f}M parameters; "
            f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s)"
        )
        return cls(cfg, workdir, mesh, model_cfg, params, tokenizer, task, writer, lock=lock)

    def log(self, message: str) -> None:
        if jax.process_index() == 0:  # one copy of each line, as the metrics are written
            self.writer.echo(message)

    def close(self) -> None:
        self.writer.close()
        if self.lock is not None:
            self.lock.close()  # closing the file releases its lock
            self.lock = None

    def finish(self, seconds: float) -> None:
        """Write the summary and the curves' plot, print where everything is."""
        self.summary["seconds"] = round(seconds, 1)
        if jax.process_index() == 0:
            (self.workdir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            if self.cfg.metrics.plot and self.cfg.metrics.jsonl:
                png = plot_curves(self.writer.jsonl_path, self.workdir / "training_curves.png")
                self.log(f"training curves: {png}")
        if "accuracy_before" in self.summary:
            self.log(
                f"held-out accuracy: {self.summary['accuracy_before']:.1%} before "
                f"{self.cfg.algorithm} -> {self.summary['accuracy_after']:.1%} after"
            )
        self.log(f"done in {seconds:.0f} s; artifacts in {self.workdir}")
        self.close()


class WorkdirInUse(RuntimeError):
    """Another run holds the work directory."""


class WorkdirUnusable(RuntimeError):
    """The work directory cannot be created or written (read-only, a path through a file)."""


def lock_workdir(workdir: Path):
    """An exclusive lock on `workdir/.lock` (the open file: closing it, or the process ending
    in any way, releases it). Two runs writing one directory corrupt each other's checkpoints
    (e.g. a sweep's trainer left running when the sweep was killed, and the sweep re-run), so a
    second run is refused, naming the holder."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / ".lock", "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        raise WorkdirInUse(
            f"work directory {workdir} is in use by another run ({holder}); wait for it to end, "
            "or pass another --config.workdir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def load_model(cfg: ml_collections.ConfigDict, mesh) -> tuple[models.ModelConfig, dict]:
    """A local HF checkpoint, or the built-in `model.arch` at random init, sharded over `mesh`,
    with the matmuls in `model.compute_dtype` when it is set."""
    if cfg.model.hf_path is not None:
        model_cfg, params = models.load_hf(cfg.model.hf_path, dtype=cfg.model.dtype, mesh=mesh)
    else:
        model_cfg = jconfig.model_config(cfg)
        abstract = jax.eval_shape(functools.partial(models.init, model_cfg), jax.random.key(0))
        shardings = sharding.tree_shardings(abstract, models.logical_axes(model_cfg), mesh)
        init = jax.jit(functools.partial(models.init, model_cfg), out_shardings=shardings)
        params = init(jax.random.key(cfg.seed))
    if cfg.model.compute_dtype is not None:
        model_cfg = model_cfg.replace(dtype=cfg.model.compute_dtype)
    return model_cfg, params


def task_accuracy(run: Run, params: dict, lora=None) -> float | None:
    """Held-out accuracy of greedy completions on the built-in task (None without a task)."""
    if run.task is None or not data_setup.has_eval_data(run.cfg):
        return None
    prompts, answers = data_setup.eval_prompts(run.cfg, run.task, run.tokenizer)
    return evaluation.task_accuracy(
        run.model_cfg,
        params,
        prompts,
        answers,
        decode=lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True),
        score=run.task.score,
        max_new_tokens=run.task.max_new_tokens,
        lora=lora,
        eos_id=run.tokenizer.eos_id,
        pad_id=run.tokenizer.pad_id,
    )


def train_stage(
    run: Run,
    name: str,
    recipe: Recipe,
    base: dict,
    lora_params,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    data_seed: int,
):
    """Train one stage through the offline loop; returns the final (base, lora) params.

    lora_params None trains every base parameter; otherwise only the LoRA factors.
    """
    cfg = run.cfg
    stage_dir = run.workdir / name
    batches = data_setup.train_batches(cfg, run.task, run.tokenizer, batch_size, data_seed)
    available = data_setup.steps_in_data(batches)
    if available is not None and available < steps:
        # A finite data.num_epochs ends the stage, and the learning-rate schedule with it (as
        # num_train_epochs does in transformers' Trainer): the decay is not cut off midway.
        run.log(
            f"[{name}] data: data.num_epochs={cfg.data.num_epochs} gives {available} steps of "
            f"{batch_size} rows; the stage and its schedule run {available}, not {steps}"
        )
        steps = available
    settings = LoopSettings(
        steps=steps,
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        checkpoint_every=cfg.checkpoint.every,
        progress_bar=cfg.metrics.progress_bar,
        name=name,
    )
    built = step_setup.build(
        cfg,
        run.model_cfg,
        run.mesh,
        recipe,
        base,
        lora_params,
        num_steps=steps,
        learning_rate=learning_rate,
    )

    def on_eval(state, step):
        accuracy = task_accuracy(run, *step_setup.params_of(state))
        return {} if accuracy is None else {"accuracy": accuracy}

    checkpointer = Checkpointer(
        stage_dir / "checkpoints",
        keep_last=cfg.checkpoint.keep_last,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
    )
    stage_config = cfg.to_dict()
    stage_config["stage"] = name
    with checkpointer:  # closed on an error too, without a failed save hiding that error
        state = run_offline(
            settings,
            train_step=built.train_step,
            state=built.state,
            abstract_state=built.abstract_state,
            batches=batches,
            checkpointer=checkpointer,
            writer=run.writer,
            guard=run.guard or PreemptionGuard(),
            eval_step=built.eval_step,
            eval_batches=(
                data_setup.eval_batches(cfg, run.task, run.tokenizer, batch_size)
                if data_setup.has_eval_data(cfg)
                else None
            ),
            config_dict=json.loads(json.dumps(stage_config, default=list)),
            on_eval=on_eval,
            # A stage resumed over another base (say a pretrain stage run longer) is refused.
            origin={"weights": fingerprint(base)},
        )
    stats = data_setup.stats(batches)
    if stats:
        run.summary.setdefault("data", {})[name] = stats
    if stats.get("dropped_rows"):  # said, not only counted in summary.json
        run.log(
            f"[{name}] data: {stats['dropped_rows']} rows were left out under "
            f"data.truncation={cfg.data.truncation!r}; first: {stats['dropped_examples'][0]}"
        )
    if stats.get("truncated_rows"):
        run.log(
            f"[{name}] data: {stats['truncated_rows']} rows were cut to data.max_length under "
            f"data.truncation={cfg.data.truncation!r}; first: {stats['truncated_examples'][0]}"
        )
    return step_setup.params_of(state)


def run_recipe(run: Run, recipe: Recipe) -> None:
    """Optional pretrain stage, then the recipe's stage; accuracy before/after; artifacts."""
    cfg = run.cfg
    base = run.params
    if cfg.pretrain.steps:
        base, _ = train_stage(
            run,
            "pretrain",
            recipe,
            base,
            None,
            steps=cfg.pretrain.steps,
            learning_rate=cfg.pretrain.learning_rate,
            batch_size=cfg.pretrain.batch_size,
            data_seed=cfg.data.shuffle_seed + 1,
        )
    before = task_accuracy(run, base)
    if before is not None:
        run.log(f"held-out accuracy before {recipe.name}: {before:.1%}")
        run.summary["accuracy_before"] = before

    lora_params = None
    if cfg.lora.quantize_base:
        base = train_state.quantize_base(run.model_cfg, base, run.mesh, cfg.lora.targets)
    if cfg.lora.enabled:
        lora_params = jlora.init(
            run.model_cfg,
            base,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            targets=cfg.lora.targets,
            key=jax.random.key(cfg.seed + 1),
            dropout=cfg.lora.dropout,
            use_rslora=cfg.lora.use_rslora,
        )
    base, lora_params = train_stage(
        run,
        recipe.name,
        recipe,
        base,
        lora_params,
        steps=cfg.train.steps,
        learning_rate=cfg.optimizer.learning_rate,
        batch_size=cfg.train.batch_size,
        data_seed=cfg.data.shuffle_seed,
    )
    after = task_accuracy(run, base, lora_params)
    if after is not None:
        run.log(f"held-out accuracy after {recipe.name}: {after:.1%}")
        run.summary["accuracy_after"] = after
    export(run, base, lora_params)


def export(run: Run, base: dict, lora_params) -> None:
    """The LoRA adapter (PEFT format) and / or merged HF weights into the work directory.
    Every process takes part (sharded weights are gathered); process 0 writes. The merged
    checkpoint gets the source model's tokenizer, generation config and special token ids."""
    cfg, out = run.cfg, run.workdir / "export"
    if lora_params is not None and cfg.export.peft_adapter:
        jlora.save_peft(
            run.model_cfg,
            lora_params,
            out / "peft_adapter",
            base_model_name_or_path=cfg.model.hf_path,
        )
        if cfg.model.hf_path is not None and jax.process_index() == 0:
            # As TRL's save_model: the tokenizer beside the adapter, so the directory serves.
            jtokenizer.copy_files(cfg.model.hf_path, out / "peft_adapter")
        run.log(f"LoRA adapter (PEFT format): {out / 'peft_adapter'}")
        run.summary["peft_adapter"] = str(out / "peft_adapter")
    if cfg.export.merged_hf:
        if cfg.lora.quantize_base:
            run.log("export.merged_hf skipped: the base is NF4-quantized (export the adapter)")
            return
        merged = jlora.merge(run.model_cfg, base, lora_params) if lora_params else base
        models.save_hf(run.model_cfg, merged, out / "hf_model", source=cfg.model.hf_path)
        run.log(f"merged HF weights: {out / 'hf_model'}")
        run.summary["hf_model"] = str(out / "hf_model")

"""The data side of a run: tokenizer, train / eval batch streams and held-out prompts.

A built-in task (`config.data.task`) generates its train and test splits (disjoint by
construction); otherwise `data.train_path` / `data.eval_path` are read by the Grain pipeline.
Batches are this process's share of the global batch (`batch_size // process_count` rows).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxpost import sharding
from jaxpost.data import Pipeline, PipelineConfig, formats, tasks


def task_and_tokenizer(cfg: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(the built-in Task or None, the tokenizer: the model's when loading HF, else the task's)."""
    task = tasks.get(cfg.data.task) if cfg.data.task is not None else None
    if cfg.model.hf_path is not None:
        from jaxpost import tokenizer

        return task, tokenizer.load(cfg.model.hf_path)
    return task, task.tokenizer()


@functools.lru_cache(maxsize=8)
def _task_rows(name: str, seed: int, n: int, split: str, options: str) -> tuple[dict, ...]:
    return tuple(tasks.get(name).generate_split(seed, n, split, **json.loads(options)))


def _source(cfg, split: str):
    if cfg.data.task is not None:
        n = cfg.data.num_train_examples if split == "train" else cfg.data.num_eval_examples
        options = json.dumps(cfg.data.task_options.to_dict(), sort_keys=True)
        return list(_task_rows(cfg.data.task, cfg.data.task_seed, n, split, options)) if n else None
    return cfg.data.train_path if split == "train" else cfg.data.eval_path


def _per_process(batch_size: int) -> int:
    count = jax.process_count()
    if batch_size % count:
        raise ValueError(f"batch size {batch_size} does not split over {count} processes")
    return batch_size // count


def _pipeline_config(cfg, rows: int, **split_specific) -> PipelineConfig:
    """The `data` section's settings shared by the train and held-out splits, plus the
    split's own (shuffling, epochs, remainder handling)."""
    return PipelineConfig(
        format=cfg.data.format,
        max_length=cfg.data.max_length,
        batch_size=rows,
        packing=cfg.data.packing,
        num_packing_bins=cfg.data.num_packing_bins,
        truncation=cfg.data.truncation,
        skip_malformed=cfg.data.skip_malformed,
        chat_template=cfg.data.chat_template,
        completion_only_loss=cfg.data.completion_only_loss,
        **split_specific,
    )


class BatchStream:
    """Checkpointable train batches: next() -> dict of numpy arrays; get/set_state for resume."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._it = pipeline.iterator()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it = self.pipeline.iterator(state)


def train_batches(cfg, task, tokenizer, batch_size: int, seed: int) -> BatchStream:
    config = _pipeline_config(
        cfg, _per_process(batch_size), shuffle=True, seed=seed, num_epochs=cfg.data.num_epochs
    )
    pipeline = Pipeline(_source(cfg, "train"), tokenizer, config)
    _say_skipped(pipeline, "data.train_path")
    return BatchStream(pipeline)


def steps_in_data(batches: BatchStream) -> int | None:
    """How many train steps a finite stream (data.num_epochs set) gives, the same on every
    process (the fewest any process has, so none runs out while the others step); None for a
    stream that repeats forever. Reads and tokenizes the data once more to count them."""
    if batches.pipeline.config.num_epochs is None:
        return None
    return int(sharding.agree_across_processes(batches.pipeline.count_batches(), "min"))


def eval_batches(cfg, task, tokenizer, batch_size: int) -> Callable[[], Iterator[dict]]:
    """A function returning, per evaluation, an iterator over the held-out split read once:
    every row exactly once, in order, at most `train.eval_batches` batches (None: all of them;
    a split smaller than that is not repeated). The split is validated and counted here, once.

    Every batch has the training batch's shape, so the eval step compiles once: the last,
    short batch is filled with copies of its first row whose loss masks are zero, and a process
    whose rows run out before another's (processes' shares differ by one row, and packing
    changes the count) yields such weightless batches until every process has made the same
    number of calls of the (collective) eval step. Weightless rows add nothing to loss_sum or
    weight_sum, so the means are over the split's real tokens.

    A split whose batches take at most EVAL_CACHE_BYTES is kept in memory after the first
    evaluation reads it to the end, so later evaluations neither re-read nor re-tokenize it."""
    rows = _per_process(batch_size)
    config = _pipeline_config(
        cfg, rows, shuffle=False, num_epochs=1, drop_remainder=False, even_shards=False
    )
    pipeline = Pipeline(_source(cfg, "test"), tokenizer, config)
    _say_skipped(pipeline, "data.eval_path")
    count = sharding.agree_across_processes(
        pipeline.count_batches(limit=cfg.train.eval_batches), "max"
    )

    kept: list[dict] = []  # the batches of a split small enough to keep, once read in full

    def batches() -> Iterator[dict]:
        if kept:
            yield from kept
            return
        it = pipeline.iterator()
        blank, read, size = None, [], 0
        for _ in range(count):
            batch = next(it, None)
            if batch is None and blank is None:
                raise ValueError(
                    f"process {jax.process_index()} has no held-out rows: the split has fewer "
                    f"rows than there are processes ({jax.process_count()})"
                )
            if batch is None:
                batch = blank
            else:
                batch = fill_rows(batch, rows)
                blank = weightless(batch) if blank is None else blank
            if read is not None:
                size += sum(v.nbytes for v in batch.values())
                if size > EVAL_CACHE_BYTES:
                    read = None  # too big to keep: every evaluation reads the split again
                else:
                    read.append(batch)
            yield batch
        if read is not None:  # the split was read to its end: later evaluations replay it
            kept[:] = read

    return batches


# A held-out split whose batches fit in this many bytes (per process) is read and tokenized
# once and then replayed from memory at every evaluation; a larger one is re-read each time.
EVAL_CACHE_BYTES = 256 << 20


def fill_rows(batch: dict, rows: int) -> dict:
    """A batch of fewer than `rows` rows, filled up to `rows` with weightless copies of its
    first row (every `*loss_mask` zero)."""
    have = len(next(iter(batch.values())))
    if have == rows:
        return batch
    filler = weightless({k: np.repeat(v[:1], rows - have, axis=0) for k, v in batch.items()})
    return {k: np.concatenate([v, filler[k]]) for k, v in batch.items()}


def weightless(batch: dict) -> dict:
    """The batch with every loss mask zeroed: it keeps real tokens (so nothing in the forward
    sees an unusual row) but adds no loss, weight or token count."""
    return {k: np.zeros_like(v) if k.endswith("loss_mask") else v for k, v in batch.items()}


def _say_skipped(pipeline: Pipeline, key: str) -> None:
    """With data.skip_malformed, say on the console how many rows were skipped and show the
    first (the counts also go to summary.json): skipping must not go unnoticed."""
    if not pipeline.malformed or jax.process_index() != 0:
        return
    report = pipeline.report()
    print(
        f"data: skipped {report['malformed_rows']} malformed of {report['rows']} rows of "
        f"{key} (data.skip_malformed=True); first: {report['malformed_examples'][0]}",
        flush=True,
    )


def has_eval_data(cfg) -> bool:
    return _source(cfg, "test") is not None


def eval_prompts(cfg, task, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Held-out prompts (chat-templated with the generation prompt appended, or BOS + text under
    data.chat_template=False, as in training) and reference answers."""
    rows = _source(cfg, "test")
    prompts = [
        formats.encode_prompt(
            tokenizer, r["prompt"], cfg.data.chat_template, formats.template_kwargs(r)
        )
        for r in rows
    ]
    return prompts, [r["answer"] for r in rows]


def stats(batches: BatchStream) -> dict:
    """Malformed / dropped row counts and packing efficiency of the stream so far."""
    return batches.pipeline.report()

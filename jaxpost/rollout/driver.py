"""In-process continuous batching over an engine (`rollout.generate`, in `rollout.api`, sizes
an engine and runs this driver).

The loop: admit queued samples into free slots (prefill once per prompt, insert each of its n
samples), dispatch one `generate` call, then read the previous call's tokens while the device
works on the next one (one call in flight), retire finished samples (their pages return to the
pool) and refill. A sample whose dispatched steps already cover its max_new_tokens is retired
at dispatch time, without waiting for its tokens, so its slot is refilled one call earlier.
A sample waits in the queue while no slot is free or the page pool cannot
reserve its prompt + max_new_tokens; nothing is dropped.

Requests with the same prompt tokens share one prefill, as the n samples of one request do, and
on a jaxpost engine the prompt's full KV pages (RL batches often repeat each prompt as G separate
requests, as TRL's GRPO does). Their sampling parameters and seeds stay their own, so every
result is the one the request gets alone.

Admission order: by default the requests with the largest max_new_tokens go first (stable, so
equal budgets keep their order, except that repeats of a prompt follow its first occurrence).
All requests of a `run` are known up front, and starting the longest first is the classic
longest-processing-time rule for a short makespan: the short ones fill the gaps at the end
instead of a long one running alone in an otherwise idle batch. With one max_new_tokens for
all (the usual RL rollout) it is the given order, repeats gathered. `admission="fifo"` keeps
the given order. Results are returned in request order either way.

A prefix waiting for its prompt's later repeats holds device memory (the prompt's KV) outside
the page pool. The driver holds at most `max_held_prefixes` of them (default: twice the slots),
dropping the least recently used; a dropped prompt is prefilled again when its next repeat is
admitted. Only repeats spread far apart (fifo admission of [p0 .. pN, p0 .. pN]) reach the
limit: without it, such a run held a prefix for every distinct prompt until its last repeat.

Works with any engine exposing the JetStream Engine API (`jaxpost.rollout.engine.Engine`, or
JetStream's own `mock_engine.TestEngine`); the jaxpost-only extras (sampling parameters per slot,
log-probs, page admission, releasing slots) are used when the engine has them.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxpost.rollout.engine import Engine
from jaxpost.rollout.requests import (
    Completion,
    Request,
    stop_hit,
    validate_prompt,
    warn_identical_sampled_repeats,
)
from jaxpost.rollout.state import (
    StepResult,
    fresh_seeds,
    pad_prompts,
    prefill_bucket,
    prefill_rows,
    request_key,
)


class Driver:
    """Continuous batching over `engine`. params: the weights to decode with (as returned by
    engine.load_params); None (the default) uses the engine's current weights at every call, so
    a driver built once follows `engine.update_params` (an RL loop's weight sync)."""

    ADMISSION = ("longest_first", "fifo")

    def __init__(
        self,
        engine,
        params=None,
        *,
        admission: str = "longest_first",
        max_held_prefixes: int | None = None,
    ):
        if admission not in self.ADMISSION:
            raise ValueError(f"admission must be one of {self.ADMISSION}, got {admission!r}")
        if max_held_prefixes is None:
            max_held_prefixes = 2 * engine.max_concurrent_decodes
        if max_held_prefixes < engine.max_concurrent_decodes:
            # The prompts of one admission round (up to one per free slot) are prefilled
            # together and must stay held until they are inserted.
            raise ValueError(
                f"max_held_prefixes={max_held_prefixes} is below the engine's "
                f"{engine.max_concurrent_decodes} slots"
            )
        self.admission = admission
        self.max_held_prefixes = max_held_prefixes
        self.engine = engine
        self._params = params  # None: the engine's current weights at every call
        self.is_jaxpost = isinstance(engine, Engine)
        self.vocab = engine.cfg.vocab_size if self.is_jaxpost else None

    @property
    def params(self):
        return self._params if self._params is not None else getattr(self.engine, "params", None)

    def run(
        self, requests: Sequence[Request], progress: bool | None = None
    ) -> list[list[Completion]]:
        """Generate every sample of every request. Returns completions[request][sample]."""
        eng = self.engine
        now = time.perf_counter()
        prompts = [
            validate_prompt(r.prompt, i, eng.max_prefill_length, self.vocab)
            for i, r in enumerate(requests)
        ]
        for i, r in enumerate(requests):  # an id no token can equal would never end a sample
            bad = [e for e in r.sampling.eos_token_ids if self.vocab and not 0 <= e < self.vocab]
            if bad:
                raise ValueError(
                    f"request {i}: eos_token_ids {bad} are outside the vocabulary [0, {self.vocab})"
                )
        # Requests without a seed get fresh ones, one per request (its n samples share it).
        fresh = iter(fresh_seeds(sum(r.sampling.seed is None for r in requests)))
        seeds = [next(fresh) if r.sampling.seed is None else r.sampling.seed for r in requests]
        keys = [request_key(p) for p in prompts]
        # Each request's parameters with its seed resolved, once (not per inserted sample).
        sampling = [
            r.sampling if r.sampling.seed is not None else dataclasses.replace(r.sampling, seed=s)
            for r, s in zip(requests, seeds)
        ]
        outs = [
            [Completion(i, j, prompts[i], seeds[i], queued=now) for j in range(r.sampling.n)]
            for i, r in enumerate(requests)
        ]
        group: dict[tuple[int, ...], int] = {}  # prompt tokens -> its first request
        first = [group.setdefault(tuple(p), i) for i, p in enumerate(prompts)]
        samples = collections.Counter()  # first request -> samples of its repeats to insert
        for i, r in enumerate(requests):
            samples[first[i]] += r.sampling.n
        warn_identical_sampled_repeats(first, requests)
        order = range(len(requests))
        if self.admission == "longest_first":
            order = sorted(order, key=lambda i: (-requests[i].sampling.max_new_tokens, first[i]))
        queue = collections.deque((i, j) for i in order for j in range(requests[i].sampling.n))
        total = len(queue)
        # first request -> its prompt's prefix, held while repeats wait; least recently used first
        prefixes: dict[int, object] = {}
        free = list(range(eng.max_concurrent_decodes - 1, -1, -1))
        owner: list[tuple[int, int] | None] = [None] * eng.max_concurrent_decodes
        state = eng.init_decode_state()
        in_flight: tuple | None = None  # (result, owners at dispatch)
        steps = getattr(eng, "steps_per_call", None)  # None: unknown (a foreign engine)
        dispatched_steps = [0] * eng.max_concurrent_decodes
        bar = tqdm(total=total, disable=not (progress if progress is not None else total >= 64))
        finished = 0
        while finished < total:
            if free and queue:
                self._prefill_upcoming(queue, len(free), prompts, first, prefixes)
                self._trim(prefixes)
            while free and queue:
                i, j = queue[0]
                g, sp = first[i], sampling[i]
                tokens = len(prompts[i]) + sp.max_new_tokens
                prefix = prefixes.pop(g, None)  # held: its pages may be shared
                if self.is_jaxpost and not eng.can_admit(tokens, prefix):
                    if prefix is not None:
                        prefixes[g] = prefix
                    break  # pool exhausted: wait for a retirement
                queue.popleft()
                if prefix is None:
                    prefix = self._prefill(prompts[g])
                slot = free.pop()
                if self.is_jaxpost:
                    state = eng.insert(
                        prefix, state, slot, sampling=sp, sample_index=j, request_key=keys[i]
                    )
                else:
                    state = eng.insert(prefix, state, slot)
                samples[g] -= 1
                if samples[g]:  # held again, as the most recently used
                    prefixes[g] = prefix
                    self._trim(prefixes)
                owner[slot] = (i, j)
                dispatched_steps[slot] = 0
            if queue and in_flight is None and all(o is None for o in owner):
                i, j = queue[0]
                raise RuntimeError(
                    f"request {i} (prompt {len(prompts[i])} + max_new_tokens "
                    f"{requests[i].sampling.max_new_tokens} tokens) can never fit the page pool "
                    f"of {eng.allocator.capacity} pages x {eng.page_size} tokens"
                )
            dispatched = None
            if any(o is not None for o in owner):
                state, result = eng.generate(self.params, state)
                dispatched = (result, list(owner))
                if steps is not None:
                    self._free_surely_done(steps, dispatched_steps, requests, owner, free)
            if in_flight is not None:
                finished += self._consume(in_flight, requests, outs, owner, free, bar)
            in_flight = dispatched
        bar.close()
        return outs

    def _free_surely_done(self, steps, dispatched_steps, requests, owner, free) -> None:
        """Free, before their tokens are read, slots whose dispatched steps cover max_new_tokens.

        Such a slot is finished on the device once the calls already queued have run, so it
        can take the next request now instead of one call later; its tokens are still read
        from those calls (they record the owners at dispatch).
        """
        for slot, who in enumerate(owner):
            if who is None:
                continue
            dispatched_steps[slot] += steps
            if dispatched_steps[slot] >= requests[who[0]].sampling.max_new_tokens:
                owner[slot] = None
                free.append(slot)
                if self.is_jaxpost:
                    self.engine.release(slot)

    def _trim(self, prefixes: dict) -> None:
        """Drop the least recently used held prefixes beyond max_held_prefixes. Those the next
        admission round needs were just used (at most one per slot), so they stay."""
        while len(prefixes) > self.max_held_prefixes:
            del prefixes[next(iter(prefixes))]

    def _prefill_upcoming(self, queue, count, prompts, first, prefixes) -> None:
        """Prefill the distinct prompts of the next `count` queued samples that have no prefix
        yet: one batched call per length bucket on a jaxpost engine, one call each otherwise.
        A prefix is keyed by its prompt's first request; those the next samples need are
        marked most recently used, so trimming the held prefixes keeps them.

        A jaxpost engine pads a prefill batch to a power of two rows (bounded compilations),
        so the padding rows are filled with prompts queued further on (of the same length
        bucket, among the next 4 x slots samples) while the held prefixes have free room:
        computed anyway, they are held until admitted instead of being prefilled in a later
        call. (50M rollout benchmark, 64 mixed requests through 16 slots: 81 rows of 24 ms
        each prefilled for the 64 prompts without this.)"""
        needed: list[int] = []  # the next `count` samples' prompts, in queue order
        for i, _ in itertools.islice(queue, count):
            if first[i] not in needed:
                needed.append(first[i])
        todo = [g for g in needed if g not in prefixes]
        if todo and self.is_jaxpost:
            eng = self.engine
            rows = prefill_rows(len(todo), eng.slots)  # what `prefill_many` pads to
            # Only free room: a top-up never evicts a held prefix (a later repeat's).
            room = self.max_held_prefixes - len(prefixes) - len(todo)
            bucket = lambda g: prefill_bucket(len(prompts[g]), eng.max_prefill_length)
            buckets = {bucket(g) for g in todo}
            if len(buckets) == 1:  # one call to fill; several buckets pad each their own
                for i, _ in itertools.islice(queue, count, count + 4 * eng.slots):
                    if len(todo) >= rows or room <= 0:
                        break
                    g = first[i]
                    if g not in prefixes and g not in todo and bucket(g) in buckets:
                        todo.append(g)
                        room -= 1
        if todo:
            if not self.is_jaxpost:
                for i in todo:
                    prefixes[i] = self._prefill(prompts[i])
            else:
                self._prefill_batched(todo, prompts, prefixes)
        for g in needed:  # most recently used last: the next admission round takes them
            if g in prefixes:
                prefixes[g] = prefixes.pop(g)

    def _prefill_batched(self, todo, prompts, prefixes) -> None:
        eng = self.engine
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i in todo:
            groups[prefill_bucket(len(prompts[i]), eng.max_prefill_length)].append(i)
        for members in groups.values():
            for lo in range(0, len(members), eng.slots):
                batch = members[lo : lo + eng.slots]
                made = eng.prefill_many(params=self.params, prompts=[prompts[i] for i in batch])
                for i, prefix in zip(batch, made):
                    prefixes[i] = prefix

    def _prefill(self, prompt: list[int]):
        eng = self.engine
        if self.is_jaxpost:
            bucket = prefill_bucket(len(prompt), eng.max_prefill_length)
        else:
            bucket = eng.max_prefill_length
        padded, _ = pad_prompts([prompt], 1, bucket)
        return eng.prefill(params=self.params, padded_tokens=padded[0], true_length=len(prompt))

    def _consume(self, in_flight, requests, outs, owner, free, bar) -> int:
        """Append one call's tokens; retire finished samples. Returns how many finished."""
        result, owners = in_flight
        r = _to_numpy(result)
        now = time.perf_counter()
        finished = 0
        for slot, who in enumerate(owners):
            if who is None or outs[who[0]][who[1]].finish_reason is not None:
                continue  # idle, or finished (its slot may already serve another request)
            i, j = who
            c, sp = outs[i][j], requests[i].sampling
            reason = None
            for t, ok, lp in zip(r["tokens"][slot], r["valid"][slot], r["logprobs"][slot]):
                if not ok:
                    break
                c.tokens.append(int(t))
                c.logprobs.append(float(lp))
                if c.first_token is None:
                    c.first_token = now
                if int(t) in sp.eos_token_ids:
                    reason = "eos"
                elif stop_hit(c.tokens, sp.stop):
                    reason = "stop"
                elif len(c.tokens) >= sp.max_new_tokens:
                    reason = "length"
                if reason:
                    break
            if reason is None and self.is_jaxpost and r["done"][slot]:
                reason = "length"  # the slot reached max_len before max_new_tokens
            if reason:
                c.finish_reason, c.finished = reason, now
                if owner[slot] == who:  # not freed ahead by _free_surely_done
                    owner[slot] = None
                    free.append(slot)
                    if self.is_jaxpost:
                        self.engine.release(slot)
                finished += 1
                bar.update(1)
        return finished


def _to_numpy(result) -> dict[str, np.ndarray]:
    """StepResult, or JetStream ResultTokens (no log-probs: NaN), as numpy columns."""
    if isinstance(result, StepResult):
        return result.to_numpy()
    d = np.asarray(result.data)
    tokens = d[:, result.tokens_idx[0] : result.tokens_idx[1]]
    return {
        "tokens": tokens,
        "valid": d[:, result.valid_idx[0] : result.valid_idx[1]].astype(bool),
        "logprobs": np.full(tokens.shape, np.nan, np.float32),
    }

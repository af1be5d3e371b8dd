"""The engine's device-side functions, each jitted by `jaxpost.rollout.engine.Engine`.

prefill_step   prompts [N, T] -> each prompt's k/v and last hidden state (the prefix)
continue_step  a prefix + more tokens [1, T] -> the longer prefix (JetStream's existing_prefix)
insert_step    a prefix -> its slot in the decode state (pages, length, sampling state)
decode_steps   `steps` sample-then-feed steps for every slot, in one scan
The host-side bookkeeping (page allocator, reservations, tables) stays in the engine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost import models
from jaxpost.models.config import ModelConfig
from jaxpost.models.kv_cache import DenseKVCache, store
from jaxpost.rollout import sampling
from jaxpost.rollout.state import DecodeState, LoRAView


def prefill_step(cfg: ModelConfig, scale: float, base, lora_tree, tokens, true_lengths):
    """tokens [N, T], true_lengths [N] -> k, v [N, L, T, KVH, D], last hidden [N, D]."""
    n, t = tokens.shape
    cache = DenseKVCache.create(cfg, n, t)
    lora = None if lora_tree is None else LoRAView(lora_tree, scale)
    hidden, cache = models.apply(cfg, base, tokens, cache=cache, lora=lora, return_hidden=True)
    cache = cache.stacked()  # [L, N, KVH, T, D]; a prefix travels as [L, T, KVH, D]
    k, v = (jnp.transpose(a, (1, 0, 3, 2, 4)) for a in (cache.k, cache.v))
    return k, v, hidden[jnp.arange(n), true_lengths - 1]


def continue_step(cfg: ModelConfig, scale: float, base, lora_tree, prefix, tokens, true_length):
    """Extend row `prefix.row` of a prefix by tokens [1, T] (true_length [1] of them valid).

    The prefix's k/v [N, L, Tp, KVH, D] become a dense cache of S >= Tp + T positions (a power
    of two, so a growing conversation compiles once per doubling); the new tokens are written
    at positions length .. length + T - 1 and attend to positions <= their own, so the prefix's
    padding past `length` is overwritten or never read. Returns the longer prefix's k, v
    [1, L, S, KVH, D] and the hidden state [1, D] of its last valid token.
    """
    k_rows, v_rows, hidden_rows, length, row_index = prefix
    t, tp = tokens.shape[1], k_rows.shape[2]
    s = 1 << (tp + t - 1).bit_length()

    def to_cache(rows):  # [N, L, Tp, KVH, D] -> [L, 1, KVH, S, D], the stacked layout
        a = jnp.transpose(rows[row_index], (0, 2, 1, 3)).astype(cfg.dtype)
        return jnp.pad(a, ((0, 0), (0, 0), (0, s - tp), (0, 0)))[:, None]

    cache = DenseKVCache(k=to_cache(k_rows), v=to_cache(v_rows))
    lora = None if lora_tree is None else LoRAView(lora_tree, scale)
    positions = (length + jnp.arange(t, dtype=jnp.int32))[None]
    hidden, cache = models.apply(
        cfg, base, tokens, positions=positions, cache=cache, lora=lora, return_hidden=True
    )
    k, v = (jnp.transpose(a, (1, 0, 3, 2, 4)) for a in (cache.k, cache.v))
    return k, v, hidden[:, true_length[0] - 1]


def insert_step(
    page_size: int, st: DecodeState, prefix, slot, table_row, max_new, ints, floats, eos
):
    """Write a prefix into `slot`: its k/v into the pages of `table_row` (the slot's row of the
    host's page table; in place under donation), its length, last hidden state, token budget
    `max_new` and sampling parameters (`state.slot_sampling_arrays`). The prefix is row
    `prefix.row` of its prefill batch (see `state.Prefix`)."""
    k_rows, v_rows, hidden_rows, length, row_index = prefix
    k, v, hidden = (a[row_index] for a in (k_rows, v_rows, hidden_rows))
    # Sample i of a request draws from key (seed, prompt key, i): reproducible whatever the
    # slot, and independent of other prompts' samples under the same seed.
    request = jax.random.fold_in(jax.random.key(ints[1]), ints[3])
    key = jax.random.key_data(jax.random.fold_in(request, ints[2]))
    c = st.cache
    pos = jnp.arange(k.shape[1])
    column = pos // page_size
    # Padding positions (>= length) inside the table go to their own place in it: a page the
    # slot alone holds (shared pages are full prompt pages), its region, or the scratch page;
    # decoding overwrites them before any read. Positions past the table (a continued prefix is
    # padded to a power of two, possibly past max_len) get an out-of-range page and are dropped.
    out_of_range = c.k_pages[0].shape[-3]  # the pool's page count (either layout)
    in_table = table_row[jnp.minimum(column, table_row.shape[0] - 1)]
    pages = jnp.where(column < table_row.shape[0], in_table, out_of_range)
    off = pos % page_size
    # kv_cache.store, the decode writes' scatter: a 16-bit pool stays 16-bit (models.bits).
    if isinstance(c.k_pages, tuple):  # per-layer pools, each written in place
        index = (slice(None), pages, off)  # target [KVH, T, D]
        kp, vp = (
            tuple(
                store(a, index, jnp.moveaxis(x[i], 1, 0), c.bits_dtype, mode="drop")
                for i, a in enumerate(pools)
            )
            for x, pools in ((k, c.k_pages), (v, c.v_pages))
        )
    else:
        index = (slice(None), slice(None), pages, off)  # target [L, KVH, T, D]
        kp, vp = (
            store(pools, index, jnp.moveaxis(x, 2, 1), c.bits_dtype, mode="drop")
            for x, pools in ((k, c.k_pages), (v, c.v_pages))
        )
    cache = dataclasses.replace(
        c,
        k_pages=kp,
        v_pages=vp,
        lengths=c.lengths.at[slot].set(length),
    )
    return DecodeState(
        cache=cache,
        hidden=st.hidden.at[slot].set(hidden.astype(st.hidden.dtype)),
        generated=st.generated.at[slot].set(0),
        done=st.done.at[slot].set(False),
        max_new=st.max_new.at[slot].set(max_new),
        key_data=st.key_data.at[slot].set(key),
        temperature=st.temperature.at[slot].set(floats[0]),
        top_k=st.top_k.at[slot].set(ints[0]),
        top_p=st.top_p.at[slot].set(floats[1]),
        min_p=st.min_p.at[slot].set(floats[2]),
        eos=st.eos.at[slot].set(eos),
        processed=st.processed.at[slot].set(ints[4] != 0),
    )


def decode_steps(
    cfg: ModelConfig,
    steps: int,
    width: int,
    variant,
    scale: float,
    processed: bool,
    base,
    lora_tree,
    head,
    st: DecodeState,
    table,
    active,
):
    """`steps` decode steps for every slot (sample, report, feed back); returns the new state and
    the [B, 3 * steps + 2] int32 result block that `StepResult` reads. head: a [D, V] output
    projection, or None for the model's own. width: the table columns these steps attend over
    (the host guarantees every live slot stays within width pages), so attention reads live
    pages rather than max_len. processed: whether some live slot reports processed log-probs
    (`sampling.sample`; static, so the others skip that pass over the vocabulary)."""
    lora = None if lora_tree is None else LoRAView(lora_tree, scale)
    cache = dataclasses.replace(
        st.cache, page_table=table[:, :width], lengths=jnp.where(active, st.cache.lengths, 0)
    )
    st = dataclasses.replace(st, cache=cache, done=st.done | ~active)
    # A decode-layout head gives the logits as the transpose of a [V, B] product (`matmul.dot_t`):
    # sampling reduces over V in that layout (`sampling.sample`'s vocab_first).
    vocab_first = head is None and "kernel_t" in base.get("lm_head", {})

    def step(st: DecodeState, _):
        logits = models.logits_from_hidden(cfg, base, st.hidden, kernel=head)
        keys = jax.vmap(lambda kd, g: jax.random.fold_in(jax.random.wrap_key_data(kd), g))(
            st.key_data, st.generated
        )
        tok, logp = sampling.sample(
            logits.T if vocab_first else logits,
            keys,
            st.temperature,
            st.top_k,
            st.top_p,
            st.min_p,
            variant,
            vocab_first=vocab_first,
            processed=st.processed if processed else None,
        )
        emit = ~st.done
        generated = st.generated + emit.astype(jnp.int32)
        hit_eos = jnp.any(tok[:, None] == st.eos, axis=-1)
        done = st.done | (emit & (hit_eos | (generated >= st.max_new)))
        # Finished slots get length 0: their writes go to the scratch page.
        lengths = jnp.where(done, 0, st.cache.lengths + 1)
        cache = dataclasses.replace(st.cache, lengths=lengths)
        hidden, cache = models.apply(
            cfg,
            base,
            tok[:, None],
            positions=(lengths - 1)[:, None],
            cache=cache,
            lora=lora,
            return_hidden=True,
        )
        hidden = jnp.where(done[:, None], st.hidden, hidden[:, 0])
        new = dataclasses.replace(st, cache=cache, hidden=hidden, generated=generated, done=done)
        return new, (tok, emit, logp)

    st, (toks, valid, logps) = jax.lax.scan(step, st, None, length=steps)
    st = dataclasses.replace(st, cache=dataclasses.replace(st.cache, page_table=None))
    data = jnp.concatenate(
        [
            toks.T,
            valid.T.astype(jnp.int32),
            st.generated[:, None],
            jax.lax.bitcast_convert_type(logps.T, jnp.int32),
            st.done[:, None].astype(jnp.int32),
        ],
        axis=1,
    )
    return st, data

"""Per-token log-probs of given targets from final hidden states and the LM head, without ever
materialising [N, V] logits: the plain-XLA path, chunked over tokens.

Shapes: hidden [N, D] (flatten [B, T, D] first), w [D, V], targets [N] int32.
Returns a dict of float32 [N] arrays:
  "logp": log softmax(logits)[target]; "lse": logsumexp(logits) (for z-loss);
  "entropy" (with_entropy): -sum p log p; "logit_mean" (with_logit_mean): mean_v logits
  (for label smoothing: mean_v log p = logit_mean - lse).
Logits are computed as float32 and soft-capped (Gemma 2) before the softmax.

Each chunk's logits are recomputed in the backward pass (jax.checkpoint), so the peak temporary
is O(chunk x V) in both directions instead of O(N x V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_stats(h, w, t, softcap, with_entropy, with_logit_mean, compute_dtype):
    logits = jnp.dot(
        h.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    out = {"logp": target_logit - lse, "lse": lse}
    if with_entropy:
        p = jnp.exp(logits - lse[:, None])
        out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
    if with_logit_mean:
        out["logit_mean"] = jnp.mean(logits, axis=-1)
    return out


def xla_chunked(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    chunk: int = 512,
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Chunked XLA implementation; see the module docstring."""
    n, d = hidden.shape
    compute_dtype = compute_dtype or hidden.dtype
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    fn = jax.checkpoint(
        functools.partial(
            _chunk_stats,
            softcap=softcap,
            with_entropy=with_entropy,
            with_logit_mean=with_logit_mean,
            compute_dtype=compute_dtype,
        )
    )
    if h.shape[0] == 1:
        out = jax.tree.map(lambda a: a[None], fn(h[0], w, t[0]))
    else:
        _, out = jax.lax.scan(lambda c, xs: (c, fn(xs[0], w, xs[1])), None, (h, t))
    return jax.tree.map(lambda a: a.reshape(-1)[:n], out)


def reference(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Dense reference (materialises [N, V]); the oracle for tests."""
    return _chunk_stats(
        hidden, w, targets, softcap, with_entropy, with_logit_mean, compute_dtype or hidden.dtype
    )


def fused_logprobs(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    impl: str = "auto",
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Dispatch: the chunked XLA path (the Pallas kernel plugs in here)."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"fused_logprobs impl={impl!r}; expected auto, xla or pallas")
    return xla_chunked(
        hidden,
        w,
        targets,
        softcap=softcap,
        with_entropy=with_entropy,
        with_logit_mean=with_logit_mean,
        compute_dtype=compute_dtype,
    )

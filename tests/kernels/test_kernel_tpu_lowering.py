"""The kernels lower through Pallas's Mosaic (TPU) lowering, not only the interpreter, and
"auto" picks them on TPU where the dispatch rules say so.

No TPU here: `pl.lower_as_mlir(..., platforms=["tpu"])` runs the Pallas -> Mosaic lowering on
CPU (it rejects ops and block shapes Mosaic cannot express); libtpu's own layout passes run only
on a TPU host. Shapes are the realistic ones (bf16, head_dim 128, default blocks).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jaxpost.kernels import dispatch, flash_attention, fused_logprobs, paged_attention

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def _mosaic_calls(fn, *args) -> int:
    return pl.lower_as_mlir(fn, *args).count("tpu_custom_call")


def test_flash_attention_fwd_bwd_lowers_to_mosaic():
    def fwd_bwd(q, k, v, seg, window):
        def f(q, k, v):
            return flash_attention.pallas(
                q, k, v, seg, sliding_window=window, softcap=50.0, scale=0.1, interpret=False
            )

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    # T = 1100: three 512-blocks after padding, so the causal index clamping is lowered too.
    q, kv = S((2, 1100, 8, 128), BF16), S((2, 1100, 2, 128), BF16)
    n = _mosaic_calls(fwd_bwd, q, kv, kv, S((2, 1100), jnp.int32), S((), jnp.int32))
    assert n >= 3  # forward, dq, dk/dv


def test_paged_attention_lowers_to_mosaic():
    def f(q, kp, vp, lengths, table, window):
        return paged_attention.pallas(
            q, kp, vp, lengths, table, sliding_window=window, softcap=50.0, interpret=False
        )

    pages = S((2, 64, 16, 128), BF16)
    args = (S((4, 8, 128), BF16), pages, pages, S((4,), jnp.int32), S((4, 8), jnp.int32))
    assert _mosaic_calls(f, *args, S((), jnp.int32)) >= 1


def test_fused_logprobs_fwd_bwd_lowers_to_mosaic():
    def fwd_bwd(hidden, w, targets):
        def f(hidden, w):
            return fused_logprobs.pallas(
                hidden, w, targets, softcap=30.0, with_entropy=True, interpret=False
            )

        out, vjp = jax.vjp(f, hidden, w)
        return out, vjp(out)

    # V = 1000 is not a multiple of the vocab block: the ragged tail is masked in-kernel.
    args = (S((512, 256), BF16), S((256, 1000), BF16), S((512,), jnp.int32))
    assert _mosaic_calls(fwd_bwd, *args) >= 3


@pytest.mark.parametrize(
    "t,v,want_kernel", [(128, 32000, True), (64, 4096, False)], ids=["long", "short"]
)
def test_auto_dispatch_on_tpu(monkeypatch, t, v, want_kernel):
    monkeypatch.setattr(dispatch, "on_tpu", lambda: True)
    q = jnp.zeros((1, t, 2, 8))
    got = jax.make_jaxpr(lambda q: flash_attention.flash_attention(q, q, q))(q)
    assert ("pallas_call" in str(got)) == want_kernel
    hidden, w, targets = jnp.zeros((4, 8)), jnp.zeros((8, v)), jnp.zeros((4,), jnp.int32)
    got = jax.make_jaxpr(lambda h, w: fused_logprobs.fused_logprobs(h, w, targets))(hidden, w)
    assert ("pallas_call" in str(got)) == want_kernel
    pages = jnp.zeros((1, 4, 8, 8))
    got = jax.make_jaxpr(paged_attention.paged_attention)(
        jnp.zeros((2, 2, 8)), pages, pages, jnp.ones((2,), jnp.int32), jnp.zeros((2, 2), jnp.int32)
    )
    assert "pallas_call" in str(got)  # decode always takes the kernel on TPU

"""Pallas kernels for the hot path, each with a plain-XLA reference of the same signature.

Installed as the package `jaxpost.kernels` (setuptools package-dir), so this folder stays at the
top of the repository without claiming the global import name `kernels`.

Modules: `flash_attention` (+ `flash_attention_kernel`), `paged_attention`, `fused_logprobs`,
and `dispatch` (which implementation runs, interpret modes, per-shard execution). See README.md.
"""

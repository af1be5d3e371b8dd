"""Pallas kernels for the hot path, each with a plain-XLA reference of the same signature.

Installed as the package `jaxpost.kernels` (setuptools package-dir), so this folder stays at the
top of the repository without claiming the global import name `kernels`.

Modules: `flash_attention` (+ `flash_attention_kernel`), `paged_attention`, `fused_logprobs`,
and `dispatch` (which implementation runs, interpret modes, per-shard execution). See README.md.
"""

if __name__ == "kernels":
    # Imported by the global name: the repository root is on sys.path (`python -m ...`, a REPL
    # or notebook started there) and something asked for Hugging Face's `kernels` package, as
    # `transformers` does where it is installed (transformers 5.25 depends on it; `import peft`
    # then imports it). Hand the import over to that package, so this folder never shadows it;
    # where it is not installed, the import fails as it would anywhere else.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:  # (the import system drops the half-made module from sys.modules)
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is `jaxpost.kernels`)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what the import statement returns
    _spec.loader.exec_module(_module)

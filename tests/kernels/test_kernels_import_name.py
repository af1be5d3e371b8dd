"""The repository's top-level kernels/ folder is installed as `jaxpost.kernels`; run from the
repository root (which `python -m` and a REPL put on sys.path) it must not shadow Hugging Face's
`kernels` package, which `transformers` imports where it is installed (and `peft` with it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_at_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_import_kernels_at_the_repository_root_gets_hugging_faces_package():
    pytest.importorskip("kernels")  # installed with transformers (the test extra)
    code = (
        "import os, peft, kernels, jaxpost.kernels as ours\n"
        "print(os.path.realpath(kernels.__file__)); print(os.path.realpath(ours.__file__))\n"
        "from kernels import CUDAProperties  # what transformers asks it for"
    )
    out = _run_at_root("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours = out.stdout.split()
    # (A virtual environment may live inside the repository, as CI's .venv does.)
    assert ours == os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    assert theirs != ours and "site-packages" in theirs.split(os.sep)


def test_without_hugging_faces_package_the_import_fails_as_elsewhere():
    # -S: no site-packages, so no Hugging Face `kernels`; the root is still on sys.path.
    out = _run_at_root("-S", "-c", "import kernels")
    assert out.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr
    assert "jaxpost.kernels" in out.stderr

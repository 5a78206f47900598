"""
pytest set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors only in Triton's interpreter, which Triton switches on when it is first
imported with TRITON_INTERPRET=1 in the environment: so it is set here, before any test module imports cog_kernel.
cog_attention reads the variable again at each call; outside test_kernel.py it is removed while a test runs, so the
models and trainers use the reference on the CPU, as a CPU user's run does, instead of the (slow) interpreter.
"""

import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def interpreter_only_in_kernel_tests(request, monkeypatch):
    if request.module.__name__ != "test_kernel":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The trainers install SIGINT/SIGTERM handlers that only set a flag. Left in place, they would be inherited by
    the worker processes that later tests fork, and a pool's SIGTERM on shutdown would no longer end them (a hang)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)

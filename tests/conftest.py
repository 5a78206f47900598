"""
pytest set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors only in Triton's interpreter, which Triton switches on when it is first
imported with TRITON_INTERPRET=1 in the environment: so it is set here, before any test module imports cog_kernel.
cog_attention reads the variable again at each call; outside test_kernel.py it is removed while a test runs, so the
models and trainers use the reference on the CPU, as a CPU user's run does, instead of the (slow) interpreter.

A test that hangs ends the run: with pytest-timeout installed (requirements.txt), a test still running after
TEST_TIMEOUT seconds makes pytest print every thread's stack (the main thread's names the test) and exit with an error.
The slowest test takes ~20 s on 2 idle cores and ~40 s beside other work: the limit leaves room for a busier machine.
"""

import json
import os
import signal
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the tests import the project's modules from here
sys.path.insert(0, REPO)

TEST_TIMEOUT = 300

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:  # "thread": a stack dump and exit works even when the test is stuck inside C code
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT, method="thread"))


@pytest.fixture(autouse=True)
def interpreter_only_in_kernel_tests(request, monkeypatch):
    if request.module.__name__ != "test_kernel":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The trainers install SIGINT/SIGTERM handlers (training.StopRequest) that only set a flag: give pytest its own
    back, so that no later test runs (or starts a worker process) under a handler that ignores SIGTERM."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def write_eval_task(folder, name, docs):
    """A local lm-evaluation-harness multiple-choice task over docs ({"q", "choices", "label"}) in folder/tasks, for
    analyze.py eval --include_path=folder/tasks --tasks=name; returns that path."""
    with open(folder / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    task = {"task": name, "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}}, "doc_to_text": "{{q}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    (folder / "tasks").mkdir()
    (folder / "tasks" / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder / "tasks"


def prepare_functions_corpus(folder, count, val_fraction):
    """A byte-level LM dataset of count small Python functions, prepared by data/prepare_lm.py into folder/data;
    returns that path."""
    from data import prepare_lm
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(count):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    prepare_lm.main([f"--files={folder}/docs.jsonl", f"--out_dir={folder / 'data'}", "--tokenizer=bytes",
                     f"--val_fraction={val_fraction}", "--num_proc=1"])
    return str(folder / "data")

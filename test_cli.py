"""
What a user meets at the command line of every entry point: --help, errors that name the problem before anything is
written, checkpoints that are loaded without running code and survive damage, and stop requests (Ctrl-C, SIGTERM).
Tiny models, a few subprocesses; about half a minute on 2 CPU cores.

    python -m pytest test_cli.py -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import analyze
import sample
import train_diffusion
import train_lm
from data import prepare_lm
from train_utils import load_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
# tiny runs of both trainers: milliseconds per step
LM = ["--preset=demo", "--block_size=16", "--n_layer=3", "--n_head=2", "--n_embd=16", "--ffn_hidden=32",
      "--batch_size=4", "--eval_iters=2", "--log_interval=1"]
DIFFUSION = ["--preset=demo", "--img_size=8", "--patch_size=4", "--embed_dim=16", "--depth=3", "--num_heads=2",
             "--batch_size=4", "--eval_iters=1", "--grid_size=4", "--sample_steps=2", "--log_interval=1"]

torch.set_num_threads(1)


@pytest.fixture
def lm_data(tmp_path):
    """A small byte-level dataset in tmp_path/data."""
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n")
    prepare_lm.main([f"--files={tmp_path}/docs.jsonl", f"--out_dir={tmp_path / 'data'}", "--tokenizer=bytes",
                     "--val_fraction=0.25", "--num_proc=1"])
    return str(tmp_path / "data")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# checkpoints are loaded without running code from them


class RunsCode:
    """Unpickled (torch.load with weights_only=False), this creates a file: code that the checkpoint chose, run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, lm_data):
    marker = str(tmp_path / "code_ran")
    for kind in ("lm", "diffusion"):
        os.makedirs(tmp_path / kind)
        torch.save({"kind": kind, "iter": 1, "model": {}, "payload": RunsCode(marker)}, tmp_path / kind / "ckpt.pt")
    lm, diffusion = str(tmp_path / "lm"), str(tmp_path / "diffusion")
    attempts = {"train_lm.py --resume": lambda: train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={lm}",
                                                                    "--resume"]),
                "train_diffusion.py --resume": lambda: train_diffusion.main(DIFFUSION + [f"--out_dir={diffusion}",
                                                                                         "--resume"]),
                "sample.py": lambda: sample.main([f"--out_dir={lm}"]),
                "analyze.py attention": lambda: analyze.main(["attention", f"--out_dir={lm}"])}
    for name, attempt in attempts.items():
        with pytest.raises(SystemExit) as err:
            attempt()
        message = str(err.value)
        assert message.startswith("error: refusing to load") and "\n" not in message, (name, message)
        assert "io.open" in message or "builtins.open" in message, message  # it names what it refused
        assert not os.path.exists(marker), name
    # the same from the shell: one line on stderr, no traceback
    result = run_cli("sample.py", f"--out_dir={diffusion}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "refusing to load" in result.stderr
    assert not os.path.exists(marker)
    # and the payload is real: an unsafe load runs it
    torch.load(os.path.join(lm, "ckpt.pt"), weights_only=False)
    assert os.path.exists(marker)


def test_checkpoints_written_before_safe_loading_still_load(tmp_path):
    """Older checkpoints held numpy's RNG state as np.random.get_state() returns it: an array, allowed by type."""
    import numpy as np
    np.random.seed(3)
    state = np.random.get_state()
    torch.save({"iter": 5, "rng": {"numpy": state}}, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert loaded["iter"] == 5 and np.array_equal(loaded["rng"]["numpy"][1], state[1])

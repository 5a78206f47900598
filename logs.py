"""
What a run reports: the JSONL metrics log in out_dir (one consistent history across resumes), its loss-curve PNG, and
for a GPU-sized run started on a CPU, what it is about to do and how long it would take.
"""

import json
import os


class MetricsLog:
    """Appends one JSON object per line to out_dir/log.jsonl. On resume, lines past the resumed iteration are
    dropped so the file tells one consistent history."""

    def __init__(self, out_dir, resume_iter=None):
        self.path = os.path.join(out_dir, "log.jsonl")
        if resume_iter is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("iter", 0) <= resume_iter]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, **metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path, png_path, title="", log_y=False):
    """Train loss (per logged iteration) and validation loss (per eval) against iteration, as a PNG. log_y for
    losses that fall by orders of magnitude (diffusion), where a linear axis flattens everything after the start."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss-curve PNG (pip install matplotlib)")
        return
    rows = read_log(log_path)
    train = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


class SlowRun:
    """A run sized for GPUs, started on a CPU (the paper presets are the default): say what it is about to do, and
    after its first step how long the whole run would take, so that a user can stop early."""

    min_flops = 1e12  # per step: ~10 s on a CPU

    def __init__(self, device, flops_per_step, plan, master=True):
        self.active = master and not str(device).startswith(("cuda", "mps")) and flops_per_step > self.min_flops
        if self.active:
            print(f"warning: a GPU-sized run on the CPU: {plan}; {flops_per_step:.1e} FLOPs per step, about "
                  f"{duration(flops_per_step / 1e11)} each at a CPU's 1e11 FLOP/s. The measured time follows the "
                  "first step; Ctrl-C stops and saves. For a CPU-sized run: --preset=demo", flush=True)

    def first_step(self, seconds, steps_left):
        if self.active:
            self.active = False
            print(f"the first step took {seconds:.1f} s: the other {steps_left:,} steps would take about "
                  f"{duration(seconds * steps_left)} at this pace", flush=True)


def duration(seconds):
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"

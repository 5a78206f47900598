"""
What a run reports: the JSONL metrics log in out_dir (one consistent history across resumes), its loss-curve PNG,
for a GPU-sized run started on a CPU, what it is about to do and how long it would take, and progress: a bar on a
terminal, plain lines in a redirected log.
"""

import json
import os
import sys
import time


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


def progress(iterable=None, total=None, desc="", unit="it", unit_scale=False, disable=False, leave=True,
             file=None):
    """Progress of a long loop, to stderr: on a terminal a tqdm bar whose time left reads "about 3 minutes left"
    (not tqdm's 13:17:27, which looks like a clock); elsewhere (a log file, a pipe) a plain line at each tenth of the
    way and at the end, so a redirected log holds no carriage returns. Used as tqdm is: iterate it, or update(n)."""
    file = file or sys.stderr
    if disable or not file.isatty():
        return PlainProgress(iterable, total, desc, unit, unit_scale, file, silent=disable)
    from tqdm import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            spent, done, whole = d["elapsed"], d["n"], d["total"]
            left = f", about {duration((whole - done) * spent / done)} left" if whole and 0 < done < whole else ""
            return {**d, "spent": duration(spent), "left": left}
    known = total or hasattr(iterable, "__len__")
    bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{spent} so far{left}{postfix}]"
                  if known else "{desc}: {n_fmt} {unit} [{spent} so far{postfix}]")
    return Bar(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, file=file,
               bar_format=bar_format, dynamic_ncols=True)


class PlainProgress:
    """progress() where there is no terminal: the same calls as a tqdm bar, plain lines."""

    def __init__(self, iterable, total, desc, unit, unit_scale, file, silent=False):
        self.iterable, self.desc, self.unit, self.unit_scale, self.file, self.silent = \
            iterable, desc, unit, unit_scale, file, silent
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.start, self.next_tenth, self.last_line = 0, "", time.time(), 1, time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()

    def amount(self, n):
        if not self.unit_scale:
            return f"{n:,}"
        from tqdm import tqdm
        return tqdm.format_sizeof(n)

    def line(self):
        spent = time.time() - self.start
        text = f"{self.desc}: {self.amount(self.n)}"
        if self.total:
            share = 100 * self.n / self.total
            text += f"/{self.amount(self.total)} {self.unit} ({share:.0f}%), {duration(spent)} so far"
            if 0 < self.n < self.total:
                text += f", about {duration((self.total - self.n) * spent / self.n)} left"
        else:
            text += f" {self.unit}, {duration(spent)} so far"
        print(text + (f", {self.postfix}" if self.postfix else ""), file=self.file, flush=True)
        self.last_line = time.time()

    def update(self, n=1):
        self.n += n
        if self.silent:
            return
        if self.total:  # a line at each tenth of the way
            tenth = int(10 * self.n / self.total)
            if self.next_tenth <= tenth < 10:
                self.next_tenth = tenth + 1
                self.line()
        elif time.time() - self.last_line >= 60:
            self.line()

    def set_postfix_str(self, text="", refresh=True):
        self.postfix = text

    def close(self):
        if not self.silent and self.n and self.next_tenth <= 10:
            self.next_tenth = 11
            self.line()

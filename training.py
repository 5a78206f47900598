"""
The pieces of a training step that both trainers call in their loops: the options every run has, the device and
precision, AdamW and the learning-rate schedule, the optimizer step (unscale, clip, step), the NaN guard, the GPU peak
throughput that MFU is measured against, and stopping a run without losing it. The first Ctrl-C or SIGTERM asks the
trainer to save a checkpoint and stop (within one micro-batch on one process; at the end of the step under torchrun,
where every rank must stop together); a second Ctrl-C quits at once without saving; and run_trainer turns what ends a
run into a message and an exit code: a run that stopped and saved exits as shells expect of a signal, 130 after
Ctrl-C, 143 after SIGTERM (Stopped), so that `python train_lm.py ... && python sample.py ...` samples only a finished
model.
"""

import dataclasses
import math
import os
import signal
import sys
import typing
from contextlib import nullcontext

import torch

from checkpoint import RESUME_MAY_CHANGE, check_out_dir, start_or_resume
from cli import check_at_least, option, parse_config, quit_interrupted, require


# --- the options every run has ----------------------------------------------------------------------------------------

# the --dtype choices: "auto" picks one of the others for the device
Dtype = typing.Literal["auto", "float32", "bfloat16", "float16"]


@dataclasses.dataclass
class RunOptions:
    """The fields both trainers have: how a run starts, and where and how it runs."""
    resume: bool = option(False, "continue the run in out_dir with its config (given anew, these may change: "
                          f"{', '.join(RESUME_MAY_CHANGE)})", section="run and system")
    overwrite: bool = option(False, "a new run where out_dir holds one: the old one moves to out_dir/previous-<time>/")
    device: str = option("auto", "auto: cuda if there is a GPU, else cpu")
    dtype: Dtype = option("auto", "auto: bfloat16 on GPUs that have it, float16 (with loss scaling) on others, "
                          "float32 on CPU")
    compile: bool = option(False, "torch.compile the model (with --fsdp: each block)")
    fsdp: bool = option(False, "under torchrun: shard the weights, gradients and AdamW state across the processes "
                        "(FSDP2, one unit per block) instead of a whole replica per GPU (DDP); without torchrun: "
                        "nothing to shard, the run says so and trains as usual")
    activation_checkpointing: bool = option(False, "keep only each block's input for the backward and recompute the "
                                            "rest there: far less activation memory for about a third more compute")
    memory_check: bool = option(True, "on a GPU, stop before the first step when the memory estimate does not fit "
                                "(false: start anyway)")
    deterministic: bool = option(False, "bit-reproducible GPU runs (slower): deterministic algorithms, two-pass Cog "
                                 "backward")
    seed: int = 1337


def check_training(config):
    """The values of the fields both trainers have that cannot work (the trainer checks its own after these)."""
    check_at_least(config, 1, "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval")
    check_at_least(config, 0, "max_iters", "learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip")
    for key in ("beta1", "beta2"):  # AdamW's
        require(0 <= getattr(config, key) < 1, f"--{key}={getattr(config, key)}: must be in [0, 1)")
    check_out_dir(config.out_dir)
    resolve_dtype(config.dtype, "cpu")


def start_run(config_cls, presets, check_config, kind, what, argv=None):
    """The run's config from the command line, checked (check_training's checks, then the trainer's check_config), and
    on --resume the run's checkpoint (of this kind, "lm" or "diffusion"; `what` names it in errors) and its config.
    The device and dtype are resolved ("auto": see the options). Returns (config, the checkpoint's path, the checkpoint
    or None)."""
    config = parse_config(config_cls, presets, argv)
    check_training(config)
    check_config(config)
    config, ckpt_path, checkpoint = start_or_resume(config, kind, what, argv)
    config.device = resolve_device(config.device)
    config.dtype = resolve_dtype(config.dtype, config.device)
    require(not (config.fsdp and config.dtype == "float16"), "--fsdp trains in bfloat16 or float32, not float16 (its "
            "loss scaling is not sharded here): use --dtype=bfloat16 on a GPU that has it, or --dtype=float32")
    return config, ckpt_path, checkpoint


def pick_fields(config, target_cls):
    """The fields of target_cls (e.g. a model config) taken from a larger run config with the same names; the target's
    own checks (heads divide the width, ...) end the run with their message."""
    try:
        return target_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(target_cls)})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


# --- device and precision ---------------------------------------------------------------------------------------------

def resolve_device(device):
    """'auto': cuda if there is a GPU, else cpu. Any other name must be a device this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: --device={device}: not a device (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cuda":
        require(torch.cuda.is_available(), f"--device={device}, but torch sees no CUDA GPU here: use --device=cpu")
        require((parsed.index or 0) < torch.cuda.device_count(),
                f"--device={device}, but there are {torch.cuda.device_count()} CUDA GPU(s)")
    if parsed.type == "mps":
        require(torch.backends.mps.is_available(), f"--device={device}, but torch sees no MPS device here")
    return device


def resolve_dtype(dtype, device):
    """'auto': bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (CPU autocast is slower than fp32)."""
    require(dtype in typing.get_args(Dtype), f"--dtype={dtype}: choose one of {', '.join(typing.get_args(Dtype))}")
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


# The CPU threads: below this many multiply-adds in one forward pass (parameters x tokens), a model runs on one thread.
# A small operation split over threads waits for the slowest of them, and on a busy machine that is a thread the OS has
# put to sleep; a large one gains more from the second core than it loses. The bound lies between the diffusion demos
# (6.6e8), which a second thread slows down beside a busy process, and the LM demo (3.8e9), which it speeds up
# (BENCHMARKS.md, "CPU threads").
CPU_THREADS_MIN_WORK = 1.5e9
CPU_THREADS_DEFAULT = torch.get_num_threads()  # torch's choice at start-up: the cores, or OMP_NUM_THREADS


def set_cpu_threads(device, model, tokens, announce=False):
    """On the CPU: one thread for a small model (fewer than CPU_THREADS_MIN_WORK multiply-adds in one forward pass of
    `tokens` tokens, counted as parameters x tokens), torch's default (one per core) for a larger one. OMP_NUM_THREADS,
    when set, wins. GPU runs are left alone. Returns the number of threads; announce prints it when it is one."""
    if not str(device).startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    work = sum(p.numel() for p in model.parameters()) * tokens
    threads = 1 if work < CPU_THREADS_MIN_WORK else CPU_THREADS_DEFAULT
    torch.set_num_threads(threads)
    if announce and threads == 1 and CPU_THREADS_DEFAULT > 1:
        print(f"CPU threads: 1 of {CPU_THREADS_DEFAULT} (a small model: {work:.1e} multiply-adds per forward pass; "
              "more threads wait on each other when the machine is busy; OMP_NUM_THREADS=N overrides)")
    return threads


def autocast_context(device, dtype):
    if dtype == "float32":
        return nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device_type=device.split(":")[0], dtype=ptdtype)


def make_grad_scaler(device, dtype):
    """fp16 needs loss scaling; bf16 and fp32 do not (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))


def use_deterministic_algorithms(on):
    """--deterministic: PyTorch's deterministic algorithms (a warning where an op has none, instead of an error), which
    Cog attention follows by running its two-pass backward (no atomic adds)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_up_torch(seed, deterministic):
    """Before the model is built: the seed, --deterministic, and TF32 matmuls (fp32 work on tensor cores)."""
    use_deterministic_algorithms(deterministic)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                   "A800": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0,
                   "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def peak_flops(device):
    """Peak FLOP/s of the GPU this runs on, or None (CPU, or a GPU we have no figure for: MFU is then not shown)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return 756e12
            return tflops * 1e12
    return None


# --- the optimizer, its schedule and its step -------------------------------------------------------------------------

def configure_adamw(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices (every parameter of dim >= 2) and none on gains, biases and 1-D params."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda"  # the fused CUDA implementation is several times faster per step
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def learning_rate(it, lr, warmup_iters, max_iters=None, min_lr=None):
    """Linear warmup to lr; then cosine decay to min_lr at max_iters, or constant when max_iters is None."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if max_iters is None or min_lr is None:
        return lr
    if it >= max_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale and clip the gradients (when grad_clip > 0), step, update the loss scale, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss, it, ckpt_path):
    """Stop the run on a NaN or inf loss; the last checkpoint on disk is the last good state."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at iteration {it}; stopping. The last good checkpoint is {ckpt_path} "
                            "(lower the learning rate or use --dtype=bfloat16, then --resume)")


# --- stopping on a signal ---------------------------------------------------------------------------------------------

class StopNow(Exception):
    """Raised by StopRequest.poll() once a stop was asked for: the trainer saves the state it had at the start of the
    iteration (a half-done step or evaluation is dropped, and redone on --resume) and exits."""


class Stopped(SystemExit):
    """Raised by a trainer once it has saved after a stop request: the exit status 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class StopRequest:
    """The first Ctrl-C or SIGTERM sets a flag; poll(), called before each micro-batch and each evaluation batch, then
    raises StopNow, so the trainer stops within one micro-batch wherever it is. Under DDP the ranks must stop together:
    poll() does nothing and the flag is agreed on at the end of the step (agree_on_step). A second Ctrl-C raises
    KeyboardInterrupt: the trainer quits without saving (run_trainer). Python runs handlers between operations, so
    both wait for the operation under way (a big matmul); two presses within one operation count as one."""

    def __init__(self, ddp=False):
        self.requested, self.immediate = False, not ddp
        self.signum = 0  # the first signal received (the exit status is 128 + it), 0 until one is
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            when = "at the next micro-batch" if self.immediate else "after this step"
            say(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping {when} "
                "(Ctrl-C again to quit without saving)\n")
        self.requested, self.signum = True, self.signum or signum

    def poll(self):
        if self.requested and self.immediate:
            raise StopNow


def say(text):
    """Print from a signal handler: straight to the file descriptor, as print() would fail if the signal came while
    the main thread was inside print() (sys.stdout's lock is not reentrant)."""
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (OSError, ValueError):  # no file descriptor (stdout captured in memory)
        print(text, end="", flush=True)


def run_trainer(main):
    """Run a trainer's main(): a NaN or inf loss exits with its message, Ctrl-C outside the training loop (or a
    second one inside it) quits without a traceback; the process group is always torn down."""
    try:
        main()
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # checkpoints are written atomically: the one on disk is whole
        quit_interrupted("quitting without saving; the checkpoint on disk is the last one saved")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

"""
What train_lm.py and train_diffusion.py share: the command line (a preset plus --key=value overrides of a config
dataclass, help text in the fields), the training loop (TrainLoop: gradient accumulation, loss scaling, clipping,
evaluation and checkpoint cadence, log lines with MFU), a run's start (a new run never replaces one; --resume continues
it bit for bit), atomic checkpoints with RNG state, saving on Ctrl-C / SIGTERM, DDP set-up, mixed precision, the
learning-rate schedule, the NaN guard, and the JSONL log with its loss-curve PNG.
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import random
import signal
import sys
import textwrap
import time
import typing
from contextlib import nullcontext

import numpy as np
import torch

# -----------------------------------------------------------------------------
# command line: --preset=NAME, then --key=value overrides of a config dataclass's fields; a bare --flag means True.
# A field's --help text is in its metadata: option(default, "what it is"), or dataclasses.field(metadata=...).


def option(default, help="", **metadata):
    """A config field with its --help text. metadata may add choices (the values allowed) and section (a heading in
    --help for this field and those after it)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def convert(key, text, field_type, choices=None):
    """Turn the text of --key=text into the field's type; a clear error names the key otherwise."""
    if typing.get_origin(field_type) is typing.Union:  # Optional[X]: "none" means None
        if text.lower() == "none":
            return None
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    if typing.get_origin(field_type) is typing.Literal:
        field_type, choices = str, typing.get_args(field_type)
    if choices and text not in choices:
        raise SystemExit(f"error: --{key}={text}: choose one of {', '.join(choices)}")
    try:
        if field_type is bool:
            return {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                    "off": False}[text.lower()]
        if field_type is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        if field_type is float:
            return float(text)
        if field_type is str:
            return text
    except (KeyError, ValueError):
        raise SystemExit(f"error: --{key}={text}: expected a value of type {field_type.__name__}") from None
    raise SystemExit(f"error: --{key}: unsupported field type {field_type}")


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(f"error: {message} (--help lists the keys)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written; the keys' help in a column, unbroken at hyphens ("MS-COCO" stays whole)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=120)

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False)


def type_name(field_type, choices=None):
    if choices or typing.get_origin(field_type) is typing.Literal:
        return "{" + ",".join(choices or typing.get_args(field_type)) + "}"
    if typing.get_origin(field_type) is typing.Union:
        return " or ".join("none" if t is type(None) else type_name(t) for t in typing.get_args(field_type))
    return getattr(field_type, "__name__", str(field_type)).upper()


def help_value(value):
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) and (not value or value != value.strip()) else str(value)


def config_parser(config_cls, presets, default_preset, usage, description):
    """An argparse parser of config_cls's fields, grouped in --help by their sections (or the class that declares
    them), each with its type, default and help; the presets and what each changes in the description."""
    module = sys.modules.get(config_cls.__module__)
    script = os.path.basename(getattr(module, "__file__", "") or "script.py")
    usage = usage or f"python {script}" + (" [--preset=NAME]" if presets is not None else "")
    description = (description if description is not None else (module.__doc__ or "")).strip()
    if presets is not None:
        description += "\n\npresets (--preset=NAME; --key=value overrides apply on top of it):\n" + "\n".join(
            textwrap.fill(f"{name}{' (the default)' if name == default_preset else ''}: "
                          + (" ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"),
                          116, initial_indent="  ", subsequent_indent="      ") for name, values in presets.items())
    parser = OneLineErrors(usage=f"{usage} [--key=value ...]   (a bare --flag means --flag=true)",
                           description=description, formatter_class=HelpFormatter,
                           argument_default=argparse.SUPPRESS, allow_abbrev=False)
    if presets is not None:
        parser.add_argument("--preset", choices=list(presets), default=default_preset, help=argparse.SUPPRESS)
    owner = {}  # a field's group in --help: its section, else the class that declares it first
    for cls in reversed(config_cls.__mro__):
        owner.update({name: cls.__name__ for name in vars(cls).get("__annotations__", {}) if name not in owner})
    types, groups, title, fields = typing.get_type_hints(config_cls), {}, None, dataclasses.fields(config_cls)
    for f, before in zip(fields, (None,) + fields[:-1]):
        if before is None or "section" in f.metadata or owner[f.name] != owner[before.name]:
            title = f.metadata.get("section", owner[f.name])
        if f.name == "preset":
            continue
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        field_type, choices = types[f.name], f.metadata.get("choices")
        text = "; ".join(t for t in (f"default {help_value(f.default)}", f.metadata.get("help", "")) if t)
        bool_flag = dict(nargs="?", const=True) if field_type is bool else {}
        groups[title].add_argument(f"--{f.name}", metavar="BOOL" if bool_flag else type_name(field_type, choices),
                                   help=text.replace("%", "%%"), **bool_flag,
                                   type=lambda value, key=f.name, t=field_type, c=choices: convert(key, value, t, c))
    return parser


def parse_config(config_cls, presets, argv=None, default_preset="paper", usage=None, description=None):
    """Build config_cls from --preset=NAME (a dict of field overrides) and --key=value overrides; presets None: no
    presets (and no preset field). Unknown keys, unknown presets and values of the wrong type or outside the choices
    exit with one line that names them; --help prints every key with its type, default and help, and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    types = typing.get_type_hints(config_cls)
    for arg in argv:  # only --key=value and a bare --flag (so that every value is seen as one given with its key)
        key, has_value, _ = arg[2:].partition("=")
        if not arg.startswith("--") and arg != "-h":
            raise SystemExit(f"error: unexpected argument {arg!r}; use --key=value (--help lists the keys)")
        if not has_value and types.get(key, bool) is not bool:
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
    parser = config_parser(config_cls, presets, default_preset, usage, description)
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SystemExit(f"error: unknown config key {unknown[0].partition('=')[0]} (--help lists the keys)")
    values = vars(given)
    if presets is not None:
        values = {"preset": values["preset"], **presets[values.pop("preset")], **values}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def cli_keys(argv=None):
    """The keys given on the command line (parse_config has checked them), e.g. to refuse ones that do not apply."""
    argv = sys.argv[1:] if argv is None else argv
    return {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}


def require(condition, message):
    """An error that ends the run before it starts: one line, named key."""
    if not condition:
        raise SystemExit(f"error: {message}")


def check_at_least(config, minimum, *names):
    """Each named field (unless it is None) must be at least minimum."""
    for name in names:
        value = getattr(config, name)
        require(value is None or value >= minimum, f"--{name}={value}: must be at least {minimum}")


def check_training(config):
    """The values of the fields both trainers have that cannot work (the trainer checks its own after these)."""
    check_at_least(config, 1, "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval")
    check_at_least(config, 0, "max_iters", "learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip")
    for key in ("beta1", "beta2"):  # AdamW's
        require(0 <= getattr(config, key) < 1, f"--{key}={getattr(config, key)}: must be in [0, 1)")
    check_out_dir(config.out_dir)
    resolve_dtype(config.dtype, "cpu")


def check_out_dir(path, key="out_dir"):
    """A folder that exists or can be made: its nearest existing ancestor is a folder we may write in."""
    require(path and not os.path.isfile(path), f"--{key}={path}: must name a folder, "
            f"not {'a file' if path else 'nothing'}")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    require(os.path.isdir(ancestor) and os.access(ancestor, os.W_OK | os.X_OK),
            f"--{key}={path}: cannot be made or written ({ancestor} is not a folder we may write in)")


RUN_FILES = ("ckpt.pt", "ckpt.prev.pt", "log.jsonl", "loss.png")  # what a trainer writes, with its samples_*.png


def is_run_file(name):
    return name in RUN_FILES or (name.startswith("samples_") and name.endswith(".png"))


def make_out_dir(path, move_aside=False):
    """Make the run's folder; move_aside (--overwrite): an earlier run's files there (only those: the folder may hold
    others) go to path/previous-<time>/."""
    try:
        os.makedirs(path, exist_ok=True)
        earlier = sorted(name for name in os.listdir(path) if is_run_file(name)) if move_aside else []
        if earlier:
            aside = fresh_path(os.path.join(path, "previous-" + time.strftime("%Y%m%d-%H%M%S")))
            os.makedirs(aside)
            for name in earlier:
                os.replace(os.path.join(path, name), os.path.join(aside, name))
            print(f"--overwrite: moved the earlier run's {len(earlier)} file(s) to {aside}")
    except OSError as err:
        raise SystemExit(f"error: cannot make --out_dir={path} ({err.strerror or err})") from None


# --- a new run never replaces an earlier one, and --resume continues the run it names ------------------------------

# On --resume every key comes from the checkpoint's config, except these: they change how long the run goes on and
# how it reports, not what it trains, so given on the command line they override the checkpoint's (and say so).
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "grid_size", "sample_steps")
# and these, which always come from this command: where the run is, how to treat it, where and how fast to run it
THIS_COMMAND = ("out_dir", "resume", "overwrite", "device", "compile")


def check_new_run(config):
    """Before anything is written: a new run into a folder that holds one must say --overwrite."""
    # a checkpoint or a log make a run (its pictures alone do not)
    held = [name for name in RUN_FILES[:3] if os.path.exists(os.path.join(config.out_dir, name))]
    if config.resume and config.overwrite:
        raise SystemExit("error: --resume continues the run in --out_dir and --overwrite moves it aside: give one")
    if held and not config.resume and not config.overwrite:
        raise SystemExit(f"error: --out_dir={config.out_dir} holds a run ({', '.join(held)}): continue it with "
                         f"--resume, start this one in a new --out_dir, or give --overwrite to move the old one aside "
                         f"to {os.path.join(config.out_dir, 'previous-<time>')}")


def start_or_resume(config, kind, what, argv=None):
    """Before anything is written: a new run may not replace one (check_new_run); --resume loads the run's checkpoint,
    which must be of this kind ("lm" or "diffusion"; `what` names it in the error), and its config (resume_config).
    Returns (config, ckpt_path, checkpoint or None)."""
    check_new_run(config)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    if not config.resume:
        return config, ckpt_path, None
    checkpoint = load_checkpoint(ckpt_path)
    if checkpoint.get("kind") != kind:
        raise SystemExit(f"error: {ckpt_path} is a {checkpoint.get('kind')!r} checkpoint, not {what}")
    return resume_config(config, checkpoint, ckpt_path, argv), ckpt_path, checkpoint


def resume_config(config, checkpoint, ckpt_path, argv=None):
    """The config of the run in ckpt_path: the checkpoint's, with this command's RESUME_MAY_CHANGE (printed) and
    THIS_COMMAND keys. Another key given with a value that differs from the run's is an error that names it."""
    given, saved = cli_keys(argv), checkpoint.get("config", {})
    for f in dataclasses.fields(config):
        if f.name in THIS_COMMAND or f.name not in saved:  # (a key newer than the checkpoint keeps this command's)
            continue
        ours, theirs = getattr(config, f.name), saved[f.name]
        if f.name in given and ours != theirs:
            if f.name not in RESUME_MAY_CHANGE:
                raise SystemExit(f"error: --{f.name}={ours}: the run in {ckpt_path} has {f.name}={theirs!r}, and "
                                 f"--resume continues that run (start a new one in a new --out_dir to change it)")
            print(f"resuming with {f.name}={ours!r} (the run had {theirs!r})")
        else:
            setattr(config, f.name, theirs)
    return config


def fresh_path(path):
    """path, or if a file is there already the first free one of path-2, path-3, ... (before the extension): a new
    output (a sample grid, a plot, its numbers) never replaces an earlier one."""
    root, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{root}-{n}{ext}"
    return path


def print_config(config):
    width = max(len(f.name) for f in dataclasses.fields(config))
    for f in dataclasses.fields(config):
        print(f"  {f.name:<{width}} = {getattr(config, f.name)!r}")


def pick_fields(config, target_cls):
    """The fields of target_cls (e.g. a model config) taken from a larger run config with the same names; the target's
    own checks (heads divide the width, ...) end the run with their message."""
    try:
        return target_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(target_cls)})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


# -----------------------------------------------------------------------------
# devices, DDP and precision


def setup_distributed(device):
    """Under torchrun, join the process group and take this rank's GPU. Returns (ddp, rank, world_size, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    from torch.distributed import init_process_group
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_process_group(backend=backend)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, rank, world_size, device


def micro_steps_per_process(grad_accum, world_size):
    """grad_accum counts micro-batches over all processes, so a step's tokens (or images) do not depend on the GPUs."""
    if grad_accum % world_size:
        raise SystemExit(f"error: grad_accum ({grad_accum}) must be divisible by the number of GPUs ({world_size})")
    return grad_accum // world_size


def gather_generator_states(generator, ddp, world_size):
    """Every rank's data generator state, in rank order, for the checkpoint."""
    if not ddp:
        return [generator.get_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, generator.get_state())
    return states


def restore_generator_state(generator, states, rank, world_size, master):
    if len(states) == world_size:
        generator.set_state(states[rank])
    elif master:
        print("note: a different number of processes than the checkpoint's: batches are drawn afresh")


def agree_on_step(loss_sum, micro_steps, stop, ddp, world_size):
    """The step's mean loss over all ranks, and whether any rank was asked to stop (so that all stop together)."""
    shared = torch.stack([loss_sum / micro_steps, torch.tensor(float(stop.requested), device=loss_sum.device)])
    if ddp:
        torch.distributed.all_reduce(shared)
        shared[0] /= world_size
    return shared[0].item(), shared[1].item() > 0


def use_deterministic_algorithms(on):
    """--deterministic: PyTorch's deterministic algorithms (a warning where an op has none, instead of an error), which
    Cog attention follows by running its two-pass backward (no atomic adds)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)


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


# the --dtype choices: "auto" picks one of the others for the device
Dtype = typing.Literal["auto", "float32", "bfloat16", "float16"]


def resolve_dtype(dtype, device):
    """'auto': bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (CPU autocast is slower than fp32)."""
    require(dtype in typing.get_args(Dtype), f"--dtype={dtype}: choose one of {', '.join(typing.get_args(Dtype))}")
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def autocast_context(device, dtype):
    if dtype == "float32":
        return nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device_type=device.split(":")[0], dtype=ptdtype)


def make_grad_scaler(device, dtype):
    """fp16 needs loss scaling; bf16 and fp32 do not (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))


# peak dense tensor-core throughput in TFLOP/s for bf16/fp16 (no sparsity), by GPU name
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


# -----------------------------------------------------------------------------
# learning rate, the optimizer step, NaN guard, the trainers' entry point


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


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss, it, ckpt_path):
    """Stop the run on a NaN or inf loss; the last checkpoint on disk is the last good state."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at iteration {it}; stopping. The last good checkpoint is {ckpt_path} "
                            "(lower the learning rate or use --dtype=bfloat16, then --resume)")


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale and clip the gradients (when grad_clip > 0), step, update the loss scale, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


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


def run_script(main):
    """Run a script's main(); Ctrl-C ends it with a line instead of a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        quit_interrupted()


def quit_interrupted(note=""):
    """Exit 130 after Ctrl-C, as a shell expects."""
    print("\ninterrupted" + (f": {note}" if note else ""), file=sys.stderr)
    raise SystemExit(130)


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


# -----------------------------------------------------------------------------
# checkpoints


def rng_state():
    """The global generators' states as tensors and plain values, so the checkpoint loads with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # rng_state()'s plain values (older checkpoints: get_state()'s own tuple)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"],
                                                "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_checkpoint_path(path):
    """Where save_checkpoint keeps the checkpoint that path held before: ckpt.pt -> ckpt.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save_checkpoint(obj, path):
    """torch.save to a temporary file beside path, then os.replace: a crash mid-write never leaves a broken file.
    The checkpoint path held until now stays beside it as ckpt.prev.pt (a hard link, so path never goes missing): if
    the new one is damaged later (a full disk, a bad copy), the one before it is still there."""
    prev = previous_checkpoint_path(path)
    tmp, prev_tmp = f"{path}.tmp.{os.getpid()}", f"{prev}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            try:
                os.link(path, prev_tmp)
                os.replace(prev_tmp, prev)
            except OSError:  # a file system without hard links: a moment without path, but never without both
                os.replace(path, prev)
        os.replace(tmp, path)
    finally:  # an error or Ctrl-C while writing; or prev_tmp left as it was, when prev was a link to path already
        for leftover in (tmp, prev_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)


def numpy_array_globals():
    """The functions and types a pickled numpy array names: older nanoCog checkpoints held np.random.get_state()'s
    array. None of them runs code of the file's choosing: they rebuild an array from its shape, dtype and bytes."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # the last: numpy.dtypes.UInt32DType


class DamagedFile(Exception):
    pass


def load_plain(path, map_location):
    """torch.load(weights_only=True): tensors and plain Python values only, so loading never runs code from the file
    (a pickle can name any function to call; this loader refuses all but PyTorch's own safe ones). Raises DamagedFile
    for a truncated or corrupt file; exits with a one-line message for a file that asks for anything else."""
    def load(allowed=()):
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    try:
        try:
            return load()
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err) or "numpy" not in str(err):
                raise
            return load(numpy_array_globals())  # an older checkpoint's numpy RNG state: only the array types
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            refused = (str(err).partition("WeightsUnpickler error:")[2].strip().splitlines() or ["?"])[0]
            raise SystemExit(f"error: refusing to load {path}: it holds more than tensors and plain values "
                             f"({refused.partition(' was not an allowed global')[0]}), and loading it could run code "
                             "from the file") from None
        raise DamagedFile(f"{type(err).__name__}: {err}") from None
    except (EOFError, KeyError, OSError) as err:  # an empty or cut file; a file that is not PyTorch's
        raise DamagedFile(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err) and "zip" not in str(err):
            raise
        raise DamagedFile(str(err).splitlines()[0].partition(". This is an internal")[0]) from None


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint that save_checkpoint wrote, loaded safely (load_plain). When it is missing or damaged and the
    previous one is beside it, the message says how to continue from that one."""
    prev = previous_checkpoint_path(path)
    if not os.path.exists(path):
        if os.path.exists(prev):
            raise SystemExit(f"error: no checkpoint at {path}; {use_previous(path, prev)}")
        raise SystemExit(f"error: no checkpoint at {path} (train first, or point --out_dir at a run's folder)")
    try:
        return load_plain(path, map_location)
    except DamagedFile as err:
        problem = f"error: {path} cannot be read: it is damaged or not a checkpoint ({err})"
        if not os.path.exists(prev):
            raise SystemExit(f"{problem}; there is no previous checkpoint beside it: restore it from a copy, or "
                             "delete it and train again") from None
        raise SystemExit(f"{problem}; {use_previous(path, prev)}") from None


def use_previous(path, prev):
    """What to type to continue from the previous checkpoint (and which iteration that is)."""
    try:
        it = load_plain(prev, "cpu").get("iter")
    except (DamagedFile, SystemExit):
        return f"{prev} is there but cannot be read either: restore a copy, or delete both and train again"
    steps = ([f"mv {path} {path}.damaged"] if os.path.exists(path) else []) + [f"cp {prev} {path}"]
    return f"the previous checkpoint {prev} (iteration {it}) is kept: to continue from it, {' && '.join(steps)}"


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers, whose state_dict has clean names."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


class StopNow(Exception):
    """Raised by StopRequest.poll() once a stop was asked for: the trainer saves the state it had at the start of the
    iteration (a half-done step or evaluation is dropped, and redone on --resume) and exits."""


class StopRequest:
    """The first Ctrl-C or SIGTERM sets a flag; poll(), called before each micro-batch and each evaluation batch, then
    raises StopNow, so the trainer stops within one micro-batch wherever it is. Under DDP the ranks must stop together:
    poll() does nothing and the flag is agreed on at the end of the step (agree_on_step). A second Ctrl-C raises
    KeyboardInterrupt: the trainer quits without saving (run_trainer). Python runs handlers between operations, so
    both wait for the operation under way (a big matmul); two presses within one operation count as one."""

    def __init__(self, ddp=False):
        self.requested, self.immediate = False, not ddp
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            when = "at the next micro-batch" if self.immediate else "after this step"
            say(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping {when} "
                "(Ctrl-C again to quit without saving)\n")
        self.requested = True

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


# -----------------------------------------------------------------------------
# metrics log and loss curve


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


# -----------------------------------------------------------------------------
# a run, and the training loop both trainers run


@dataclasses.dataclass
class RunOptions:
    """The fields both trainers have: how a run starts, and where and how it runs."""
    resume: bool = option(False, "continue the run in out_dir with its config (given anew, these may change: "
                          f"{', '.join(RESUME_MAY_CHANGE)})", section="run and system")
    overwrite: bool = option(False, "a new run where out_dir holds one: the old one moves to out_dir/previous-<time>/")
    device: str = option("auto", "auto: cuda if there is a GPU, else cpu")
    dtype: Dtype = option("auto", "auto: bfloat16 on GPUs that have it, float16 (with loss scaling) on others, "
                          "float32 on CPU")
    compile: bool = option(False, "torch.compile the model")
    deterministic: bool = option(False, "bit-reproducible GPU runs (slower): deterministic algorithms, two-pass Cog "
                                 "backward")
    seed: int = 1337


@dataclasses.dataclass
class Run:
    """Where a trainer's run stands before its model is built: its config, its checkpoint on --resume, its place
    among the processes."""
    config: typing.Any
    kind: str  # "lm" or "diffusion": what the checkpoint says it is
    ckpt_path: str
    checkpoint: typing.Optional[dict]  # --resume: what ckpt_path holds; None for a new run
    ddp: bool
    rank: int
    world_size: int
    device: str
    grad_accum: int  # micro-batches per process in one step

    @property
    def master(self):
        return self.rank == 0


def start_run(config_cls, presets, check_config, kind, what, argv=None):
    """The command line, its checks (check_training's, then the trainer's check_config), --resume's checkpoint and
    config (start_or_resume), the process group, and the device and dtype resolved for this process."""
    config = parse_config(config_cls, presets, argv)
    check_training(config)
    check_config(config)  # values that cannot work end the run here, before anything is prepared or written
    config, ckpt_path, checkpoint = start_or_resume(config, kind, what, argv)
    ddp, rank, world_size, device = setup_distributed(resolve_device(config.device))
    config.device, config.dtype = device, resolve_dtype(config.dtype, device)
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)
    if checkpoint is not None and rank == 0:
        print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")
    return Run(config, kind, ckpt_path, checkpoint, ddp, rank, world_size, device, grad_accum)


def open_run(run, title, work):
    """Before the model is built. The master says what it trains (title) and with what config, and how much work an
    iteration is (work: e.g. "524,288 tokens"), then makes the run's folder (--overwrite: moving an earlier run
    aside). Every rank seeds torch alike (the same initial weights everywhere) and allows TF32 matmuls."""
    config = run.config
    if run.master:
        print(f"training {title}; config:")
        print_config(config)
        print(f"{run.world_size} process(es), {run.grad_accum} micro-batches each, {work} per iteration")
        make_out_dir(config.out_dir, move_aside=config.overwrite)
    use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class TrainLoop:
    """The loop of both trainers, written once. Each iteration: the learning rate of the schedule; every eval_interval
    iterations the trainer's evaluation (on the master) and an atomic checkpoint; then one optimizer step of
    grad_accum micro-batches (DDP's all-reduce after the last one, loss scaling, clipping), the NaN guard and a
    nanoGPT-style log line. The first Ctrl-C or SIGTERM saves the state from the start of the iteration it lands in,
    so --resume continues bit for bit. The trainer gives what is its own: the loss of a micro-batch, the evaluation,
    and what its checkpoint holds beyond the common state."""

    def __init__(self, run, model, model_config, generator, work, flops_per_iter, plan):
        """model: on its device, not yet compiled; generator: the one that draws the training batches (checkpointed);
        work: (count, unit) of one iteration, e.g. (524288, "tokens"); plan: what a step does, for SlowRun."""
        config = self.config = run.config
        self.run, self.model_config, self.generator = run, model_config, generator
        self.optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                         run.device.split(":")[0])
        self.work, self.flops_per_iter = work, flops_per_iter
        self.peak_flops = peak_flops(run.device)  # for MFU; None on a CPU or a GPU without a figure
        self.scaler = make_grad_scaler(run.device, config.dtype)
        self.ctx = autocast_context(run.device, config.dtype)
        self.start_iter, self.evaluated = 0, None  # evaluated: the last iteration evaluated
        if run.checkpoint is not None:
            self.restore(model, run.checkpoint)
            run.checkpoint = None  # free the memory (the trainer has taken what is its own)
        self.slow_run = SlowRun(run.device, flops_per_iter, plan, run.master)
        self.eval_model = torch.compile(model) if config.compile else model  # no DDP wrapper: the master evaluates
        self.model = self.eval_model
        if run.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[run.device] if run.device.startswith("cuda") else None)
        self.log = MetricsLog(config.out_dir, self.start_iter if config.resume else None) if run.master else None
        self.stop = StopRequest(run.ddp)

    def restore(self, model, checkpoint):
        model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_iter = checkpoint["iter"]
        self.evaluated = self.start_iter if checkpoint.get("eval_done", True) else None
        set_rng_state(checkpoint["rng"])
        restore_generator_state(self.generator, checkpoint["data_rng"], self.run.rank, self.run.world_size,
                                self.run.master)

    def save(self, it, own):
        """Every rank's generator state is gathered; the master writes ckpt_path atomically, with the trainer's own
        entries (own()). eval_done: whether the evaluation at it is done (if not, a resumed run does it)."""
        data_rng = gather_generator_states(self.generator, self.run.ddp, self.run.world_size)
        if self.run.master:
            save_checkpoint({"kind": self.run.kind, "model": unwrap(self.model).state_dict(),
                             "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                             "model_config": dataclasses.asdict(self.model_config),
                             "config": dataclasses.asdict(self.config), "iter": it, "eval_done": self.evaluated == it,
                             "rng": rng_state(), "data_rng": data_rng, **own()}, self.run.ckpt_path)

    def step(self, it, micro_loss):
        """One optimizer step; returns its mean loss over all ranks and whether a stop was asked for."""
        grad_accum, ddp = self.run.grad_accum, self.run.ddp
        loss_sum = torch.zeros((), device=self.run.device)
        for micro in range(grad_accum):
            self.stop.poll()
            sync = self.model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
            with sync:  # gradients are all-reduced only after the last micro-batch
                loss = micro_loss(micro)
                self.scaler.scale(loss / grad_accum).backward()
            loss_sum += loss.detach()
        loss, stop_now = agree_on_step(loss_sum, grad_accum, self.stop, ddp, self.run.world_size)
        check_finite(loss, it, self.run.ckpt_path)  # before the update: the checkpoint on disk stays the last good one
        optimizer_step(self.model, self.optimizer, self.scaler, self.config.grad_clip)
        return loss, stop_now

    def log_step(self, it, loss, lr, dt):
        count, unit = self.work
        rate = count / dt
        peak = self.peak_flops
        mfu = self.flops_per_iter / dt / (peak * self.run.world_size) if peak else None
        print(f"iter {it}: loss {loss:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms/iter, {rate:,.0f} {unit}/s"
              + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)
        self.log.write(iter=it, loss=loss, lr=lr, ms_per_iter=dt * 1000, **{f"{unit}_per_s": rate}, mfu=mfu)

    def run_loop(self, micro_loss, evaluate, own, plot, after_step=None):
        """Train from start_iter to max_iters, or until a stop; returns the iteration reached.
        micro_loss(micro): the loss of one micro-batch (its forward pass under self.ctx); evaluate(it): the master's
        evaluation; own(): the trainer's checkpoint entries; plot(): the master's loss curve; after_step(): e.g. the
        EMA update."""
        config, master = self.config, self.run.master
        it, t_last, iters_timed = self.start_iter, time.time(), 0
        while True:
            lr = learning_rate(it, config.learning_rate, config.warmup_iters, config.max_iters, config.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            generator_state = self.generator.get_state()  # a stop inside this iteration saves the state from its start
            try:
                # evaluate and checkpoint, once per iteration (a resumed run's checkpoint says whether it was done)
                if (it % config.eval_interval == 0 or it >= config.max_iters) and self.evaluated != it:
                    if master:
                        evaluate(it)
                    self.evaluated = it
                    self.save(it, own)
                    if master:
                        plot()
                    t_last, iters_timed = time.time(), 0
                if it >= config.max_iters:
                    return it
                t_step = time.time()
                loss, stop_now = self.step(it, micro_loss)
                if after_step is not None:
                    after_step()
            except StopNow:  # inside the evaluation or the step: nothing of this iteration is kept, --resume redoes it
                self.generator.set_state(generator_state)
                stop_now = True
            else:
                self.slow_run.first_step(time.time() - t_step, config.max_iters - it - 1)
                iters_timed += 1
                if it % config.log_interval == 0 and master:
                    self.log_step(it, loss, lr, (time.time() - t_last) / iters_timed)
                    t_last, iters_timed = time.time(), 0
                it += 1
            if stop_now:
                self.save(it, own)
                if master:
                    plot()
                    print(f"stopped: saved {self.run.ckpt_path} at iteration {it}; continue with --resume")
                return it

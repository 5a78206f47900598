"""
A run on disk: its folder, which a new run never takes over (--resume continues the run there, --overwrite moves it
aside), and its checkpoint: a dict written atomically with torch.save (model, optimizer, configs, iteration, RNG
states), read back without running code from the file, and kept one deep (ckpt.prev.pt) against damage.
"""

import dataclasses
import os
import pickle
import random
import time
import zipfile

import numpy as np
import torch

from cli import cli_keys, require
from distributed import gather_generator_states, restore_generator_state


# --- the run's folder -------------------------------------------------------------------------------------------------

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


def fresh_path(path):
    """path, or if a file is there already the first free one of path-2, path-3, ... (before the extension): a new
    output (a sample grid, a plot, its numbers) never replaces an earlier one."""
    root, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{root}-{n}{ext}"
    return path


# --- a new run never replaces an earlier one, and --resume continues the run it names ---------------------------------

# On --resume every key comes from the checkpoint's config, except these: they change how long the run goes on, how
# it reports and how its work is spread over the GPUs' memory, not what it trains, so given on the command line they
# override the checkpoint's (and say so).
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "grid_size", "sample_steps", "fsdp",
                     "activation_checkpointing")


# and these, which always come from this command: where the run is, how to treat it, where and how fast to run it
THIS_COMMAND = ("out_dir", "resume", "overwrite", "device", "compile", "memory_check")


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
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # every process of a node reads it: one copy in memory
    if checkpoint.get("kind") != kind:
        raise SystemExit(f"error: {ckpt_path} is a {checkpoint.get('kind')!r} checkpoint, not {what}")
    config = resume_config(config, checkpoint, ckpt_path, argv)
    exit_if_finished(config, checkpoint)
    return config, ckpt_path, checkpoint


def exit_if_finished(config, checkpoint):
    """--resume of a run that has reached max_iters (and evaluated there): say so, and how to train further; exit 0."""
    it = checkpoint["iter"]
    if it >= config.max_iters and checkpoint.get("eval_done", True):
        if int(os.environ.get("RANK", 0)) == 0:  # (under torchrun: once)
            print(f"nothing left to train: the run in {config.out_dir} finished at iteration {it} (max_iters="
                  f"{config.max_iters}). To train it further, resume with a larger --max_iters, e.g. --resume "
                  f"--max_iters={2 * max(it, 1)} (the learning-rate schedule stretches to the new end)")
        raise SystemExit(0)


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


# --- checkpoints: written atomically, read safely ---------------------------------------------------------------------

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


class DamagedFile(ValueError):
    """A file that is truncated, corrupt, or not one torch.save wrote."""


class RefusedFile(ValueError):
    """A file that holds more than tensors and plain values: loading it could run code from it."""


def load_plain(path, map_location, mmap=False):
    """torch.load(weights_only=True): tensors and plain Python values only, so loading never runs code from the file
    (a pickle can name any function to call; this loader refuses all but PyTorch's own safe ones). Raises DamagedFile
    for a truncated or corrupt file, RefusedFile for a file that asks for anything else. Every loader of the project
    reads through this one. mmap: map the tensors from the file instead of reading them (torch.save's zip files;
    others are read)."""
    mmap = mmap and zipfile.is_zipfile(path)

    def load(allowed=()):
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
            raise RefusedFile(f"refusing to load {path}: it holds more than tensors and plain values "
                              f"({refused.partition(' was not an allowed global')[0]}), and loading it could run code "
                              "from the file") from None
        raise DamagedFile(f"{type(err).__name__}: {err}") from None
    except (EOFError, KeyError, OSError) as err:  # an empty or cut file; a file that is not PyTorch's
        raise DamagedFile(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err) and "zip" not in str(err):
            raise
        raise DamagedFile(str(err).splitlines()[0].partition(". This is an internal")[0]) from None


def load_checkpoint(path, map_location="cpu", mmap=False):
    """A checkpoint that save_checkpoint wrote, loaded safely (load_plain); mmap: its tensors mapped from the file
    rather than read, so that the processes of one machine share one copy in memory. When it is missing or damaged and
    the previous one is beside it, the message says how to continue from that one."""
    prev = previous_checkpoint_path(path)
    if not os.path.exists(path):
        if os.path.exists(prev):
            raise SystemExit(f"error: no checkpoint at {path}; {use_previous(path, prev)}")
        raise SystemExit(f"error: no checkpoint at {path} (train first, or point --out_dir at a run's folder)")
    try:
        return load_plain(path, map_location, mmap)
    except RefusedFile as err:
        raise SystemExit(f"error: {err}") from None
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
    except (DamagedFile, RefusedFile):
        return f"{prev} is there but cannot be read either: restore a copy, or delete both and train again"
    steps = ([f"mv {path} {path}.damaged"] if os.path.exists(path) else []) + [f"cp {prev} {path}"]
    return f"the previous checkpoint {prev} (iteration {it}) is kept: to continue from it, {' && '.join(steps)}"


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers, whose state_dict has clean names (FSDP shards a model in
    place: it is its own plain module)."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


# --- one checkpoint for every mode: whole tensors on the CPU, the optimizer's state keyed by parameter name ----------

def is_sharded(tensor):
    """A DTensor: FSDP's shard of a parameter or of its state (torch.distributed.tensor, imported only where used)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "full_tensor")


def whole(tensor, master):
    """tensor whole and on the CPU for the master's checkpoint (None on the other ranks). A shard of FSDP's (a DTensor)
    is gathered from every rank first, so every rank calls this for the same tensors in the same order."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if master else None


def parameter_names(model, optimizer):
    """The name of each of the optimizer's parameters, in its order (the positions optimizer.state_dict() keys by)."""
    names = {p: name for name, p in unwrap(model).named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def model_state(model, master):
    """The model's state_dict, whole (gathered from FSDP's shards) and on the CPU, on the master."""
    return {k: whole(v, master) for k, v in unwrap(model).state_dict().items()}


def optimizer_state(model, optimizer, master):
    """optimizer.state_dict() with whole tensors on the CPU, keyed by parameter name instead of position: the same for
    one process, DDP and FSDP on any number of ranks."""
    names, saved = parameter_names(model, optimizer), optimizer.state_dict()
    return {"state": {names[i]: {k: whole(v, master) for k, v in state.items()} for i, state in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}


def keyed_by_name(optimizer_state):
    return any(isinstance(p, str) for group in optimizer_state["param_groups"] for p in group["params"])


def load_optimizer_state(model, optimizer, saved):
    """A checkpoint's optimizer state into optimizer: keyed by name (save_run's) or by position (older checkpoints),
    each whole tensor cut to this rank's shard where its parameter is sharded (FSDP)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if keyed_by_name(saved):
        position = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
        saved = {"state": {position[name]: state for name, state in saved["state"].items()},
                 "param_groups": [{**g, "params": [position[name] for name in g["params"]]}
                                  for g in saved["param_groups"]]}
    state = {i: {k: shard_like(v, params[i]) for k, v in s.items()} for i, s in saved["state"].items()}
    optimizer.load_state_dict({**saved, "state": state})


def shard_like(tensor, param):
    """A whole tensor from a checkpoint as param is held: this rank's shard of it where param is sharded (one tensor
    on the device at a time), else as it is (the optimizer moves it to the parameter's device)."""
    if is_sharded(param) and tensor.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor


def check_checkpoint_fits(checkpoint, model, ckpt_path):
    """Before anything is written: the checkpoint's weights and optimizer state must be those of model (built from the
    checkpoint's config, on the meta device will do): the same names and shapes."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
    problems = [f"{k} is {theirs[k]}, this model's {ours[k]}" for k in ours if k in theirs and theirs[k] != ours[k]]
    problems += [f"it lacks {k}" for k in ours if k not in theirs] + [f"it has {k}, which this model lacks"
                                                                        for k in theirs if k not in ours]
    names = [name for name, _ in model.named_parameters()]
    saved = [p for group in checkpoint["optimizer"]["param_groups"] for p in group["params"]]
    if not problems and (sorted(saved) != sorted(names) if keyed_by_name(checkpoint["optimizer"])
                         else len(saved) != len(names)):
        problems.append(f"its optimizer holds {len(saved)} parameters, not this model's {len(names)}")
    if problems:
        raise SystemExit(f"error: {ckpt_path} does not fit this run: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


# --- a run's state: saved by every rank together, restored into any number of ranks ----------------------------------

def save_run(path, it, model, optimizer, scaler, data_gen, ddp, world_size, **entries):
    """Every rank calls it (each gives the state of the generator that draws its batches, and under FSDP its shards);
    rank 0 writes path atomically: the model, the optimizer and the loss scaler, the iteration, every RNG state, and
    the trainer's entries (kind, configs, ...). Everything is gathered before the file is opened: a stop or a failure
    while gathering leaves the checkpoint on disk as it was."""
    master = not ddp or torch.distributed.get_rank() == 0
    data_rng = gather_generator_states(data_gen, ddp, world_size)
    weights, optimizer_states = model_state(model, master), optimizer_state(model, optimizer, master)
    if master:
        save_checkpoint({"model": weights, "optimizer": optimizer_states, "scaler": scaler.state_dict(), "iter": it,
                         "rng": rng_state(), "data_rng": data_rng, **entries}, path)


def restore_run(checkpoint, model, optimizer, scaler, data_gen, rank, world_size, shared_data=False):
    """save_run's state back into the optimizer, the scaler and the generators, so the run goes on as if it had not
    stopped, on any number of ranks (model: as wrapped, for its parameters' names; its weights were loaded before it
    was placed and wrapped). shared_data: every rank draws from one stream (see restore_generator_state). Returns (the
    iteration to continue from, the last iteration evaluated, or None if that one is not)."""
    it = checkpoint["iter"]
    load_optimizer_state(model, optimizer, checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    restore_generator_state(data_gen, checkpoint["data_rng"], rank, world_size, rank == 0, it, shared_data)
    return it, it if checkpoint.get("eval_done", True) else None

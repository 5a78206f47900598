"""
Several processes under torchrun: the process group and each rank's device, the micro-batches each rank runs, and
what ranks must agree on (the step's mean loss, whether to stop, every rank's data generator state for the checkpoint).
One process without torchrun is the same code with world size 1.
"""

import os
import signal

import torch


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


def agree_on_step(loss, stop_signal, ddp):
    """The step's loss averaged over all ranks, and whether any rank was asked to stop, so that all stop together:
    stop_signal is the signal this rank received (0: none); returns the one every rank stops with, SIGINT if any rank
    got it, else SIGTERM if any did, else 0 (so that every rank exits with the same status)."""
    flags = [float(stop_signal == signal.SIGINT), float(bool(stop_signal) and stop_signal != signal.SIGINT)]
    shared = torch.stack([loss, *(torch.tensor(f, device=loss.device, dtype=loss.dtype) for f in flags)])
    if ddp:
        torch.distributed.all_reduce(shared)
        shared[0] /= torch.distributed.get_world_size()
    interrupted, other = shared[1].item() > 0, shared[2].item() > 0
    return shared[0].item(), int(signal.SIGINT if interrupted else signal.SIGTERM if other else 0)

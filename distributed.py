"""
Several processes under torchrun: the process group and each rank's device, the micro-batches each rank runs, FSDP's
sharding of a model, and what ranks must agree on (the step's mean loss, whether to stop, every rank's data generator
state for the checkpoint). One process without torchrun is the same code with world size 1.
"""

import os
import signal

import torch


def setup_distributed(device):
    """Under torchrun, join the process group and take this rank's GPU (NCCL), or with --device=cpu stay on the CPU
    (gloo). Returns (ddp, rank, world_size, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    from torch.distributed import init_process_group
    on_gpus = torch.cuda.is_available() and device.startswith("cuda")
    init_process_group(backend="nccl" if on_gpus else "gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if on_gpus:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, rank, world_size, device


def micro_steps_per_process(grad_accum, world_size):
    """grad_accum counts micro-batches over all processes, so a step's tokens (or images) do not depend on the GPUs."""
    if grad_accum % world_size:
        raise SystemExit(f"error: grad_accum ({grad_accum}) must be divisible by the number of processes "
                         f"({world_size}): run on a number of GPUs that divides it (a resumed run keeps its own "
                         "grad_accum), or give a new run another --grad_accum")
    return grad_accum // world_size


def fsdp_applies(requested, ddp, master):
    """--fsdp shards over torchrun's processes; one process without torchrun holds the whole model anyway, so the flag
    changes nothing there (and says so), which lets a preset ask for FSDP and still run on one GPU."""
    if requested and not ddp and master:
        print("note: --fsdp without torchrun: one process holds the whole model, nothing is sharded")
    return requested and ddp


def shard_model(model, blocks, device, dtype):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each block becomes a unit whose parameters are gathered just before
    it runs and freed after, then the root takes the rest (embeddings, head, norms). Each process keeps 1/world_size of
    every parameter, its gradient and its AdamW state. Under --dtype=bfloat16 the gathered weights are bf16 and
    gradients are reduced in fp32 (the sharded weights stay fp32); the model's inputs are not cast (U-ViC's timesteps
    keep fp32). Parameters that are on the CPU move to this process's device one block at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(":")[0], (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gather_generator_states(generator, ddp, world_size):
    """Every rank's data generator state, in rank order, for the checkpoint."""
    if not ddp:
        return [generator.get_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, generator.get_state())
    return states


def restore_generator_state(generator, states, rank, world_size, master, it, shared=False):
    """This rank's data generator from the checkpoint's states (one per rank, saved at iteration it). shared: every
    rank follows one stream (the LM trainer's), so any number of processes continues it. Otherwise each rank has its
    own: with as many processes as the checkpoint's run each continues its own, and with another number each starts a
    fresh stream (its seed moved on by the iteration, so no batches of the run's start are repeated)."""
    if shared:
        generator.set_state(states[0])
        if master and any(not torch.equal(s, states[0]) for s in states[1:]):
            print("note: this checkpoint's ranks drew their batches from streams of their own (an older nanoCog): "
                  "from here on every rank follows rank 0's")
    elif len(states) == world_size:
        generator.set_state(states[rank])
    else:
        generator.manual_seed(generator.initial_seed() + 1_000_003 * it)
        if master:
            print(f"note: {world_size} process(es), the checkpoint's run had {len(states)}: each process draws its "
                  "batches from a fresh stream")


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

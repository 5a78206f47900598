"""
Train a Cogformer language model (arXiv 2411.07176) the way nanoGPT trains GPT-2.

    python train_lm.py --compile                               # the paper's model on RedPajama, one GPU
    torchrun --standalone --nproc_per_node=8 train_lm.py --compile   # the same on 8 GPUs, no code change
    torchrun --standalone --nproc_per_node=8 train_lm.py --preset=3b --compile   # 2.9B, sharded with FSDP
    python train_lm.py --preset=demo                           # a small Cogformer on Python's own sources, CPU
    python train_lm.py --preset=demo --attn=softmax --out_dir=out/demo_softmax   # the Transformer baseline
    python train_lm.py --preset=demo --resume                  # continue from out_dir/ckpt.pt, bit for bit
    python train_lm.py --preset=1b --doc_mask                  # a 1.0B Cogformer, attention within documents
    python train_lm.py --init_from=cog_ckpt_100.00_Bi.pt --data_dir=data/redpajama_llama2   # fine-tune theirs

Any field of TrainConfig is a --key=value override. Data folders come from data/prepare_lm.py. One run per out_dir:
a new run into a folder that holds one stops and says so (--resume continues it with its own config, --overwrite
moves it to out_dir/previous-<time>/).
"""

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

# on a busy CPU, spinning OpenMP threads make each step several times slower: let idle ones sleep (before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (and the imports below)
import torch
import torch.distributed as dist

from torch.nn.parallel import DistributedDataParallel as DDP

from authors import authors_to_nanocog, load_weights_file
from checkpoint import check_checkpoint_fits, make_out_dir, restore_run, save_run
from cli import check_at_least, option, print_config
from data.prepare_lm import prepare_pystdlib
from distributed import agree_on_step, fsdp_applies, micro_steps_per_process, setup_distributed, shard_model
from logs import MetricsLog, SlowRun, plot_loss_curve
from memory import check_fits, estimate_memory, plan_of
from model import Cogformer, CogformerConfig, document_ids
from training import (RunOptions, StopNow, StopRequest, Stopped, autocast_context, check_finite,
                      configure_adamw, learning_rate, make_grad_scaler, optimizer_step, peak_flops, pick_fields,
                      run_trainer, set_cpu_threads, set_up_torch, start_run)


@dataclass
class TrainConfig(CogformerConfig, RunOptions):
    """The model's fields (CogformerConfig; the defaults are the paper's 12 x 768 Cogformer), how the run starts and
    runs (RunOptions), and these."""
    vocab_size: int = option(0, "0: the dataset's vocabulary size, padded up to a multiple of 64")
    preset: str = "paper"
    data_dir: str = option("data/redpajama", "a folder made by data/prepare_lm.py: train.bin, val.bin, meta.json",
                           section="data and initial weights")
    init_from: str = option("", "the authors' released checkpoint to fine-tune or continue (its architecture wins)")
    doc_mask: bool = option(False, "attend only within a document (packed documents; a new one at each BOS, else "
                            "end-of-text)")
    batch_size: int = option(16, "micro-batch per GPU", section="optimisation (our choices, the paper does not say): "
                             "16 x 2048 x 16 = 524,288 tokens per step")
    grad_accum: int = option(16, "micro-batches per step over all GPUs together (divided by the number of GPUs)")
    max_iters: int = option(190_735, "100B tokens, the paper's budget (RedPajama-1T-Sample holds ~1B: see "
                            "data/prepare_lm.py)")
    learning_rate: float = 6e-4
    min_lr: float = option(6e-5, "cosine decay from learning_rate to min_lr at max_iters")
    warmup_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = option(1.0, "0: no clipping")
    out_dir: str = option("out/lm", "the run's folder: ckpt.pt, log.jsonl, loss.png",
                          section="evaluation, logging, checkpoints")
    eval_interval: int = option(1000, "iterations between evaluations (each saves a checkpoint)")
    eval_iters: int = option(100, "batches per split in one evaluation")
    log_interval: int = 10


PRESETS = {
    "paper": {},  # the fields' defaults
    # 0.9M parameters, byte-level, on 2 CPU cores: val loss < 2 nats per byte in a few minutes
    "demo": dict(data_dir="data/pystdlib", block_size=128, n_layer=4, n_head=4, n_embd=128, ffn_hidden=384,
                 batch_size=32, grad_accum=1, max_iters=400, learning_rate=3e-3, min_lr=3e-4, warmup_iters=20,
                 out_dir="out/demo_lm", eval_interval=100, eval_iters=10, log_interval=10),
    # The paper's later versions scale to 1B-3B parameters without publishing the configurations: these are OUR
    # choices. The 141M model's shape (SwiGLU 3x the width, softmax in the first and last layer; head dim 64, or
    # 128 as Llama's from 1B on) at depths and widths like OLMo-1B's, with GPT-3's learning rate and tokens per step
    # for the nearest size (760M: 2.5e-4, 0.5M tokens; 1.3B and 2.7B: 2e-4 and 1.6e-4, 1M tokens). Parameters with
    # Llama-2's 32,000 tokens (GPT-2's 50,304 add 2 x 18,304 x width): 593.2M, 1,003.6M and 2,890.3M.
    "600m": dict(n_layer=24, n_head=20, n_embd=1280, ffn_hidden=3840, learning_rate=2.5e-4, min_lr=2.5e-5),
    "1b": dict(n_layer=16, n_head=16, n_embd=2048, ffn_hidden=6144, batch_size=8, grad_accum=64, max_iters=95_367,
               learning_rate=2e-4, min_lr=2e-5),
    # 3b: a whole replica per GPU (DDP) does not fit 80 GB (docs/lm.md, "Memory per GPU"): FSDP under torchrun
    "3b": dict(n_layer=32, n_head=20, n_embd=2560, ffn_hidden=7680, batch_size=4, grad_accum=128, max_iters=95_367,
               learning_rate=1.6e-4, min_lr=1.6e-5, fsdp=True),
}


def missing_dataset(data_dir):
    return SystemExit(f"error: no prepared dataset in {data_dir} (meta.json is missing). Prepare it with\n"
                      f"  python data/prepare_lm.py --dataset=redpajama --out_dir={data_dir}\n"
                      f"or, from your own .jsonl/.txt files,\n"
                      f"  python data/prepare_lm.py --files='corpus/*.jsonl' --out_dir={data_dir}")


def load_meta(data_dir, master, ddp):
    """The dataset's meta.json; the offline demo corpus (a folder named pystdlib) is prepared on first use."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and os.path.basename(os.path.normpath(data_dir)) == "pystdlib":
        if master:
            prepare_pystdlib(data_dir)
        if ddp:
            dist.barrier()
    if not os.path.exists(meta_path):
        raise missing_dataset(data_dir)
    with open(meta_path) as f:
        return json.load(f)


def draw_windows(data_dir, split, block_size, generator, *shape):
    """Random starts of windows of block_size + 1 tokens in the split (nanoGPT's sampler), a tensor of this shape."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    return torch.randint(len(data) - block_size, shape, generator=generator)


def get_batch(data_dir, split, batch_size, block_size, generator, device, ix=None):
    """batch_size random windows of the split (or those starting at ix, drawn already): inputs x and next-token
    targets y, (B, T)."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")  # fresh: a kept memmap leaks
    if ix is None:
        ix = draw_windows(data_dir, split, block_size, generator, batch_size)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):  # pinned memory: the copy overlaps with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def check_config(config):
    """(The model's own checks ran as the config was made: sizes, heads that divide the width, ...)"""
    check_at_least(config, 0, "vocab_size")


def check_dataset(config, meta):
    """The model's vocabulary must hold the dataset's tokens, and each split more than one window."""
    if config.vocab_size < meta["vocab_size"]:
        raise SystemExit(f"error: vocab_size {config.vocab_size} < the dataset's {meta['vocab_size']}")
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= config.block_size:
            raise SystemExit(f"error: {config.data_dir}/{split}.bin holds {meta[f'{split}_tokens']} tokens, "
                             f"not more than block_size {config.block_size}")


def released_model(config, meta, master):
    """--init_from: the authors' weights, converted, and their architecture (which wins over the command line's;
    config is updated so that the printed and saved config say what is trained)."""
    if meta["tokenizer"] != "llama2":
        raise SystemExit(f"error: the authors' models read Llama-2 tokens; {config.data_dir} holds "
                         f"{meta['tokenizer']} tokens (prepare it with data/prepare_lm.py --tokenizer=llama2)")
    try:
        released_config, weights = authors_to_nanocog(load_weights_file(config.init_from))
    except ValueError as err:
        raise SystemExit(f"error: --init_from={config.init_from}: {err}") from None
    model_config = dataclasses.replace(released_config, block_size=config.block_size)
    if dataclasses.asdict(model_config) != dataclasses.asdict(pick_fields(config, CogformerConfig)) and master:
        print(f"note: the model's architecture comes from {config.init_from}, not from the command line")
    for f in dataclasses.fields(CogformerConfig):
        setattr(config, f.name, getattr(model_config, f.name))
    if model_config.vocab_size < meta["vocab_size"]:
        raise SystemExit(f"error: {config.init_from} has {model_config.vocab_size} tokens, the dataset "
                         f"{meta['vocab_size']}")
    return model_config, weights


@torch.no_grad()
def estimate_loss(model, config, ctx, doc_start, stop):
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
    model.eval()
    losses = {}
    for k, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(config.seed + 100_000 + k)
        total = 0.0
        for _ in range(config.eval_iters):
            stop.poll()
            x, y = get_batch(config.data_dir, split, config.batch_size, config.block_size, gen, config.device)
            with ctx:
                total += model(x, y, doc_ids=document_ids(x, doc_start) if config.doc_mask else None)[1].item()
        losses[split] = total / config.eval_iters
    model.train()
    return losses


def main(argv=None):
    # the command line, its checks, and on --resume the run's config and checkpoint: before anything is written
    config, ckpt_path, checkpoint = start_run(TrainConfig, PRESETS, check_config, "lm", "an LM's", argv)
    ddp, rank, world_size, device = setup_distributed(config.device)  # under torchrun: this rank's GPU
    config.device, master = device, rank == 0  # the master evaluates, logs and writes checkpoints
    fsdp = fsdp_applies(config.fsdp, ddp, master)  # --fsdp under torchrun: shards, not a replica per GPU
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)  # micro-batches per process in one step
    tokens_per_iter = config.batch_size * config.block_size * grad_accum * world_size

    # data
    meta = load_meta(config.data_dir, master, ddp)
    config.vocab_size = config.vocab_size or -(-meta["vocab_size"] // 64) * 64  # padded up to a multiple of 64
    check_dataset(config, meta)
    doc_start = meta["eot_token"] if meta.get("bos_token") is None else meta["bos_token"]  # --doc_mask's documents

    # the model: a new one, the authors' (--init_from), or the run's own (--resume)
    model_config, released = pick_fields(config, CogformerConfig), None
    if checkpoint is not None:
        if checkpoint["meta"]["tokenizer"] != meta["tokenizer"]:
            raise SystemExit(f"error: {ckpt_path} was trained with the {checkpoint['meta']['tokenizer']} tokenizer, "
                             f"{config.data_dir} holds {meta['tokenizer']} tokens")
        model_config = CogformerConfig(**checkpoint["model_config"])
        config.vocab_size = model_config.vocab_size
        if master:
            print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")
    elif config.init_from:
        model_config, released = released_model(config, meta, master)
    with torch.device("meta"):  # the model's shapes without its memory: the checkpoint's check, the memory estimate
        shapes = Cogformer(model_config)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, shapes, ckpt_path)
    plan = plan_of(shapes, config, world_size, fsdp)  # what the memory estimate needs of this run
    if master:
        print_config(config, f"training a {model_config.model_name()} on {config.data_dir} ({meta['tokenizer']} "
                             f"tokens): {world_size} process(es), {grad_accum} micro-batches each, "
                             f"{tokens_per_iter:,} tokens per iteration")
        print(f"memory per GPU, estimated (docs/lm.md): {estimate_memory(shapes, plan).describe()}")
    if config.memory_check:  # on a GPU, a run that would not fit stops here, every rank alike
        check_fits(shapes, plan, device, resuming=checkpoint is not None)
    if master:
        make_out_dir(config.out_dir, move_aside=config.overwrite)
    set_up_torch(config.seed, config.deterministic)  # every rank alike: the same initial weights everywhere
    model = Cogformer(model_config)  # on the CPU
    if released is not None:
        model.load_state_dict(released)
        released = None  # free the memory
    if checkpoint is not None:  # the run's weights, from the CPU, before the model is placed and sharded
        model.load_state_dict(checkpoint["model"])
    model.activation_checkpointing = config.activation_checkpointing  # recompute each block in the backward
    flops_per_iter = model.flops_per_token() * tokens_per_iter
    set_cpu_threads(device, model, config.batch_size * config.block_size, announce=master)  # one for a small model
    if master:
        counts = model.num_params()
        print(f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding; "
              f"layers: {' '.join(model_config.layer_kinds())}")

    # onto the GPU(s): with --fsdp each block compiled and sharded, then the root; else compiled whole, and DDP
    if fsdp:
        if config.compile:  # block by block, as torchtitan does: FSDP's hooks between blocks stay outside compiled code
            for block in model.blocks:
                block.compile()
        model = eval_model = shard_model(model, model.blocks, device, config.dtype)  # each rank keeps its shards
    else:
        model = model.to(device)
        if config.compile:
            model = torch.compile(model)
        eval_model = model  # the master evaluates alone: without the DDP wrapper
        if ddp:
            model = DDP(model, device_ids=[device] if device.startswith("cuda") else None)

    # optimizer (of the parameters as placed: under FSDP this rank's shards), precision, the run's state on --resume
    optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                device.split(":")[0])
    scaler = make_grad_scaler(device, config.dtype)  # fp16 only: loss scaling
    ctx = autocast_context(device, config.dtype)
    # draws the training batches of every rank (each takes its own): the same batches on any number of processes
    data_gen = torch.Generator().manual_seed(config.seed + 1)  # checkpointed
    iter_num, evaluated, best_val_loss = 0, None, float("inf")  # evaluated: the last iteration evaluated
    if checkpoint is not None:
        iter_num, evaluated = restore_run(checkpoint, model, optimizer, scaler, data_gen, rank, world_size,
                                          shared_data=True)
        best_val_loss = checkpoint["best_val_loss"]
        checkpoint = None  # free the memory
    slow_run = SlowRun(device, flops_per_iter, f"{tokens_per_iter:,} tokens per step, and each evaluation "
                       f"{2 * config.eval_iters} batches of {config.batch_size} x {config.block_size} tokens", master)

    # the training loop: a stop (Ctrl-C, SIGTERM) saves the state from the start of the iteration it lands in
    log = MetricsLog(config.out_dir, iter_num if config.resume else None) if master else None  # log.jsonl

    def save(it):  # (every rank calls it)
        save_run(ckpt_path, it, model, optimizer, scaler, data_gen, ddp, world_size, kind="lm",
                 model_config=dataclasses.asdict(model_config), config=dataclasses.asdict(config),
                 eval_done=evaluated == it, best_val_loss=best_val_loss, meta=meta)
        if master:
            plot_loss_curve(log.path, os.path.join(config.out_dir, "loss.png"),
                            f"{model_config.model_name()} on {os.path.basename(config.data_dir)}")

    stop = StopRequest(ddp)
    peak = peak_flops(device)  # for MFU; None on a CPU or a GPU without a figure
    t_last, iters_timed = time.time(), 0
    while True:
        lr = learning_rate(iter_num, config.learning_rate, config.warmup_iters, config.max_iters, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data_state = data_gen.get_state()
        try:
            # evaluate and save, once per iteration (a resumed run's checkpoint says whether it was done)
            if (iter_num % config.eval_interval == 0 or iter_num >= config.max_iters) and evaluated != iter_num:
                if master or fsdp:  # under FSDP every rank takes part in the forward passes
                    losses = estimate_loss(eval_model, config, ctx, doc_start, stop)
                if master:
                    best_val_loss = min(best_val_loss, losses["val"])
                    print(f"eval at iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, train_loss=losses["train"],
                              val_loss=losses["val"])
                evaluated = iter_num
                save(iter_num)
                t_last, iters_timed = time.time(), 0
            if iter_num >= config.max_iters:
                break
            # one optimizer step of grad_accum micro-batches on each rank. Every rank draws the windows of all ranks'
            # micro-batches and takes its own, so that a step's batches do not depend on the number of processes
            t_step, loss_sum = time.time(), torch.zeros((), device=device)
            windows = draw_windows(config.data_dir, "train", config.block_size, data_gen, world_size * grad_accum,
                                   config.batch_size)[rank * grad_accum:(rank + 1) * grad_accum]
            x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, None, device, windows[0])
            for micro in range(grad_accum):
                stop.poll()
                last = micro == grad_accum - 1  # FSDP and DDP reduce the gradients after the last micro-batch only
                if fsdp:
                    model.set_requires_gradient_sync(last)  # until then each rank accumulates whole gradients
                with model.no_sync() if ddp and not fsdp and not last else nullcontext():
                    with ctx:
                        _, loss = model(x, y, doc_ids=document_ids(x, doc_start) if config.doc_mask else None)
                    if not last:  # the next micro-batch loads while the GPU works on this one
                        x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, None, device,
                                         windows[micro + 1])
                    scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.detach()
            loss, stop_now = agree_on_step(loss_sum / grad_accum, stop.signum, ddp)
            check_finite(loss, iter_num, ckpt_path)  # before the update: the checkpoint on disk stays the last good one
            optimizer_step(model, optimizer, scaler, config.grad_clip)
        except StopNow:  # inside the evaluation or the step: nothing of this iteration is kept, --resume redoes it
            data_gen.set_state(data_state)
            stop_now = stop.signum
        else:
            slow_run.first_step(time.time() - t_step, config.max_iters - iter_num - 1)
            iters_timed += 1
            if iter_num % config.log_interval == 0 and master:
                dt = (time.time() - t_last) / iters_timed
                mfu = flops_per_iter / dt / (peak * world_size) if peak else None
                print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms/iter, "
                      f"{tokens_per_iter / dt:,.0f} tokens/s" + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)
                log.write(iter=iter_num, loss=loss, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt,
                          mfu=mfu)
                t_last, iters_timed = time.time(), 0
            iter_num += 1
        if stop_now:
            save(iter_num)
            if master:
                print(f"stopped: saved {ckpt_path} at iteration {iter_num}; continue with --resume")
            raise Stopped(stop_now)  # exit status 130 after Ctrl-C, 143 after SIGTERM
    if master:
        print(f"done: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}, log and loss.png in {config.out_dir}")


if __name__ == "__main__":
    run_trainer(main)

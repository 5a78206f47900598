"""
Train a Cogformer language model (arXiv 2411.07176) the way nanoGPT trains GPT-2.

    python train_lm.py --compile                               # the paper's model on RedPajama, one GPU
    torchrun --standalone --nproc_per_node=8 train_lm.py --compile   # the same on 8 GPUs, no code change
    python train_lm.py --preset=demo                           # a small Cogformer on Python's own sources, CPU
    python train_lm.py --preset=demo --attn=softmax --out_dir=out/demo_softmax   # the Transformer baseline
    python train_lm.py --preset=demo --resume                  # continue from out_dir/ckpt.pt, bit for bit
    python train_lm.py --preset=1b --doc_mask                  # a 1.0B Cogformer, attention within documents
    python train_lm.py --init_from=cog_ckpt_100.00_Bi.pt --data_dir=data/redpajama_llama2   # fine-tune theirs

Any field of TrainConfig is a --key=value override. Data folders come from data/prepare_lm.py.
"""

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

# on a busy CPU, spinning OpenMP threads make each step several times slower: let idle ones sleep (before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (and the imports below)
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.prepare_lm import prepare_pystdlib
from model import (Cogformer, CogformerConfig, authors_to_nanocog, configure_adamw, document_ids,
                   load_weights_file)
from train_utils import (Dtype, MetricsLog, SlowRun, StopNow, StopRequest, agree_on_step, autocast_context,
                         check_at_least, check_betas, check_finite, check_out_dir, gather_generator_states,
                         learning_rate, load_checkpoint, make_grad_scaler, make_out_dir, micro_steps_per_process,
                         optimizer_step, parse_config, peak_flops, pick_fields, plot_loss_curve, print_config,
                         resolve_device, resolve_dtype, restore_generator_state, rng_state, run_trainer,
                         save_checkpoint, set_rng_state, setup_distributed, unwrap, use_deterministic_algorithms)


@dataclass
class TrainConfig:
    preset: str = "paper"
    data_dir: str = "data/redpajama"  # a folder made by data/prepare_lm.py: train.bin, val.bin, meta.json
    # model: the names of CogformerConfig; the defaults are the paper's 12 x 768 Cogformer
    block_size: int = 2048
    vocab_size: int = 0  # 0: the dataset's vocabulary size, padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = 2304
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attn: Literal["cog", "softmax"] = "cog"  # softmax: the Transformer baseline
    softmax_layers: str = "0,-1"  # with attn=cog, the layers that keep softmax (the paper's first and last; "": none)
    init_from: str = ""  # the authors' released checkpoint to fine-tune or continue (its architecture wins)
    doc_mask: bool = False  # attend only within a document (packed documents; a new one at each BOS, else end-of-text)
    # optimisation (our choices, the paper does not say): 16 x 2048 x 16 = 524,288 tokens per step
    batch_size: int = 16  # micro-batch per GPU
    grad_accum: int = 16  # micro-batches per step over all GPUs together (divided by the number of GPUs)
    max_iters: int = 190_735  # 100B tokens, the paper's budget (RedPajama-1T-Sample holds ~1B: see data/prepare_lm.py)
    learning_rate: float = 6e-4
    min_lr: float = 6e-5  # cosine decay from learning_rate to min_lr at max_iters
    warmup_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    # evaluation, logging, checkpoints
    out_dir: str = "out/lm"
    eval_interval: int = 1000
    eval_iters: int = 100  # batches per split in one evaluation
    log_interval: int = 10
    resume: bool = False
    # system
    device: str = "auto"  # auto: cuda if there is a GPU, else cpu
    dtype: Dtype = "auto"  # auto: bfloat16 on GPUs that have it, float16 (with loss scaling) on others, float32 on CPU
    compile: bool = False
    deterministic: bool = False  # bit-reproducible GPU runs (slower): deterministic algorithms, two-pass Cog backward
    seed: int = 1337


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
    "3b": dict(n_layer=32, n_head=20, n_embd=2560, ffn_hidden=7680, batch_size=4, grad_accum=128, max_iters=95_367,
               learning_rate=1.6e-4, min_lr=1.6e-5),
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


def get_batch(data_dir, split, batch_size, block_size, generator, device):
    """batch_size random windows of the split (nanoGPT's sampler): inputs x and next-token targets y, (B, T)."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")  # fresh: a kept memmap leaks
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):  # pinned memory: the copy overlaps with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def check_config(config):
    """Values that cannot work end the run here, before anything is prepared, downloaded or written."""
    check_at_least(config, 1, "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden", "batch_size", "grad_accum",
                   "eval_interval", "eval_iters", "log_interval")
    check_at_least(config, 0, "vocab_size", "max_iters", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                   "grad_clip")
    check_betas(config)
    check_out_dir(config.out_dir)
    pick_fields(config, CogformerConfig)  # the model's own checks: heads divide the width, ...
    resolve_dtype(config.dtype, "cpu")


def main(argv=None):
    config = parse_config(TrainConfig, PRESETS, argv)
    check_config(config)
    ddp, rank, world_size, device = setup_distributed(resolve_device(config.device))
    master = rank == 0
    config.device, config.dtype = device, resolve_dtype(config.dtype, device)
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)
    tokens_per_iter = config.batch_size * config.block_size * grad_accum * world_size
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")

    # data
    meta = load_meta(config.data_dir, master, ddp)
    padded_vocab = -(-meta["vocab_size"] // 64) * 64
    config.vocab_size = config.vocab_size or padded_vocab
    if config.vocab_size < meta["vocab_size"]:
        raise SystemExit(f"error: vocab_size {config.vocab_size} < the dataset's {meta['vocab_size']}")
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= config.block_size:
            raise SystemExit(f"error: {config.data_dir}/{split}.bin holds {meta[f'{split}_tokens']} tokens, "
                             f"not more than block_size {config.block_size}")

    # model, optimizer, loss scaler, and the state they continue from on --resume
    checkpoint = load_checkpoint(ckpt_path) if config.resume else None
    model_config = pick_fields(config, CogformerConfig)
    if checkpoint is not None:
        if checkpoint.get("kind") != "lm":
            raise SystemExit(f"error: {ckpt_path} is a {checkpoint.get('kind')!r} checkpoint, not an LM's")
        if checkpoint["meta"]["tokenizer"] != meta["tokenizer"]:
            raise SystemExit(f"error: {ckpt_path} was trained with the {checkpoint['meta']['tokenizer']} tokenizer, "
                             f"{config.data_dir} holds {meta['tokenizer']} tokens")
        if dataclasses.asdict(model_config) != checkpoint["model_config"] and master:
            print("note: resuming with the checkpoint's model config, not the command line's")
        model_config = CogformerConfig(**checkpoint["model_config"])
        config.vocab_size = model_config.vocab_size
        if master:
            print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")
    released = None  # the authors' weights, converted, for --init_from (a resumed run has its own)
    if config.init_from and checkpoint is None:
        if meta["tokenizer"] != "llama2":
            raise SystemExit(f"error: the authors' models read Llama-2 tokens; {config.data_dir} holds "
                             f"{meta['tokenizer']} tokens (prepare it with data/prepare_lm.py --tokenizer=llama2)")
        try:
            released_config, released = authors_to_nanocog(load_weights_file(config.init_from))
        except ValueError as err:
            raise SystemExit(f"error: --init_from={config.init_from}: {err}") from None
        model_config = dataclasses.replace(released_config, block_size=config.block_size)
        if dataclasses.asdict(model_config) != dataclasses.asdict(pick_fields(config, CogformerConfig)) and master:
            print(f"note: the model's architecture comes from {config.init_from}, not from the command line")
        for f in dataclasses.fields(CogformerConfig):  # the printed and saved config say what is trained
            setattr(config, f.name, getattr(model_config, f.name))
        if model_config.vocab_size < meta["vocab_size"]:
            raise SystemExit(f"error: {config.init_from} has {model_config.vocab_size} tokens, the dataset "
                             f"{meta['vocab_size']}")
    if master:
        print(f"training a Cogformer on {config.data_dir} ({meta['tokenizer']} tokens); config:")
        print_config(config)
        print(f"{world_size} process(es), {grad_accum} micro-batches each, {tokens_per_iter:,} tokens per iteration")
        make_out_dir(config.out_dir)

    use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = Cogformer(model_config)
    if released is not None:
        model.load_state_dict(released)
        released = None  # free the memory
    model = model.to(device)
    optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                device.split(":")[0])
    scaler = make_grad_scaler(device, config.dtype)
    ctx = autocast_context(device, config.dtype)
    data_gen = torch.Generator().manual_seed(config.seed + 1 + rank)  # training batches; its state is checkpointed
    start_iter, best_val_loss, evaluated = 0, float("inf"), None  # evaluated: the last iteration evaluated
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iter, best_val_loss = checkpoint["iter"], checkpoint["best_val_loss"]
        evaluated = start_iter if checkpoint.get("eval_done", True) else None
        set_rng_state(checkpoint["rng"])
        restore_generator_state(data_gen, checkpoint["data_rng"], rank, world_size, master)
        checkpoint = None  # free the memory
    if master:
        counts = model.num_params()
        print(f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding; "
              f"layers: {' '.join(model_config.layer_kinds())}")
    flops_per_token = model.flops_per_token()
    slow_run = SlowRun(device, flops_per_token * tokens_per_iter, f"{tokens_per_iter:,} tokens per step, and "
                       f"each evaluation {2 * config.eval_iters} batches of {config.batch_size} x {config.block_size} "
                       "tokens", master)
    if config.compile:
        model = torch.compile(model)
    eval_model = model  # evaluated on the master only, so without the DDP wrapper
    if ddp:
        model = DDP(model, device_ids=[device] if device.startswith("cuda") else None)

    doc_start = meta["eot_token"] if meta.get("bos_token") is None else meta["bos_token"]

    def doc_ids(x):
        """--doc_mask: the document id of every token of the batch, for attention within documents only."""
        return document_ids(x, doc_start) if config.doc_mask else None

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
        eval_model.eval()
        out = {}
        for k, split in enumerate(("train", "val")):
            gen = torch.Generator().manual_seed(config.seed + 100_000 + k)
            losses = torch.zeros(config.eval_iters)
            for i in range(config.eval_iters):
                stop.poll()
                x, y = get_batch(config.data_dir, split, config.batch_size, config.block_size, gen, device)
                with ctx:
                    _, loss = eval_model(x, y, doc_ids=doc_ids(x))
                losses[i] = loss.item()
            out[split] = losses.mean().item()
        eval_model.train()
        return out

    def save(it):
        """Every rank's sampler state is gathered; the master writes out_dir/ckpt.pt atomically. eval_done: whether
        the evaluation at it is done (if not, a resumed run does it)."""
        data_rng = gather_generator_states(data_gen, ddp, world_size)
        if master:
            save_checkpoint({"kind": "lm", "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "model_config": dataclasses.asdict(model_config),
                             "config": dataclasses.asdict(config), "iter": it, "eval_done": evaluated == it,
                             "best_val_loss": best_val_loss, "rng": rng_state(), "data_rng": data_rng, "meta": meta},
                            ckpt_path)

    def plot():
        plot_loss_curve(log.path, os.path.join(config.out_dir, "loss.png"),
                        f"Cogformer (attn={model_config.attn}) on {os.path.basename(config.data_dir)}")

    def stop_and_save(it):
        save(it)
        if master:
            plot()
            print(f"stopped: saved {ckpt_path} at iteration {it}; continue with --resume")

    log = MetricsLog(config.out_dir, resume_iter=start_iter if config.resume else None) if master else None
    stop = StopRequest(ddp)
    peak = peak_flops(device)
    it = start_iter
    t_last, iters_timed = time.time(), 0
    while True:
        lr = learning_rate(it, config.learning_rate, config.warmup_iters, config.max_iters, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data_state = data_gen.get_state()  # a stop inside this iteration saves the state from its start

        try:
            # evaluate and checkpoint, once per iteration (a resumed run's checkpoint says whether it was done)
            if (it % config.eval_interval == 0 or it >= config.max_iters) and evaluated != it:
                if master:
                    losses = estimate_loss()
                    best_val_loss = min(best_val_loss, losses["val"])
                    print(f"eval at iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    log.write(iter=it, tokens=it * tokens_per_iter, train_loss=losses["train"],
                              val_loss=losses["val"])
                evaluated = it
                save(it)
                if master:
                    plot()
                t_last, iters_timed = time.time(), 0
            if it >= config.max_iters:
                break

            # one optimizer step: grad_accum micro-batches, gradients all-reduced only after the last one
            t_step = time.time()
            loss_sum = torch.zeros((), device=device)
            x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, data_gen, device)
            for micro in range(grad_accum):
                stop.poll()
                sync = model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
                with sync:
                    with ctx:
                        _, loss = model(x, y, doc_ids=doc_ids(x))
                    if micro < grad_accum - 1:  # fetch the next batch while the GPU works on this one
                        x, y = get_batch(config.data_dir, "train", config.batch_size, config.block_size, data_gen,
                                         device)
                    scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.detach()
            loss_value, stop_now = agree_on_step(loss_sum, grad_accum, stop, ddp, world_size)
            check_finite(loss_value, it, ckpt_path)  # before the update: the checkpoint on disk stays the last good one
            optimizer_step(model, optimizer, scaler, config.grad_clip)
        except StopNow:  # inside the evaluation or the step: nothing of this iteration is kept, --resume redoes it
            data_gen.set_state(data_state)
            stop_and_save(it)
            break
        slow_run.first_step(time.time() - t_step, config.max_iters - it - 1)

        iters_timed += 1
        if it % config.log_interval == 0 and master:
            dt = (time.time() - t_last) / iters_timed
            tok_s = tokens_per_iter / dt
            mfu = flops_per_token * tok_s / (peak * world_size) if peak else None
            print(f"iter {it}: loss {loss_value:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms/iter, {tok_s:,.0f} tok/s"
                  + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)
            log.write(iter=it, loss=loss_value, lr=lr, ms_per_iter=dt * 1000, tok_per_s=tok_s, mfu=mfu)
            t_last, iters_timed = time.time(), 0
        it += 1
        if stop_now:
            stop_and_save(it)
            break
    if master and it >= config.max_iters:
        print(f"done: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}, log and loss.png in {config.out_dir}")


if __name__ == "__main__":
    run_trainer(main)

"""
Train a Cogformer language model (arXiv 2411.07176) the way nanoGPT trains GPT-2.

    python train_lm.py --compile                               # the paper's model on RedPajama, one GPU
    torchrun --standalone --nproc_per_node=8 train_lm.py --compile   # the same on 8 GPUs, no code change
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
from dataclasses import dataclass

# on a busy CPU, spinning OpenMP threads make each step several times slower: let idle ones sleep (before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (and the imports below)
import torch
import torch.distributed as dist

from data.prepare_lm import prepare_pystdlib
from authors import authors_to_nanocog, load_weights_file
from model import Cogformer, CogformerConfig, document_ids
from train_utils import (RunOptions, TrainLoop, check_at_least, open_run, option,
                         pick_fields, plot_loss_curve, run_trainer, start_run)


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


def main(argv=None):
    run = start_run(TrainConfig, PRESETS, check_config, "lm", "an LM's", argv)
    config, device, master = run.config, run.device, run.master
    tokens_per_iter = config.batch_size * config.block_size * run.grad_accum * run.world_size

    # data
    meta = load_meta(config.data_dir, master, run.ddp)
    config.vocab_size = config.vocab_size or -(-meta["vocab_size"] // 64) * 64  # padded up to a multiple of 64
    check_dataset(config, meta)

    # the model: a new one, the authors' (--init_from), or the run's own (--resume)
    model_config, released = pick_fields(config, CogformerConfig), None
    if run.checkpoint is not None:
        if run.checkpoint["meta"]["tokenizer"] != meta["tokenizer"]:
            raise SystemExit(f"error: {run.ckpt_path} was trained with the {run.checkpoint['meta']['tokenizer']} "
                             f"tokenizer, {config.data_dir} holds {meta['tokenizer']} tokens")
        model_config = CogformerConfig(**run.checkpoint["model_config"])
        config.vocab_size = model_config.vocab_size
    elif config.init_from:
        model_config, released = released_model(config, meta, master)
    open_run(run, f"a Cogformer on {config.data_dir} ({meta['tokenizer']} tokens)", f"{tokens_per_iter:,} tokens")
    model = Cogformer(model_config)
    if released is not None:
        model.load_state_dict(released)
        released = None  # free the memory
    model = model.to(device)
    if master:
        counts = model.num_params()
        print(f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding; "
              f"layers: {' '.join(model_config.layer_kinds())}")
    best_val_loss = run.checkpoint["best_val_loss"] if run.checkpoint is not None else float("inf")
    data_gen = torch.Generator().manual_seed(config.seed + 1 + run.rank)  # training batches; checkpointed
    loop = TrainLoop(run, model, model_config, data_gen, (tokens_per_iter, "tokens"),
                     model.flops_per_token() * tokens_per_iter,
                     f"{tokens_per_iter:,} tokens per step, and each evaluation {2 * config.eval_iters} batches of "
                     f"{config.batch_size} x {config.block_size} tokens")
    doc_start = meta["eot_token"] if meta.get("bos_token") is None else meta["bos_token"]

    def loss_of(model, x, y):
        with loop.ctx:  # --doc_mask: attention within documents only
            return model(x, y, doc_ids=document_ids(x, doc_start) if config.doc_mask else None)[1]

    def batch(split, generator):
        return get_batch(config.data_dir, split, config.batch_size, config.block_size, generator, device)

    @torch.no_grad()
    def evaluate(it):
        """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
        nonlocal best_val_loss
        loop.eval_model.eval()
        losses = {}
        for k, split in enumerate(("train", "val")):
            gen = torch.Generator().manual_seed(config.seed + 100_000 + k)
            total = 0.0
            for _ in range(config.eval_iters):
                loop.stop.poll()
                total += loss_of(loop.eval_model, *batch(split, gen)).item()
            losses[split] = total / config.eval_iters
        loop.eval_model.train()
        best_val_loss = min(best_val_loss, losses["val"])
        print(f"eval at iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        loop.log.write(iter=it, tokens=it * tokens_per_iter, train_loss=losses["train"], val_loss=losses["val"])

    next_batch = None

    def micro_loss(micro):
        """The loss of one micro-batch; the next one is fetched while the GPU works on this one."""
        nonlocal next_batch
        x, y = batch("train", data_gen) if micro == 0 else next_batch
        loss = loss_of(loop.model, x, y)
        if micro < run.grad_accum - 1:
            next_batch = batch("train", data_gen)
        return loss

    def plot():
        plot_loss_curve(loop.log.path, os.path.join(config.out_dir, "loss.png"),
                        f"Cogformer (attn={model_config.attn}) on {os.path.basename(config.data_dir)}")

    it = loop.run_loop(micro_loss, evaluate, lambda: {"best_val_loss": best_val_loss, "meta": meta}, plot)
    if master and it >= config.max_iters:
        print(f"done: best val loss {best_val_loss:.4f}; checkpoint {run.ckpt_path}, log and loss.png in "
              f"{config.out_dir}")


if __name__ == "__main__":
    run_trainer(main)

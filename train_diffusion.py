"""
Train a U-ViC (U-ViT with Cog attention, arXiv 2411.07176) as U-ViT trains its CIFAR-10 and MS-COCO models.

    python train_diffusion.py --compile                        # the paper's 44M U-ViC on CIFAR-10, one GPU
    torchrun --standalone --nproc_per_node=4 train_diffusion.py --compile --batch_size=32 --grad_accum=4
    python train_diffusion.py --preset=demo                    # a small U-ViC on coloured shapes, CPU, ~15 min
    python train_diffusion.py --preset=demo --attn=softmax --out_dir=out/demo_softmax_diffusion   # U-ViT
    python train_diffusion.py --preset=demo --resume           # continue from out_dir/ckpt.pt, bit for bit
    python train_diffusion.py --preset=demo_t2i                # text-to-image on captioned shapes, CPU, ~6 min
    python train_diffusion.py --preset=coco --compile          # text-to-image on MS-COCO (data/prepare_coco.py first)
    python train_diffusion.py --preset=coco --init_from=cog_nnet_ema.pth   # fine-tune the authors' released U-ViC

Any field of TrainConfig is a --key=value override; one run per out_dir (see train_lm.py). Every eval_interval
iterations: a checkpoint, the EMA model's loss on held-out images (fixed t and noise), and out_dir/samples_XXXXXX.png
drawn by the EMA model with DPM-Solver (text-to-image: DPM-Solver++ with guidance, captioned; the shapes demo also
scores whether each sample matches its prompt). Sample and measure FID afterwards with sample.py.
"""

import copy
import dataclasses
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from authors import load_uvic
from checkpoint import check_checkpoint_fits, make_out_dir, restore_run, save_run
from cli import check_at_least, option, print_config, require
from data.shapes import (DEMO_PROMPTS, DEMO_WORDS, captioned_shapes_batch, demo_caption_features, demo_prompt_features,
                         parse_demo_prompt, score_shapes, shapes_batch)
from diffusion import (check_prediction, checkpoint_prediction, diffusion_loss, ema_update, generate, generate_guided,
                       get_schedule, load_cifar10, noise_predictor, save_captioned_grid, save_grid)
from distributed import agree_on_step, fsdp_applies, micro_steps_per_process, setup_distributed, shard_model
from logs import MetricsLog, SlowRun, plot_loss_curve
from memory import blocks_of, check_fits, estimate_memory, plan_of
from model import UViC, UViCConfig
from training import (RunOptions, StopNow, StopRequest, Stopped, autocast_context, check_finite,
                      configure_adamw, learning_rate, make_grad_scaler, optimizer_step, peak_flops, pick_fields,
                      run_trainer, set_cpu_threads, set_up_torch, start_run)


DATASETS = ("cifar10", "shapes", "shapes_t2i", "coco")


@dataclass
class TrainConfig(UViCConfig, RunOptions):
    """The model's fields (UViCConfig; the defaults are U-ViT-S/2, 44M parameters), how the run starts and runs
    (RunOptions), and these."""
    preset: str = "paper"
    dataset: str = option("cifar10", "cifar10; shapes: coloured circles, squares and triangles drawn on the fly "
                          "(offline); coco or shapes_t2i: text-to-image", choices=DATASETS, section="data")
    data_dir: str = option("data/cifar10", "CIFAR-10 is downloaded here by torchvision on first use; coco: "
                           "data/prepare_coco.py's features")
    prediction: str = option("eps", "what the network predicts: eps, the noise (U-ViT), or v (see "
                             "diffusion.PREDICTIONS)", section="diffusion")
    noise_schedule: str = option("vp", "vp: the VP-SDE (U-ViT's CIFAR-10); sd: discrete DDPM with SD's betas "
                                 "(MS-COCO)")
    p_uncond: float = option(0.1, "text-to-image: classifier-free guidance training replaces the caption by the "
                             "empty one this often")
    cfg_scale: float = option(1.0, "text-to-image: guidance of the eval grids, cond + cfg_scale * (cond - uncond)")
    latent_scale: float = option(0.23010, "MS-COCO: Stable Diffusion latents times this have about unit variance "
                                 "(U-ViT's)")
    init_from: str = option("", "start from the authors' released weights (a U-ViT / U-ViC state dict, "
                            "nnet_ema.pth)")
    batch_size: int = option(128, "micro-batch per GPU", section="optimisation: U-ViT's CIFAR-10 recipe (batch 128, "
                             "AdamW, 2500 warmup steps then constant, EMA 0.9999)")
    grad_accum: int = option(1, "micro-batches per step over all GPUs together (divided by the number of GPUs)")
    max_iters: int = 500_000
    learning_rate: float = 2e-4
    warmup_iters: int = 2500
    min_lr: Optional[float] = option(None, "none: constant after warmup (U-ViT); a value: cosine decay to it at "
                                     "max_iters")
    weight_decay: float = 0.03
    beta1: float = 0.99
    beta2: float = 0.999
    grad_clip: float = option(0.0, "0: no clipping (U-ViT does not clip)")
    ema_decay: float = 0.9999
    out_dir: str = option("out/diffusion", "the run's folder: ckpt.pt, log.jsonl, loss.png, samples_*.png",
                          section="evaluation, samples, logging, checkpoints")
    eval_interval: int = option(5000, "iterations between a checkpoint, the EMA val loss and an EMA sample grid")
    eval_iters: int = option(10, "held-out batches in one val-loss estimate")
    grid_size: int = option(64, "images in each sample grid")
    sample_steps: int = option(50, "DPM-Solver steps for the grids")
    log_interval: int = 10


PRESETS = {
    "paper": {},  # the fields' defaults
    # 0.6M parameters; 16x16 shapes in 4x4 patches (17 tokens); v-prediction (see diffusion.PREDICTIONS); batch 64.
    # Each mattered: in single-seed runs of the same CPU time, eps-prediction, 2x2 patches or batch 32 drew ragged or
    # off-colour blobs instead of shapes. Its time on a CPU: docs/diffusion.md.
    "demo": dict(dataset="shapes", img_size=16, patch_size=4, embed_dim=96, depth=5, num_heads=4, prediction="v",
                 batch_size=64, max_iters=9000, learning_rate=2e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9,
                 beta2=0.99, weight_decay=0.0, ema_decay=0.99, out_dir="out/demo_diffusion", eval_interval=1000,
                 eval_iters=4, grid_size=64, sample_steps=25, log_interval=100),
    # U-ViT's MS-COCO recipe (docs/paper.md): 4x32x32 SD latents, 77 CLIP tokens, discrete DDPM with SD's betas, noise
    # prediction, p_uncond 0.1, AdamW (0.9, 0.9), 5000 warmup steps, batch 256, 1M steps; bf16 autocast on GPUs
    "coco": dict(dataset="coco", data_dir="data/coco", img_size=32, in_chans=4, num_clip_token=77, clip_dim=768,
                 noise_schedule="sd", beta1=0.9, beta2=0.9, batch_size=256, max_iters=1_000_000, warmup_iters=5000,
                 out_dir="out/coco", grid_size=16),
    # the demo's shapes with captions ("a red circle"): each word a one-hot vector in place of CLIP's features, through
    # the same context tokens, discrete schedule, guidance training and DPM-Solver++ as MS-COCO; otherwise the demo's
    # network and optimiser. Captions make it easy: 3000 iterations draw crisp shapes that match their prompt
    "demo_t2i": dict(dataset="shapes_t2i", img_size=16, patch_size=4, embed_dim=96, depth=5, num_heads=4,
                     num_clip_token=3, clip_dim=9, noise_schedule="sd", prediction="v", batch_size=64,
                     max_iters=3000, learning_rate=2e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99,
                     weight_decay=0.0, ema_decay=0.99, out_dir="out/demo_t2i", eval_interval=500, eval_iters=4,
                     grid_size=48, sample_steps=25, log_interval=100),
}

# -----------------------------------------------------------------------------
# data: CIFAR-10 in memory on the device, MS-COCO features, or shapes drawn on the fly (data/shapes.py)

def get_batch(data, config, batch_size, generator, device):
    """A batch in [-1, 1]: random CIFAR-10 images (with replacement), flipped left-right half the time; or shapes."""
    if data is None:
        return shapes_batch(batch_size, config.img_size, generator, device)
    ix = torch.randint(len(data), (batch_size,), generator=generator, device=device)
    x = data[ix].float() / 127.5 - 1
    flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def get_t2i_batch(data, config, batch_size, generator, device, empty_context, p_uncond):
    """(x0, context) for text-to-image: shapes with their captions' word features, or MS-COCO latents (drawn from the
    stored mean and variance, then scaled, as U-ViT does) with the CLIP features of one of their captions. Each caption
    is replaced by the empty caption with probability p_uncond (classifier-free guidance training)."""
    if data is None:
        x0, kind, color = captioned_shapes_batch(batch_size, config.img_size, generator, device)
        context = demo_caption_features(kind, color)
    else:
        ix = torch.randint(len(data), (batch_size,), generator=generator, device=device)
        u = torch.rand(batch_size, generator=generator, device=device)
        moments, context = (t.to(device) for t in data.read(ix.tolist(), u.tolist()))
        mean, logvar = moments.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=device)
        x0 = (mean + torch.exp(0.5 * logvar) * noise) * config.latent_scale
    drop = torch.rand(batch_size, generator=generator, device=device) < p_uncond
    return x0, torch.where(drop.view(-1, 1, 1), empty_context, context)


def t2i_grid_prompts(val_data, config, device):
    """The eval grid's captions and their features: every demo prompt in turn, or the first MS-COCO val captions."""
    if val_data is None:
        prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(config.grid_size)]
        return prompts, demo_prompt_features(prompts, device)
    caption_ids = val_data.sample_caption_ids(0, config.grid_size)
    return val_data.caption_texts(caption_ids), val_data.caption_features(caption_ids).to(device)


def load_data(config, device, master, ddp):
    """(train, val): uint8 image tensors on the device (CIFAR-10), memory-mapped MS-COCO features, or (None, None)
    for the shapes."""
    if config.dataset in ("shapes", "shapes_t2i"):
        return None, None
    if config.dataset == "coco":
        from data.prepare_coco import CocoFeatures
        train, val = CocoFeatures(config.data_dir, "train"), CocoFeatures(config.data_dir, "val")
        latent, context = train.meta["latent_shape"], train.meta["context_shape"]
        if latent != [config.in_chans, config.img_size, config.img_size] or context != [config.num_clip_token,
                                                                                       config.clip_dim]:
            raise SystemExit(f"error: {config.data_dir} holds latents {latent} and text features {context}; the model "
                             f"expects in_chans={config.in_chans}, img_size={config.img_size}, num_clip_token="
                             f"{config.num_clip_token}, clip_dim={config.clip_dim}: set those to match")
        return train, val
    if config.dataset != "cifar10":
        raise SystemExit(f"error: --dataset must be cifar10, shapes, coco or shapes_t2i, got {config.dataset!r}")
    if (config.img_size, config.in_chans) != (32, 3):
        raise SystemExit(f"error: CIFAR-10 images are 3x32x32; got img_size={config.img_size}, in_chans={config.in_chans}")
    if ddp and not master:  # the master downloads first, the others then read its files
        dist.barrier()
    train, val = (load_cifar10(config.data_dir, train=split)[0].to(device) for split in (True, False))
    if ddp and master:
        dist.barrier()
    return train, val


def authors_weights(path, model_config):
    """The authors' released U-ViT / U-ViC at path (a state dict in U-ViT's names) in ours, checked against the run's
    network; the run's --attn says which attention the weights are used with."""
    try:
        authors = load_uvic(path, attn=model_config.attn, num_clip_token=model_config.num_clip_token,
                                    num_heads=model_config.num_heads)
    except ValueError as err:
        raise SystemExit(f"error: --init_from: {err}") from None
    theirs, ours = dataclasses.asdict(authors.config), dataclasses.asdict(model_config)
    differ = [f"{k}={theirs[k]!r} (this run: {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
    if differ:
        raise SystemExit(f"error: --init_from={path} holds another network: {', '.join(differ)}")
    return authors.state_dict()


def grid_decoder(config, data):
    """Samples -> pixels for the eval grids: the shapes are pixels already; MS-COCO latents go through the autoencoder
    the features were prepared with (where diffusers or the autoencoder is missing, training goes on without grids)."""
    if data is None:
        return lambda x: x.clamp(-1, 1)
    from data.prepare_coco import decode_latents, load_prepared_vae
    try:
        vae = load_prepared_vae(data.meta, config.device)
    except SystemExit as err:
        print(f"note: training without sample grids: {err}")
        return None
    return lambda z: decode_latents(vae, z, config.latent_scale)


def check_config(config):
    """The dataset, the model and the diffusion that cannot work together."""
    try:
        check_prediction(config.prediction)
        get_schedule(config.noise_schedule)
    except ValueError as err:
        raise SystemExit(f"error: --{err}") from None
    check_at_least(config, 1, "grid_size", "sample_steps")  # (the model's own checks ran as the config was made)
    check_at_least(config, 0, "mlp_ratio")
    require(0 <= config.ema_decay <= 1, f"--ema_decay={config.ema_decay}: must be in [0, 1]")
    require(not config.dataset.startswith("shapes") or config.in_chans == 3,
            f"--in_chans={config.in_chans}: the shapes are RGB images, in_chans must be 3")
    text_to_image = config.dataset in ("coco", "shapes_t2i")
    require(text_to_image == (config.num_clip_token > 0),
            f"--dataset={config.dataset} needs {'a' if text_to_image else 'no'} text-conditioned model: set "
            f"--num_clip_token (now {config.num_clip_token}) accordingly")
    require(config.dataset != "shapes_t2i" or (config.num_clip_token, config.clip_dim) == (3, len(DEMO_WORDS)),
            f"the shapes' captions are 3 one-hot words: --num_clip_token=3 --clip_dim={len(DEMO_WORDS)}")


def draw_grid(ema, config, val_data, schedule, ctx, empty_context, decode, grid_path, stop):
    """The EMA model's sample grid (the same starting noise every time); a stop request ends it within a sampler step.
    Text-to-image: the grid's prompts drawn with guidance, captioned, and for the shapes the share of samples that
    match their prompt, with guidance and without (returned as metrics)."""
    device = config.device
    shape = (config.in_chans, config.img_size, config.img_size)
    if empty_context is None:  # unconditional
        eps_fn = noise_predictor(ema, ctx, config.prediction, schedule)
        images = generate(lambda x, t: stop.poll() or eps_fn(x, t), config.grid_size, shape,
                          "dpm" if config.noise_schedule == "vp" else "dpm++", config.sample_steps, config.seed,
                          device, batch_size=config.grid_size, schedule=schedule)
        save_grid(images, grid_path)
        return {}
    prompts, context = t2i_grid_prompts(val_data, config, device)

    def draw(scale):
        stop.poll()
        return next(generate_guided(ema, [context], empty_context, scale, shape, config.sample_steps, config.seed,
                                    device, schedule, config.prediction, ctx))
    samples = draw(config.cfg_scale)
    if decode is not None:
        save_captioned_grid(decode(samples), prompts, grid_path)
    if val_data is not None:
        return {}
    kind, color = (torch.tensor(v, device=device) for v in zip(*map(parse_demo_prompt, prompts)))

    def share_matching(samples):
        return score_shapes(samples.clamp(-1, 1), kind, color)[0].float().mean().item()
    return {"match": share_matching(samples), "match_unguided": share_matching(draw(0.0))}


def check_resumed(config, checkpoint, ckpt_path):
    """A resumed run samples as it was trained: the same prediction and noise schedule."""
    for key, trained_on in (("prediction", checkpoint_prediction(checkpoint)),
                            ("noise_schedule", checkpoint["config"].get("noise_schedule", "vp"))):
        if trained_on != getattr(config, key):
            raise SystemExit(f"error: {ckpt_path} was trained with --{key}={trained_on}; resume with the same "
                             f"(got --{key}={getattr(config, key)})")


def draw_batch(data, config, generator, device, empty_context, p_uncond):
    """(x0, context) of one micro-batch; context None for an unconditional model. Text-to-image: each caption is
    replaced by the empty one with probability p_uncond."""
    if empty_context is not None:
        return get_t2i_batch(data, config, config.batch_size, generator, device, empty_context, p_uncond)
    return get_batch(data, config, config.batch_size, generator, device), None


@torch.no_grad()
def estimate_val_loss(ema, val_data, config, schedule, ctx, empty_context, stop):
    """The EMA model's mean loss on eval_iters held-out batches with the same t and noise at every evaluation
    (text-to-image: always with the caption)."""
    val_gen = torch.Generator(config.device).manual_seed(config.seed + 100_000)
    losses = []
    for _ in range(config.eval_iters):
        stop.poll()
        x0, context = draw_batch(val_data, config, val_gen, config.device, empty_context, 0.0)
        with ctx:
            losses.append(diffusion_loss(ema, x0, val_gen, config.prediction, schedule, context).item())
    return sum(losses) / len(losses)


def main(argv=None):
    # the command line, its checks, and on --resume the run's config and checkpoint: before anything is written
    config, ckpt_path, checkpoint = start_run(TrainConfig, PRESETS, check_config, "diffusion", "a diffusion one", argv)
    ddp, rank, world_size, device = setup_distributed(config.device)  # under torchrun: this rank's GPU
    config.device, master = device, rank == 0  # the master evaluates, logs and writes checkpoints
    fsdp = fsdp_applies(config.fsdp, ddp, master)  # --fsdp under torchrun: shards, not a replica per GPU
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)  # micro-batches per process in one step
    images_per_iter = config.batch_size * grad_accum * world_size
    schedule = get_schedule(config.noise_schedule)
    if checkpoint is not None:
        check_resumed(config, checkpoint, ckpt_path)
        if master:
            print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")

    # data
    train_data, val_data = load_data(config, device, master, ddp)

    # the model (a new one, the authors' with --init_from, or the run's own on --resume) and its EMA
    model_config = pick_fields(config, UViCConfig)
    if checkpoint is not None:
        model_config = UViCConfig(**checkpoint["model_config"])
    with torch.device("meta"):  # the model's shapes without its memory: the checkpoint's check, the memory estimate
        shapes = UViC(model_config)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, shapes, ckpt_path)
    tokens = (model_config.img_size // model_config.patch_size) ** 2 + 1  # the patches and the time token
    plan = plan_of(shapes, config, world_size, fsdp)  # what the memory estimate needs of this run
    if master:
        print_config(config, f"training a {model_config.model_name()} on {config.dataset}: {world_size} "
                             f"process(es), {grad_accum} micro-batches each, {images_per_iter} images per iteration")
        print(f"memory per GPU, estimated (docs/lm.md): {estimate_memory(shapes, plan).describe()}")
    if config.memory_check:  # on a GPU, a run that would not fit stops here, every rank alike
        check_fits(shapes, plan, device, resuming=checkpoint is not None)
    if master:
        make_out_dir(config.out_dir, move_aside=config.overwrite)
    set_up_torch(config.seed, config.deterministic)  # every rank alike: the same initial weights everywhere
    model = UViC(model_config)  # on the CPU
    set_cpu_threads(device, model, config.batch_size * model.pos_embed.shape[1], announce=master)  # one if small
    if config.init_from and checkpoint is None:  # the authors' released weights; the EMA starts from them too
        model.load_state_dict(authors_weights(config.init_from, model_config))
    if checkpoint is not None:  # the run's weights, from the CPU, before the model is placed and sharded
        model.load_state_dict(checkpoint["model"])
    # float32 always, whole on every rank (also under FSDP: its update gathers the shards); this model samples
    ema = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    if checkpoint is not None:
        ema.load_state_dict(checkpoint["ema"])
    model.activation_checkpointing = config.activation_checkpointing  # recompute each block in the backward
    flops_per_iter = 6 * model.num_params()["total"] * tokens * images_per_iter
    if master:
        print(f"parameters: {model.num_params()['total']:,} total; blocks: {' '.join(model_config.block_kinds())}")
    empty_context, decode = None, None  # text-to-image: the empty caption's features; latents -> pixels for grids
    if config.dataset in ("coco", "shapes_t2i"):
        empty_context = demo_caption_features(None, None) if train_data is None else \
            torch.from_numpy(train_data.empty_context.astype("float32")).unsqueeze(0)
        empty_context = empty_context.to(device)
        decode = grid_decoder(config, train_data) if master else None

    # onto the GPU(s): with --fsdp each block compiled and sharded, then the root; else compiled whole, and DDP
    if fsdp:
        if config.compile:  # block by block, as torchtitan does: FSDP's hooks between blocks stay outside compiled code
            for block in blocks_of(model):
                block.compile()
        model = raw_model = shard_model(model, blocks_of(model), device, config.dtype)  # each rank keeps its shards
    else:
        model = raw_model = model.to(device)  # raw_model: the EMA's source, without the wrappers
        if config.compile:
            model = torch.compile(model)
        if ddp:
            model = DDP(model, device_ids=[device] if device.startswith("cuda") else None)

    # optimizer (of the parameters as placed: under FSDP this rank's shards), precision, the run's state on --resume
    optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                device.split(":")[0])
    scaler = make_grad_scaler(device, config.dtype)  # fp16 only: loss scaling
    ctx = autocast_context(device, config.dtype)
    # batches, flips, t and noise: a generator of our own, checkpointed, so a resumed run draws what the full run would
    gen = torch.Generator(device).manual_seed(config.seed + 1 + rank)
    iter_num, evaluated = 0, None  # evaluated: the last iteration evaluated
    if checkpoint is not None:
        iter_num, evaluated = restore_run(checkpoint, model, optimizer, scaler, gen, rank, world_size)
        checkpoint = None  # free the memory
    slow_run = SlowRun(device, flops_per_iter, f"{images_per_iter} images per step, and each evaluation "
                       f"{config.eval_iters} batches and a {config.grid_size}-image grid of {config.sample_steps} "
                       "sampler steps", master)

    # the training loop: a stop (Ctrl-C, SIGTERM) saves the state from the start of the iteration it lands in
    log = MetricsLog(config.out_dir, iter_num if config.resume else None) if master else None  # log.jsonl

    def save(it):  # (every rank calls it)
        save_run(ckpt_path, it, model, optimizer, scaler, gen, ddp, world_size, kind="diffusion",
                 model_config=dataclasses.asdict(model_config), config=dataclasses.asdict(config),
                 eval_done=evaluated == it, ema=ema.state_dict())
        if master:
            plot_loss_curve(log.path, os.path.join(config.out_dir, "loss.png"),
                            f"{model_config.model_name()} on {config.dataset}", log_y=True)

    stop = StopRequest(ddp)
    peak = peak_flops(device)  # for MFU; None on a CPU or a GPU without a figure
    t_last, iters_timed = time.time(), 0
    while True:
        lr = learning_rate(iter_num, config.learning_rate, config.warmup_iters, config.max_iters, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen_state = gen.get_state()
        try:
            # evaluate and save, once per iteration (a resumed run's checkpoint says whether it was done)
            if (iter_num % config.eval_interval == 0 or iter_num >= config.max_iters) and evaluated != iter_num:
                if master:  # the EMA model's val loss and sample grid (the same starting noise every time)
                    val_loss = estimate_val_loss(ema, val_data, config, schedule, ctx, empty_context, stop)
                    grid_path = os.path.join(config.out_dir, f"samples_{iter_num:06d}.png")
                    metrics = draw_grid(ema, config, val_data, schedule, ctx, empty_context, decode, grid_path, stop)
                    note = (f"; match their prompt: {metrics['match']:.0%} guided (cfg {config.cfg_scale}), "
                            f"{metrics['match_unguided']:.0%} unguided") if "match" in metrics else ""
                    print(f"eval at iter {iter_num}: val loss (EMA) {val_loss:.4f}; samples in {grid_path}{note}")
                    log.write(iter=iter_num, images=iter_num * images_per_iter, val_loss=val_loss, **metrics)
                evaluated = iter_num
                save(iter_num)
                t_last, iters_timed = time.time(), 0
            if iter_num >= config.max_iters:
                break
            # one optimizer step of grad_accum micro-batches on each rank, from its own generator
            t_step, loss_sum = time.time(), torch.zeros((), device=device)
            for micro in range(grad_accum):
                stop.poll()
                last = micro == grad_accum - 1  # FSDP and DDP reduce the gradients after the last micro-batch only
                if fsdp:
                    model.set_requires_gradient_sync(last)  # until then each rank accumulates whole gradients
                with model.no_sync() if ddp and not fsdp and not last else nullcontext():
                    x0, context = draw_batch(train_data, config, gen, device, empty_context, config.p_uncond)
                    with ctx:
                        loss = diffusion_loss(model, x0, gen, config.prediction, schedule, context)
                    scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.detach()
            loss, stop_now = agree_on_step(loss_sum / grad_accum, stop.signum, ddp)
            check_finite(loss, iter_num, ckpt_path)  # before the update: the checkpoint on disk stays the last good one
            optimizer_step(model, optimizer, scaler, config.grad_clip)
            ema_update(ema, raw_model, config.ema_decay)  # (under FSDP every rank gathers the new weights)
        except StopNow:  # inside the evaluation or the step: nothing of this iteration is kept, --resume redoes it
            gen.set_state(gen_state)
            stop_now = stop.signum
        else:
            slow_run.first_step(time.time() - t_step, config.max_iters - iter_num - 1)
            iters_timed += 1
            if iter_num % config.log_interval == 0 and master:
                dt = (time.time() - t_last) / iters_timed
                mfu = flops_per_iter / dt / (peak * world_size) if peak else None
                print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms/iter, "
                      f"{images_per_iter / dt:,.0f} images/s" + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)
                log.write(iter=iter_num, loss=loss, lr=lr, ms_per_iter=dt * 1000, images_per_s=images_per_iter / dt,
                          mfu=mfu)
                t_last, iters_timed = time.time(), 0
            iter_num += 1
        if stop_now:
            save(iter_num)
            if master:
                print(f"stopped: saved {ckpt_path} at iteration {iter_num}; continue with --resume")
            raise Stopped(stop_now)  # exit status 130 after Ctrl-C, 143 after SIGTERM
    if master:
        print(f"done: checkpoint {ckpt_path}, samples, log and loss.png in {config.out_dir}; "
              f"sample with: python sample.py --out_dir={config.out_dir}")


if __name__ == "__main__":
    run_trainer(main)

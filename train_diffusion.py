"""
Train a U-ViC (U-ViT with Cog attention, arXiv 2411.07176) as U-ViT trains its CIFAR-10 and MS-COCO models.

    python train_diffusion.py --compile                        # the paper's 44M U-ViC on CIFAR-10, one GPU
    torchrun --standalone --nproc_per_node=4 train_diffusion.py --compile --batch_size=32 --grad_accum=4
    python train_diffusion.py --preset=demo                    # a small U-ViC on coloured shapes, CPU, 6.5-10.5 min
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
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion import (check_prediction, checkpoint_prediction, diffusion_loss, ema_update, generate, generate_guided,
                       get_schedule, load_cifar10, noise_predictor, save_captioned_grid, save_grid)
from data.shapes import (DEMO_PROMPTS, DEMO_WORDS, captioned_shapes_batch, demo_caption_features, demo_prompt_features,
                         parse_demo_prompt, score_shapes, shapes_batch)
from model import UViC, UViCConfig, configure_adamw
from train_utils import (Dtype, MetricsLog, SlowRun, StopNow, StopRequest, agree_on_step, autocast_context,
                         check_at_least, check_betas, check_finite, check_out_dir, gather_generator_states,
                         learning_rate, make_grad_scaler, make_out_dir, micro_steps_per_process, optimizer_step,
                         parse_config, pick_fields, plot_loss_curve, print_config, require, resolve_device,
                         resolve_dtype, restore_generator_state, rng_state, run_trainer, save_checkpoint, set_rng_state,
                         setup_distributed, start_or_resume, unwrap, use_deterministic_algorithms)


@dataclass
class TrainConfig:
    preset: str = "paper"
    dataset: str = "cifar10"  # or "shapes": coloured circles, squares and triangles drawn on the fly (offline)
    data_dir: str = "data/cifar10"  # CIFAR-10 is downloaded here by torchvision on first use
    # text-to-image: dataset "coco" (data/prepare_coco.py's features in data_dir) or "shapes_t2i" (captioned shapes)
    num_clip_token: int = 0  # text tokens per caption (77 for MS-COCO's CLIP features); 0: unconditional
    clip_dim: int = 768  # width of the text features
    p_uncond: float = 0.1  # classifier-free guidance training: the caption is replaced by the empty one this often
    cfg_scale: float = 1.0  # guidance of the eval grids: cond + cfg_scale * (cond - uncond)
    latent_scale: float = 0.23010  # MS-COCO: Stable Diffusion latents times this have about unit variance (U-ViT's)
    init_from: str = ""  # start from the authors' released weights (a U-ViT / U-ViC state dict, nnet_ema.pth)
    # model: the names of UViCConfig; the defaults are U-ViT-S/2 (44M parameters)
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 13
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attn: Literal["cog", "softmax"] = "cog"  # softmax: the U-ViT baseline
    softmax_layers: str = "0,-1"  # with attn=cog, the layers that keep softmax (the paper's first and last; "": none)
    prediction: str = "eps"  # what the network predicts: "eps", the noise (U-ViT), or "v" (see diffusion.PREDICTIONS)
    noise_schedule: str = "vp"  # "vp": the VP-SDE (U-ViT's CIFAR-10); "sd": discrete DDPM with SD's betas (MS-COCO)
    # optimisation: U-ViT's CIFAR-10 recipe (batch 128, AdamW, 2500 warmup steps then constant, EMA 0.9999)
    batch_size: int = 128  # micro-batch per GPU
    grad_accum: int = 1  # micro-batches per step over all GPUs together (divided by the number of GPUs)
    max_iters: int = 500_000
    learning_rate: float = 2e-4
    warmup_iters: int = 2500
    min_lr: Optional[float] = None  # none: constant after warmup (U-ViT); a value: cosine decay to it at max_iters
    weight_decay: float = 0.03
    beta1: float = 0.99
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0: no clipping (U-ViT does not clip)
    ema_decay: float = 0.9999
    # evaluation, samples, logging, checkpoints
    out_dir: str = "out/diffusion"
    eval_interval: int = 5000  # checkpoint, EMA val loss and an EMA sample grid
    eval_iters: int = 10  # held-out batches in one val-loss estimate
    grid_size: int = 64  # images in each sample grid
    sample_steps: int = 50  # DPM-Solver steps for the grids
    log_interval: int = 10
    resume: bool = False  # continue the run in out_dir, with its config (train_utils.RESUME_MAY_CHANGE)
    overwrite: bool = False  # a new run where out_dir holds one: the old one moves to out_dir/previous-<time>/
    # system
    device: str = "auto"  # auto: cuda if there is a GPU, else cpu
    dtype: Dtype = "auto"  # auto: bfloat16 on GPUs that have it, float16 (with loss scaling) on others, float32 on CPU
    compile: bool = False
    deterministic: bool = False  # bit-reproducible GPU runs (slower): deterministic algorithms, two-pass Cog backward
    seed: int = 1337


PRESETS = {
    "paper": {},  # the fields' defaults
    # 0.6M parameters; 16x16 shapes in 4x4 patches (17 tokens); v-prediction (see diffusion.PREDICTIONS); batch 64.
    # Each mattered: in single-seed runs of the same CPU time, eps-prediction, 2x2 patches or batch 32 drew ragged or
    # off-colour blobs instead of shapes. 2 CPU cores: ~44 ms/iter, 9000 iterations in ~6.5 min (README.md's demo).
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

DATASETS = ("cifar10", "shapes", "shapes_t2i", "coco")


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
        authors = UViC.from_authors(path, attn=model_config.attn, num_clip_token=model_config.num_clip_token,
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
    """Values that cannot work end the run here, before anything is downloaded or written."""
    try:
        check_prediction(config.prediction)
        get_schedule(config.noise_schedule)
    except ValueError as err:
        raise SystemExit(f"error: --{err}") from None
    check_at_least(config, 1, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "batch_size",
                   "grad_accum", "eval_interval", "eval_iters", "grid_size", "sample_steps", "log_interval")
    check_at_least(config, 0, "mlp_ratio", "max_iters", "learning_rate", "warmup_iters", "min_lr", "weight_decay",
                   "grad_clip")
    check_betas(config)
    require(0 <= config.ema_decay <= 1, f"--ema_decay={config.ema_decay}: must be in [0, 1]")
    require(config.dataset in DATASETS, f"--dataset={config.dataset}: choose from {', '.join(DATASETS)}")
    require(not config.dataset.startswith("shapes") or config.in_chans == 3,
            f"--in_chans={config.in_chans}: the shapes are RGB images, in_chans must be 3")
    text_to_image = config.dataset in ("coco", "shapes_t2i")
    require(text_to_image == (config.num_clip_token > 0),
            f"--dataset={config.dataset} needs {'a' if text_to_image else 'no'} text-conditioned model: set "
            f"--num_clip_token (now {config.num_clip_token}) accordingly")
    require(config.dataset != "shapes_t2i" or (config.num_clip_token, config.clip_dim) == (3, len(DEMO_WORDS)),
            f"the shapes' captions are 3 one-hot words: --num_clip_token=3 --clip_dim={len(DEMO_WORDS)}")
    check_out_dir(config.out_dir)
    pick_fields(config, UViCConfig)  # the model's own checks: patches tile the image, ...
    resolve_dtype(config.dtype, "cpu")


def main(argv=None):
    config = parse_config(TrainConfig, PRESETS, argv)
    check_config(config)
    config, ckpt_path, checkpoint = start_or_resume(config, "diffusion", "a diffusion one", argv)
    schedule = get_schedule(config.noise_schedule)
    text_to_image = config.dataset in ("coco", "shapes_t2i")
    ddp, rank, world_size, device = setup_distributed(resolve_device(config.device))
    master = rank == 0
    config.device, config.dtype = device, resolve_dtype(config.dtype, device)
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)
    images_per_iter = config.batch_size * grad_accum * world_size
    train_data, val_data = load_data(config, device, master, ddp)

    # model, EMA, optimizer, loss scaler, and the state they continue from on --resume
    model_config = pick_fields(config, UViCConfig)
    if checkpoint is not None:
        trained_on = checkpoint_prediction(checkpoint)
        if trained_on != config.prediction:
            raise SystemExit(f"error: {ckpt_path} was trained with --prediction={trained_on}; "
                             f"resume with the same (got --prediction={config.prediction})")
        trained_on = checkpoint["config"].get("noise_schedule", "vp")
        if trained_on != config.noise_schedule:
            raise SystemExit(f"error: {ckpt_path} was trained with --noise_schedule={trained_on}; "
                             f"resume with the same (got --noise_schedule={config.noise_schedule})")
        model_config = UViCConfig(**checkpoint["model_config"])
        if master:
            print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")
    if master:
        print(f"training a U-ViC on {config.dataset}; config:")
        print_config(config)
        print(f"{world_size} process(es), {grad_accum} micro-batches each, {images_per_iter} images per iteration")
        make_out_dir(config.out_dir, move_aside=config.overwrite)

    use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = UViC(model_config).to(device)
    if config.init_from and checkpoint is None:  # the authors' released weights; the EMA starts from them too
        model.load_state_dict(authors_weights(config.init_from, model_config))
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # float32 always; this is the model that samples
    optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                device.split(":")[0])
    scaler = make_grad_scaler(device, config.dtype)
    ctx = autocast_context(device, config.dtype)
    # batches, flips, t and noise: a generator of our own, checkpointed, so a resumed run draws what the full run would
    gen = torch.Generator(device).manual_seed(config.seed + 1 + rank)
    start_iter, evaluated = 0, None  # evaluated: the last iteration evaluated
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iter = checkpoint["iter"]
        evaluated = start_iter if checkpoint.get("eval_done", True) else None
        set_rng_state(checkpoint["rng"])
        restore_generator_state(gen, checkpoint["data_rng"], rank, world_size, master)
        checkpoint = None  # free the memory
    if master:
        counts = model.num_params()
        print(f"parameters: {counts['total']:,} total; blocks: {' '.join(model_config.block_kinds())}")
    tokens = (model_config.img_size // model_config.patch_size) ** 2 + 1  # the patches and the time token
    slow_run = SlowRun(device, 6 * model.num_params()["total"] * tokens * images_per_iter,
                       f"{images_per_iter} images per step, and each evaluation {config.eval_iters} batches and a "
                       f"{config.grid_size}-image grid of {config.sample_steps} sampler steps", master)
    if config.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device] if device.startswith("cuda") else None)
    shape = (model_config.in_chans, model_config.img_size, model_config.img_size)
    empty_context, decode = None, None  # text-to-image: the empty caption's features; latents -> pixels for grids
    if text_to_image:
        empty_context = demo_caption_features(None, None) if train_data is None else \
            torch.from_numpy(train_data.empty_context.astype("float32")).unsqueeze(0)
        empty_context = empty_context.to(device)
        decode = grid_decoder(config, train_data) if master else None

    def draw_batch(data, generator, p_uncond):
        """(x0, context), context None for an unconditional model."""
        if text_to_image:
            return get_t2i_batch(data, config, config.batch_size, generator, device, empty_context, p_uncond)
        return get_batch(data, config, config.batch_size, generator, device), None

    @torch.no_grad()
    def estimate_val_loss():
        """The EMA model's mean loss on eval_iters held-out batches with the same t and noise at every evaluation
        (text-to-image: always with the caption)."""
        val_gen = torch.Generator(device).manual_seed(config.seed + 100_000)
        losses = []
        for _ in range(config.eval_iters):
            stop.poll()
            x0, context = draw_batch(val_data, val_gen, 0.0)
            with ctx:
                losses.append(diffusion_loss(ema, x0, val_gen, config.prediction, schedule, context).item())
        return sum(losses) / len(losses)

    def draw_t2i_grid(grid_path):
        """The grid's prompts drawn by the EMA model with guidance, captioned. For the shapes, the share of samples
        that match their prompt, with guidance and without."""
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

    def save(it):
        """Every rank's generator state is gathered; the master writes out_dir/ckpt.pt atomically. eval_done: whether
        the evaluation at it is done (if not, a resumed run does it)."""
        data_rng = gather_generator_states(gen, ddp, world_size)
        if master:
            save_checkpoint({"kind": "diffusion", "model": unwrap(model).state_dict(), "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                             "model_config": dataclasses.asdict(model_config), "config": dataclasses.asdict(config),
                             "iter": it, "eval_done": evaluated == it, "rng": rng_state(), "data_rng": data_rng},
                            ckpt_path)

    def evaluate(it):
        """Val loss and a sample grid from the EMA model (the same starting noise every time)."""
        if master:
            val_loss = estimate_val_loss()
            grid_path = os.path.join(config.out_dir, f"samples_{it:06d}.png")
            metrics = {}
            if text_to_image:
                metrics = draw_t2i_grid(grid_path)
            else:
                eps_fn = noise_predictor(ema, ctx, config.prediction, schedule)
                images = generate(lambda x, t: stop.poll() or eps_fn(x, t),  # a stop request ends it within a step
                                  config.grid_size, shape, "dpm" if config.noise_schedule == "vp" else "dpm++",
                                  config.sample_steps, config.seed, device, batch_size=config.grid_size,
                                  schedule=schedule)
                save_grid(images, grid_path)
            note = ""
            if "match" in metrics:
                note = (f"; match their prompt: {metrics['match']:.0%} guided (cfg {config.cfg_scale}), "
                        f"{metrics['match_unguided']:.0%} unguided")
            print(f"eval at iter {it}: val loss (EMA) {val_loss:.4f}; samples in {grid_path}{note}")
            log.write(iter=it, images=it * images_per_iter, val_loss=val_loss, **metrics)

    def plot():
        plot_loss_curve(log.path, os.path.join(config.out_dir, "loss.png"),
                        f"U-ViC (attn={model_config.attn}) on {config.dataset}", log_y=True)

    def stop_and_save(it):
        save(it)
        if master:
            print(f"stopped: saved {ckpt_path} at iteration {it}; continue with --resume")

    log = MetricsLog(config.out_dir, resume_iter=start_iter if config.resume else None) if master else None
    stop = StopRequest(ddp)
    it = start_iter
    t_last, iters_timed = time.time(), 0
    while True:
        lr = learning_rate(it, config.learning_rate, config.warmup_iters, config.max_iters, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen_state = gen.get_state()  # a stop inside this iteration saves the state from its start

        try:
            # evaluate and checkpoint, once per iteration (a resumed run's checkpoint says whether it was done)
            if (it % config.eval_interval == 0 or it >= config.max_iters) and evaluated != it:
                evaluate(it)
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
            for micro in range(grad_accum):
                stop.poll()
                x0, context = draw_batch(train_data, gen, config.p_uncond)
                sync = model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
                with sync:
                    with ctx:
                        loss = diffusion_loss(model, x0, gen, config.prediction, schedule, context)
                    scaler.scale(loss / grad_accum).backward()
                loss_sum += loss.detach()
            loss_value, stop_now = agree_on_step(loss_sum, grad_accum, stop, ddp, world_size)
            check_finite(loss_value, it, ckpt_path)  # before the update: the checkpoint on disk stays the last good one
            optimizer_step(model, optimizer, scaler, config.grad_clip)
            ema_update(ema, unwrap(model), config.ema_decay)
        except StopNow:  # inside the evaluation or the step: nothing of this iteration is kept, --resume redoes it
            gen.set_state(gen_state)
            stop_and_save(it)
            break
        slow_run.first_step(time.time() - t_step, config.max_iters - it - 1)

        iters_timed += 1
        if it % config.log_interval == 0 and master:
            dt = (time.time() - t_last) / iters_timed
            print(f"iter {it}: loss {loss_value:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms/iter, "
                  f"{images_per_iter / dt:,.1f} images/s", flush=True)
            log.write(iter=it, loss=loss_value, lr=lr, ms_per_iter=dt * 1000, images_per_s=images_per_iter / dt)
            t_last, iters_timed = time.time(), 0
        it += 1
        if stop_now:
            stop_and_save(it)
            break
    if master and it >= config.max_iters:
        print(f"done: checkpoint {ckpt_path}, samples, log and loss.png in {config.out_dir}; "
              f"sample with: python sample.py --out_dir={config.out_dir}")


if __name__ == "__main__":
    run_trainer(main)

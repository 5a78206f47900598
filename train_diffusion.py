"""
Train a U-ViC (U-ViT with Cog attention, arXiv 2411.07176) as U-ViT trains its CIFAR-10 model.

    python train_diffusion.py --compile                        # the paper's 44M U-ViC on CIFAR-10, one GPU
    torchrun --standalone --nproc_per_node=4 train_diffusion.py --compile --batch_size=32 --grad_accum=4
    python train_diffusion.py --preset=demo                    # a small U-ViC on coloured shapes, CPU, 6.5-10.5 min
    python train_diffusion.py --preset=demo --attn=softmax     # the U-ViT baseline
    python train_diffusion.py --preset=demo --resume           # continue from out_dir/ckpt.pt, bit for bit

Any field of TrainConfig is a --key=value override. Every eval_interval iterations: a checkpoint, the EMA model's
loss on held-out images (fixed t and noise), and out_dir/samples_XXXXXX.png drawn by the EMA model with DPM-Solver.
Sample and measure FID afterwards with sample.py.
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

from diffusion import (check_prediction, checkpoint_prediction, diffusion_loss, ema_update, generate, load_cifar10,
                       noise_predictor, save_grid)
from model import UViC, UViCConfig, configure_adamw
from train_utils import (Dtype, MetricsLog, SlowRun, StopNow, StopRequest, agree_on_step, autocast_context,
                         check_at_least, check_betas, check_finite, check_out_dir, gather_generator_states,
                         learning_rate, load_checkpoint, make_grad_scaler, make_out_dir, micro_steps_per_process,
                         optimizer_step, parse_config, pick_fields, plot_loss_curve, print_config, require,
                         resolve_device, resolve_dtype, restore_generator_state, rng_state, run_trainer,
                         save_checkpoint, set_rng_state, setup_distributed, unwrap, use_deterministic_algorithms)


@dataclass
class TrainConfig:
    preset: str = "paper"
    dataset: str = "cifar10"  # or "shapes": coloured circles, squares and triangles drawn on the fly (offline)
    data_dir: str = "data/cifar10"  # CIFAR-10 is downloaded here by torchvision on first use
    # model: the names of UViCConfig; the defaults are U-ViT-S/2 (44M parameters)
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 13
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attn: Literal["cog", "softmax"] = "cog"  # softmax: the U-ViT baseline
    prediction: str = "eps"  # what the network predicts: "eps", the noise (U-ViT), or "v" (see diffusion.PREDICTIONS)
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
    resume: bool = False
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
}

# -----------------------------------------------------------------------------
# data: CIFAR-10 in memory on the device, or shapes drawn on the fly

COLORS = torch.tensor([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.10]])
BACKGROUND = 0.1  # dark grey


def shapes_batch(n, size, generator, device):
    """n images (n, 3, size, size) in [-1, 1]: one circle, square or triangle in red, green, blue or yellow,
    centred, of a random size, on a plain background. (Centred because the demo's small U-ViC, given shapes at random
    places as well, still drew ragged blobs after the same training; centred, it draws the shapes.)"""
    kind = torch.randint(3, (n, 1, 1), generator=generator, device=device)
    color = COLORS.to(device)[torch.randint(len(COLORS), (n,), generator=generator, device=device)]  # (n, 3)
    r = size * (0.3 + 0.12 * torch.rand((n, 1, 1), generator=generator, device=device))  # half the width
    offset = torch.arange(size, device=device) + 0.5 - size / 2  # pixel centres from the image centre
    dx, dy = offset.view(1, 1, size), offset.view(1, size, 1)  # broadcast with r: masks are (n, size, size)
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)  # apex up, base 2r wide
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).unsqueeze(1)  # (n, 1, s, s)
    images = torch.where(mask, color.view(n, 3, 1, 1), torch.tensor(BACKGROUND, device=device))
    return images * 2 - 1


def get_batch(data, config, batch_size, generator, device):
    """A batch in [-1, 1]: random CIFAR-10 images (with replacement), flipped left-right half the time; or shapes."""
    if data is None:
        return shapes_batch(batch_size, config.img_size, generator, device)
    ix = torch.randint(len(data), (batch_size,), generator=generator, device=device)
    x = data[ix].float() / 127.5 - 1
    flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def load_data(config, device, master, ddp):
    """(train, val) uint8 image tensors on the device, or (None, None) for the shapes."""
    if config.dataset == "shapes":
        return None, None
    if config.dataset != "cifar10":
        raise SystemExit(f"error: --dataset must be cifar10 or shapes, got {config.dataset!r}")
    if (config.img_size, config.in_chans) != (32, 3):
        raise SystemExit(f"error: CIFAR-10 images are 3x32x32; got img_size={config.img_size}, in_chans={config.in_chans}")
    if ddp and not master:  # the master downloads first, the others then read its files
        dist.barrier()
    train, val = (load_cifar10(config.data_dir, train=split)[0].to(device) for split in (True, False))
    if ddp and master:
        dist.barrier()
    return train, val


def check_config(config):
    """Values that cannot work end the run here, before anything is downloaded or written."""
    try:
        check_prediction(config.prediction)
    except ValueError as err:
        raise SystemExit(f"error: --{err}") from None
    check_at_least(config, 1, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "batch_size",
                   "grad_accum", "eval_interval", "eval_iters", "grid_size", "sample_steps", "log_interval")
    check_at_least(config, 0, "mlp_ratio", "max_iters", "learning_rate", "warmup_iters", "min_lr", "weight_decay",
                   "grad_clip")
    check_betas(config)
    require(0 <= config.ema_decay <= 1, f"--ema_decay={config.ema_decay}: must be in [0, 1]")
    require(config.dataset != "shapes" or config.in_chans == 3,
            f"--in_chans={config.in_chans}: the shapes are RGB images, in_chans must be 3")
    check_out_dir(config.out_dir)
    pick_fields(config, UViCConfig)  # the model's own checks: patches tile the image, ...
    resolve_dtype(config.dtype, "cpu")


def main(argv=None):
    config = parse_config(TrainConfig, PRESETS, argv)
    check_config(config)
    ddp, rank, world_size, device = setup_distributed(resolve_device(config.device))
    master = rank == 0
    config.device, config.dtype = device, resolve_dtype(config.dtype, device)
    grad_accum = micro_steps_per_process(config.grad_accum, world_size)
    images_per_iter = config.batch_size * grad_accum * world_size
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    train_data, val_data = load_data(config, device, master, ddp)

    # model, EMA, optimizer, loss scaler, and the state they continue from on --resume
    checkpoint = load_checkpoint(ckpt_path) if config.resume else None
    model_config = pick_fields(config, UViCConfig)
    if checkpoint is not None:
        if checkpoint.get("kind") != "diffusion":
            raise SystemExit(f"error: {ckpt_path} is a {checkpoint.get('kind')!r} checkpoint, not a diffusion one")
        trained_on = checkpoint_prediction(checkpoint)
        if trained_on != config.prediction:
            raise SystemExit(f"error: {ckpt_path} was trained with --prediction={trained_on}; "
                             f"resume with the same (got --prediction={config.prediction})")
        if dataclasses.asdict(model_config) != checkpoint["model_config"] and master:
            print("note: resuming with the checkpoint's model config, not the command line's")
        model_config = UViCConfig(**checkpoint["model_config"])
        if master:
            print(f"resuming from {ckpt_path} at iteration {checkpoint['iter']}")
    if master:
        print(f"training a U-ViC on {config.dataset}; config:")
        print_config(config)
        print(f"{world_size} process(es), {grad_accum} micro-batches each, {images_per_iter} images per iteration")
        make_out_dir(config.out_dir)

    use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = UViC(model_config).to(device)
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

    @torch.no_grad()
    def estimate_val_loss():
        """The EMA model's mean loss on eval_iters held-out batches with the same t and noise at every evaluation."""
        val_gen = torch.Generator(device).manual_seed(config.seed + 100_000)
        losses = []
        for _ in range(config.eval_iters):
            stop.poll()
            x0 = get_batch(val_data, config, config.batch_size, val_gen, device)
            with ctx:
                losses.append(diffusion_loss(ema, x0, val_gen, config.prediction).item())
        return sum(losses) / len(losses)

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
            eps_fn = noise_predictor(ema, ctx, config.prediction)
            images = generate(lambda x, t: stop.poll() or eps_fn(x, t),  # a stop request ends it within a step
                              config.grid_size, shape, "dpm", config.sample_steps, config.seed, device,
                              batch_size=config.grid_size)
            grid_path = os.path.join(config.out_dir, f"samples_{it:06d}.png")
            save_grid(images, grid_path)
            print(f"eval at iter {it}: val loss (EMA) {val_loss:.4f}; samples in {grid_path}")
            log.write(iter=it, images=it * images_per_iter, val_loss=val_loss)

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
                x0 = get_batch(train_data, config, config.batch_size, gen, device)
                sync = model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
                with sync:
                    with ctx:
                        loss = diffusion_loss(model, x0, gen, config.prediction)
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

"""
Sample from a trained checkpoint: text from an LM (train_lm.py), images from a diffusion model (train_diffusion.py).

    python sample.py --out_dir=out/demo_lm --start="def " --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out/lm --start=FILE:prompt.txt --temperature=0.8 --top_k=200
    python sample.py --init_from=cog_ckpt_100.00_Bi.pt --tokenizer_path=llama-2-tokenizer/ --start="The meaning of"
    python sample.py --out_dir=out/demo_t2i --prompt="a yellow square" --prompt="a green circle"
    python sample.py --out_dir=out/coco --prompts=captions.txt --cfg_scale=1
    python sample.py --init_from=cog_nnet_ema.pth --prompt="a red bus on a street"   # the authors' U-ViC
    python sample.py --out_dir=out/coco --fid --num_samples=30000                      # the paper's FID protocol

The checkpoint's "kind" picks the branch, and the checkpoint says how to sample it: the network, an LM's tokenizer,
a diffusion model's noise schedule (the VP-SDE, or the discrete "sd" one, which only DPM-Solver++ follows) and what its
network predicts. A flag that contradicts the checkpoint is an error that names the key. A text-to-image model draws
one image per prompt with DPM-Solver++. --init_from=FILE reads a released checkpoint instead, told apart by its
content: the authors' LM format (a dict with model_cfg and model: authors.load_cogformer, Llama-2 tokenizer, the prompt
after BOS as in their evaluation) or a U-ViT / U-ViC text-to-image state dict (nnet_ema.pth: authors.load_uvic). Flags
for another kind of model than the one sampled are errors.
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from checkpoint import fresh_path, load_checkpoint
from cli import check_at_least, cli_keys, option, parse_config, require, run_script
from logs import progress
from training import Dtype, autocast_context, resolve_device, resolve_dtype, set_cpu_threads


@dataclass
class SampleConfig:
    out_dir: str = option("out/lm", "the folder holding ckpt.pt (train_lm.py's default run folder)",
                          section="shared by all kinds")
    init_from: str = option("", "a released checkpoint instead of out_dir's: the authors' LM or MS-COCO U-ViC / U-ViT")
    num_samples: Optional[int] = option(None, "none: 3 texts, or a grid of 64 images")
    seed: int = 1337
    device: str = "auto"
    dtype: Dtype = "auto"
    start: str = option("\n", "the prompt, or FILE:path to read it from a file", section="language models")
    max_new_tokens: int = 300
    temperature: float = option(0.8, "< 1 sharper, > 1 more random, 0 greedy")
    top_k: Optional[int] = option(200, "keep only the k most likely tokens; none: all")
    tokenizer: str = option("", "the checkpoint's (another is an error); with --init_from: llama2, or gpt2, bytes")
    tokenizer_path: str = option("", 'llama2: a folder, hub id or tokenizer.model file; "": meta-llama/Llama-2-7b-hf')
    sampler: str = option("", "dpm (DPM-Solver-2), em (Euler-Maruyama, the FID protocol), dpm++; \"\": the schedule's",
                          section="diffusion models")
    steps: int = option(0, "0: the sampler's default, 50 for dpm and dpm++, 1000 for em")
    output: str = option("", 'the grid PNG; "": out_dir/samples_<sampler><steps>.png (dpm++ as dpmpp)')
    use_ema: bool = option(True, "the EMA weights (as the paper samples) or the raw ones")
    batch_size: int = option(500, "images sampled at once")
    fid: bool = option(False, "also measure FID against CIFAR-10's training set (pytorch-fid's Inception features)")
    data_dir: str = option("data/cifar10", "CIFAR-10 and its cached FID statistics, for --fid")
    prompt: str = option("", "a caption to draw; repeat --prompt=... for several", section="text-to-image models "
                         "(MS-COCO, the shapes demo): DPM-Solver++ with classifier-free guidance")
    prompts: str = option("", "a text file with one caption per line")
    cfg_scale: float = option(1.0, "guidance: cond + cfg_scale * (cond - uncond); 0: none; the paper's FID uses 1")
    attn: str = option("", '--init_from only: cog or softmax; "": read from the file\'s path (cog_nnet_ema.pth is Cog)')
    vae: str = option("", 'MS-COCO: the autoencoder that decodes; "": the one the features were prepared with, '
                      "or SD v1's")
    text_encoder: str = option("", 'MS-COCO: the CLIP text encoder of --prompt; "": likewise, or CLIP ViT-L/14')
    fid_stats: str = option("", "MS-COCO --fid: an .npz with val2014's mu and sigma (U-ViT's file); \"\": "
                            "computed, cached")


def sample_text(model, tokenizer_name, config):
    """Print num_samples continuations of the prompt, generated with the model's KV cache."""
    from data.prepare_lm import Tokenizer
    model.eval().to(config.device)
    set_cpu_threads(config.device, model, 1)  # one token at a time
    tokenizer = Tokenizer(tokenizer_name, config.tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: the {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}: --tokenizer names the wrong one")
    start = prompt(config.start)
    if tokenizer.bos is not None:  # Llama-2: a document (and the authors' evaluation) starts with BOS
        ids = [tokenizer.bos] + tokenizer.encode(start)
    else:
        ids = tokenizer.encode(start) or [tokenizer.eot]  # an empty prompt starts a new document
    x = torch.tensor(ids, dtype=torch.long, device=config.device)[None, :]
    with torch.no_grad(), autocast_context(config.device, config.dtype):
        for _ in range(config.num_samples or 3):
            y = model.generate(x, config.max_new_tokens, temperature=config.temperature, top_k=config.top_k)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


def prompt(start):
    """The prompt: --start's text, or the file it names as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: --start={start}: cannot read the prompt file ({err})") from None


def check_config(config, given):
    """Bad values and unreadable files end the run before the checkpoint is even loaded."""
    check_at_least(config, 1, "num_samples", "top_k", "batch_size")
    check_at_least(config, 0, "max_new_tokens", "temperature", "steps")
    require(config.sampler in ("",) + SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got "
            f"{config.sampler!r}")
    require(not config.attn or config.init_from, f"--attn={config.attn}: for --init_from only (a checkpoint of "
            "train_diffusion.py says what attention it has)")
    if "start" in given:
        prompt(config.start)
    if config.output:
        folder = os.path.dirname(config.output) or "."
        require(os.path.isdir(folder), f"--output={config.output}: there is no folder {folder}")
        require(config.output.lower().endswith(".png"), f"--output={config.output}: the grid is a PNG: name it .png")


# which flags are for which kinds of model: {what they are for: (the kinds, the flags)}; the rest are for every kind
SHARED_FLAGS = ("out_dir", "init_from", "num_samples", "seed", "device", "dtype")
FLAG_KINDS = {
    "language models": (("lm",), ("start", "max_new_tokens", "temperature", "top_k", "tokenizer", "tokenizer_path")),
    "diffusion models": (("diffusion", "text-to-image"),
                         ("sampler", "steps", "output", "use_ema", "batch_size", "fid", "data_dir")),
    "text-to-image models": (("text-to-image",), ("prompt", "prompts", "cfg_scale", "attn", "vae", "text_encoder",
                                                  "fid_stats")),
}


def flags_for_other_kinds(given, kind):
    """{flag: the kinds of model it is for} for the given flags that do not apply to this kind."""
    return {k: purpose for k in sorted(given) for purpose, (kinds, flags) in FLAG_KINDS.items()
            if k in flags and kind not in kinds}


def refuse_contradiction(given, config, key, value, source):
    """The checkpoint says how to sample it: a flag that says otherwise is an error, not an override."""
    require(key not in given or getattr(config, key) == value,
            f"--{key}={getattr(config, key)}: {source} says {key}={value}; leave --{key} out")


def refuse_flags_of_other_kinds(given, kind, path):
    wrong = flags_for_other_kinds(given, kind)
    name = {"lm": "a language model's", "diffusion": "a diffusion model's", "text-to-image": "a text-to-image model's"}
    require(not wrong, f"{', '.join('--' + k for k in wrong)}: for {' and '.join(sorted(set(wrong.values())))} only, "
            f"and {path} is {name[kind]} checkpoint")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    prompts = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--prompt=")]  # --prompt may repeat
    config = parse_config(SampleConfig, None, argv)
    given = cli_keys(argv)
    check_config(config, given)
    config.device = resolve_device(config.device)
    config.dtype = resolve_dtype(config.dtype, config.device)
    torch.manual_seed(config.seed)
    if config.init_from:
        return sample_released(config, given, prompts)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    # on the CPU and mapped from the file: the optimizer state it also holds is never read, and the model goes to the
    # device once built
    checkpoint = load_checkpoint(ckpt_path, map_location="cpu", mmap=True)
    kind = checkpoint.get("kind")
    require(kind in ("lm", "diffusion"), f"{ckpt_path} is not a checkpoint of train_lm.py or train_diffusion.py "
            f"(kind {kind!r})")
    if kind == "diffusion" and checkpoint.get("model_config", {}).get("num_clip_token", 0):
        kind = "text-to-image"
    refuse_flags_of_other_kinds(given, kind, ckpt_path)
    if kind == "lm":
        from model import Cogformer, CogformerConfig
        model = Cogformer(CogformerConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        refuse_contradiction(given, config, "tokenizer", checkpoint["meta"]["tokenizer"], ckpt_path)
        sample_text(model, checkpoint["meta"]["tokenizer"], config)
    elif kind == "text-to-image":
        from model import UViC, UViCConfig
        model = UViC(UViCConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["ema" if config.use_ema else "model"])
        return sample_text_to_image(model, checkpoint["config"], config, given, prompts)
    else:
        return sample_images(checkpoint, config, given, ckpt_path)


def sample_released(config, given, prompts):
    """Sample from a released checkpoint file, recognised by its content (loaded without running code from it)."""
    from authors import is_authors_lm, load_cogformer, load_uvic, load_weights_file
    try:
        content = load_weights_file(config.init_from)
        if is_authors_lm(content):  # the authors' Cogformer / Transformer LM
            refuse_flags_of_other_kinds(given, "lm", config.init_from)
            # their files name no tokenizer: Llama-2's is the recipe, and --tokenizer may name another
            return sample_text(load_cogformer(content), config.tokenizer or "llama2", config)
        if isinstance(content, dict) and "patch_embed.proj.weight" in content:  # U-ViT's text-to-image network
            refuse_flags_of_other_kinds(given, "text-to-image", config.init_from)
            return sample_text_to_image(load_uvic(config.init_from, attn=config.attn or None),
                                        AUTHORS_T2I_RECIPE, config, given, prompts)
    except ValueError as err:
        raise SystemExit(f"error: --init_from: {err}") from None
    raise SystemExit(f"error: --init_from={config.init_from} is not one of the authors' files that sample.py knows: "
                     "their LM checkpoints hold 'model_cfg' and 'model'; their U-ViT / U-ViC state dicts (nnet_ema.pth) "
                     "hold 'patch_embed.proj.weight'")


# -----------------------------------------------------------------------------
# diffusion


SAMPLERS = ("dpm", "em", "dpm++")
SAMPLERS_OF_SCHEDULE = {"vp": SAMPLERS, "sd": ("dpm++",)}  # em and dpm integrate the VP-SDE; the first is the default
DEFAULT_STEPS = {"dpm": 50, "em": 1000, "dpm++": 50}


def pick_sampler(config, allowed, why):
    """(sampler, steps): --sampler, or the first of the samplers allowed for the model; another one is an error."""
    sampler = config.sampler or allowed[0]
    require(sampler in allowed, f"--sampler={sampler}: {why}; use {' or '.join(allowed)}")
    return sampler, config.steps or DEFAULT_STEPS[sampler]


def sample_images(checkpoint, config, given, ckpt_path):
    """Write a grid of num_samples images (at most 256 shown) drawn by the checkpoint's EMA model, on the noise
    schedule and with the prediction it was trained with; with --fid, also the FID of all of them against CIFAR-10's
    training set (the paper: --num_samples=50000 --sampler=em)."""
    import diffusion
    from model import UViC, UViCConfig
    model_config = UViCConfig(**checkpoint["model_config"])
    model = UViC(model_config)
    model.load_state_dict(checkpoint["ema" if config.use_ema else "model"])
    model.eval().to(config.device)
    num_samples = config.num_samples or 64
    set_cpu_threads(config.device, model, min(num_samples, config.batch_size) * model.pos_embed.shape[1])
    schedule_name = diffusion.checkpoint_schedule(checkpoint)
    sampler, steps = pick_sampler(config, SAMPLERS_OF_SCHEDULE[schedule_name],
                                  f"{ckpt_path} was trained with noise_schedule={schedule_name}")
    if config.fid:  # fail before sampling, not after: the Inception weights and the reference statistics
        if checkpoint["config"]["dataset"] != "cifar10":
            raise SystemExit(f"error: --fid compares with CIFAR-10; this model was trained on "
                             f"{checkpoint['config']['dataset']}")
        inception = diffusion.load_inception(config.device)
        ref_mu, ref_sigma = diffusion.cifar10_train_stats(config.data_dir, inception, config.device)
    weights = "EMA" if config.use_ema else "raw"
    prediction, schedule = diffusion.checkpoint_prediction(checkpoint), diffusion.get_schedule(schedule_name)
    print(f"sampling {num_samples} images from the {weights} weights at iteration {checkpoint['iter']}: "
          f"{sampler}, {steps} steps, seed {config.seed} ({schedule_name} schedule, {prediction}-prediction)")
    eps_fn = diffusion.noise_predictor(model, autocast_context(config.device, config.dtype), prediction, schedule)
    shape = (model_config.in_chans, model_config.img_size, model_config.img_size)
    images = diffusion.generate(eps_fn, num_samples, shape, sampler, steps, config.seed, config.device,
                                config.batch_size, progress=True, schedule=schedule)
    name = f"samples_{sampler.replace('+', 'p')}{steps}.png"
    output = fresh_path(config.output or os.path.join(config.out_dir, name))  # (an earlier grid stays)
    diffusion.save_grid(images[:256], output)
    print(f"wrote {output}")
    if checkpoint["config"].get("dataset") == "shapes":  # the shapes demo, scored by code: how shape-like is each?
        from data.shapes import score_shapes
        no_prompt = torch.zeros(len(images), dtype=torch.long)
        iou = score_shapes(images.clamp(-1, 1).cpu(), no_prompt, no_prompt)[1]  # (the best shape whatever its kind)
        print(f"mean IoU of each sample with its best-fitting shape {iou.mean().item():.3f}; "
              f"{(iou > 0.9).float().mean().item():.0%} of samples above 0.9")
    if config.fid:
        features = diffusion.inception_features(inception, diffusion.to_uint8(images), config.device)
        fid = diffusion.frechet_distance(*diffusion.feature_stats(features), ref_mu, ref_sigma)
        print(f"FID {fid:.2f}: {num_samples} samples ({sampler}, {steps} steps) against CIFAR-10 train")
        return fid


# -----------------------------------------------------------------------------
# text-to-image

# how the authors' MS-COCO networks were trained (U-ViT's recipe), for --init_from
AUTHORS_T2I_RECIPE = {"dataset": "coco", "noise_schedule": "sd", "prediction": "eps", "latent_scale": 0.23010,
                      "data_dir": "data/coco"}


def read_prompts(config, prompts):
    """The --prompt values and the lines of the --prompts file, cycled (or cut) to --num_samples."""
    if config.prompts:
        try:
            with open(config.prompts, encoding="utf-8") as f:
                prompts = prompts + [line.strip() for line in f if line.strip()]
        except OSError as err:
            raise SystemExit(f"error: --prompts={config.prompts}: {err}") from None
    return [prompts[i % len(prompts)] for i in range(config.num_samples or len(prompts))] if prompts else []


def coco_pieces(recipe, config, data_dir, prompts):
    """MS-COCO: (texts, a function (start, n) -> their CLIP features, the empty caption's features, a latent decoder).
    --fid draws for the prepared val captions (with their stored features); otherwise for the prompts, through CLIP."""
    from data.prepare_coco import (DEFAULT_TEXT_ENCODER, DEFAULT_VAE, CocoFeatures, decode_latents, encode_captions,
                                   load_prepared_vae, load_text_encoder, load_vae, read_meta)
    prepared = os.path.exists(os.path.join(data_dir, "meta.json"))
    if config.fid:
        val = CocoFeatures(data_dir, "val")
        ids = val.sample_caption_ids(0, config.num_samples or 30_000)
        texts, empty = val.caption_texts(ids), torch.from_numpy(val.empty_context.astype("float32"))

        def features(start, n):
            return val.caption_features(ids[start:start + n])
    else:
        if not prompts:
            raise SystemExit("error: give what to draw: --prompt=\"a red bus on a street\" (repeatable) or "
                             "--prompts=FILE, or --fid for MS-COCO val captions")
        name = config.text_encoder or (read_meta(data_dir)["text_encoder"] if prepared else DEFAULT_TEXT_ENCODER)
        text_encoder, _ = load_text_encoder(name, config.device)
        texts, empty = prompts, encode_captions(text_encoder, [""], config.device)[0]

        def features(start, n):
            return encode_captions(text_encoder, texts[start:start + n], config.device)
    if prepared:
        vae = load_prepared_vae(read_meta(data_dir), config.device, config.vae or None)
    else:
        vae, _ = load_vae(config.vae or DEFAULT_VAE, config.device)
    return texts, features, empty, lambda z: decode_latents(vae, z, recipe["latent_scale"])


def sample_text_to_image(model, recipe, config, given, prompts):
    """One image per prompt (cycled to --num_samples), drawn with DPM-Solver++ and classifier-free guidance and
    decoded to pixels, as a captioned grid (at most 64 shown). The shapes demo also scores whether each sample shows
    its prompt's colour and shape. MS-COCO --fid: FID of num_samples images drawn for val captions against val2014
    (data_dir: the prepare_coco.py folder; left at its default, the training run's or data/coco)."""
    import diffusion
    from data.shapes import DEMO_PROMPTS, demo_caption_features, demo_prompt_features, parse_demo_prompt
    model.eval().to(config.device)
    schedule = diffusion.get_schedule(recipe.get("noise_schedule", "vp"))
    data_dir = config.data_dir if "data_dir" in given else recipe["data_dir"]
    demo = recipe["dataset"] == "shapes_t2i"
    if config.fid and demo:
        raise SystemExit("error: --fid compares with MS-COCO val2014; this model draws the shapes demo")
    _, steps = pick_sampler(config, ("dpm++",), "text-to-image models sample with guided DPM-Solver++")
    if demo:  # without prompts: every prompt of the demo, four times
        texts = read_prompts(config, prompts if prompts or config.prompts else DEMO_PROMPTS * 4)

        def features(start, n):
            return demo_prompt_features(texts[start:start + n])
        empty, decode = demo_caption_features(None, None)[0], lambda x: x.clamp(-1, 1)
    else:
        texts, features, empty, decode = coco_pieces(recipe, config, data_dir, read_prompts(config, prompts))
    if config.fid:  # fail before sampling, not after: the Inception weights and the reference statistics
        from data.prepare_coco import read_fid_stats, val_fid_stats
        inception = diffusion.load_inception(config.device)
        ref_mu, ref_sigma = read_fid_stats(config.fid_stats) if config.fid_stats else \
            val_fid_stats(data_dir, inception, config.device)
    n, size = len(texts), model.config.img_size
    set_cpu_threads(config.device, model, 2 * min(n, config.batch_size) * model.pos_embed.shape[1])  # (guided: 2x)
    print(f"drawing {n} images for {len(set(texts))} captions: DPM-Solver++, {steps} steps, guidance scale "
          f"{config.cfg_scale}, seed {config.seed}")
    batches = (features(start, min(config.batch_size, n - start)) for start in range(0, n, config.batch_size))
    samples = diffusion.generate_guided(model, batches, empty.unsqueeze(0), config.cfg_scale,
                                        (model.config.in_chans, size, size), steps, config.seed, config.device,
                                        schedule, recipe.get("prediction", "eps"),
                                        autocast_context(config.device, config.dtype), progress=n <= config.batch_size)
    kept, fid_features = [], []  # with --fid, only the first 64 images are kept (for the grid)
    for x in progress(samples, total=-(-n // config.batch_size), desc="batches", disable=n <= config.batch_size):
        images = decode(x).cpu()
        if not config.fid or sum(map(len, kept)) < 64:
            kept.append(images)
        if config.fid:
            fid_features.append(diffusion.inception_features(inception, diffusion.to_uint8(images), config.device))
    images = torch.cat(kept)
    folder = "." if config.init_from else config.out_dir
    output = fresh_path(config.output or os.path.join(folder, f"samples_t2i_cfg{config.cfg_scale:g}.png"))
    diffusion.save_captioned_grid(images[:64], texts[:64], output)
    print(f"wrote {output}")
    if demo:  # scored by code: the colour and shape of each sample against its prompt
        from data.shapes import score_shapes
        kind, color = (torch.tensor(v) for v in zip(*map(parse_demo_prompt, texts)))
        matches, iou = score_shapes(images, kind, color)
        print(f"{int(matches.sum())} of {n} samples ({matches.float().mean().item():.1%}) match their prompt's colour "
              f"and shape; mean IoU with the best-fitting shape {iou.mean().item():.3f}")
        return matches.float().mean().item()
    if config.fid:
        import numpy as np
        fid = diffusion.frechet_distance(*diffusion.feature_stats(np.concatenate(fid_features)), ref_mu, ref_sigma)
        print(f"FID {fid:.2f}: {n} samples (DPM-Solver++, {steps} steps, guidance {config.cfg_scale}) against "
              "MS-COCO val2014")
        return fid

if __name__ == "__main__":
    run_script(main)

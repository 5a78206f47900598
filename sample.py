"""
Sample from a trained checkpoint: text from an LM (train_lm.py), images from a diffusion model (train_diffusion.py).

    python sample.py --out_dir=out/demo_lm --start="def " --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out/lm --start=FILE:prompt.txt --temperature=0.8 --top_k=200
    python sample.py --init_from=cog_ckpt_100.00_Bi.pt --tokenizer_path=llama-2-tokenizer/ --start="The meaning of"

The checkpoint's "kind" picks the branch; an LM checkpoint carries its tokenizer in its dataset metadata.
--init_from=FILE reads a released checkpoint instead, told apart by its content: the authors' LM format (a dict with
model_cfg and model: Cogformer.from_authors, Llama-2 tokenizer, the prompt after BOS as in their evaluation).
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from train_utils import (Dtype, autocast_context, check_at_least, cli_keys, field_docs, load_checkpoint, parse_config,
                         require, resolve_device, resolve_dtype, run_script)


@dataclass
class SampleConfig:
    # shared by both kinds
    out_dir: str = "out/demo_lm"  # the folder holding ckpt.pt
    init_from: str = ""  # a released checkpoint file instead (the authors' LM format); out_dir is then not read
    num_samples: Optional[int] = None  # none: 3 texts, or a grid of 64 images
    seed: int = 1337
    device: str = "auto"
    dtype: Dtype = "auto"
    # language models
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    max_new_tokens: int = 300
    temperature: float = 0.8  # < 1 sharper, > 1 more random, 0 greedy
    top_k: Optional[int] = 200  # keep only the k most likely tokens; none: all
    tokenizer: str = ""  # "": the checkpoint's (llama2 for the authors' models); or gpt2, bytes, llama2
    tokenizer_path: str = ""  # llama2: a folder, hub id or tokenizer.model file; "": meta-llama/Llama-2-7b-hf
    # diffusion models
    sampler: str = "dpm"  # "dpm": DPM-Solver-2, fast; "em": Euler-Maruyama on the reverse SDE (the FID protocol)
    steps: int = 0  # 0: the sampler's default, 50 for dpm and 1000 for em
    output: str = ""  # the grid PNG; "": out_dir/samples_<sampler><steps>.png
    use_ema: bool = True  # the EMA weights (as the paper samples) or the raw ones
    batch_size: int = 500  # images sampled at once
    fid: bool = False  # also measure FID against CIFAR-10's training set (pytorch-fid's Inception features)
    data_dir: str = "data/cifar10"  # CIFAR-10 and its cached FID statistics, for --fid


def sample_text(model, tokenizer_name, config):
    """Print num_samples continuations of the prompt, generated with the model's KV cache."""
    from data.prepare_lm import Tokenizer
    model.eval().to(config.device)
    tokenizer = Tokenizer(config.tokenizer or tokenizer_name, config.tokenizer_path)
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
    if "start" in given:
        prompt(config.start)
    if config.output:
        folder = os.path.dirname(config.output) or "."
        require(os.path.isdir(folder), f"--output={config.output}: there is no folder {folder}")
        require(config.output.lower().endswith(".png"), f"--output={config.output}: the grid is a PNG: name it .png")


def flags_for_the_other_kind(given, kind):
    """The given flags that apply only to the other kind of checkpoint: the ones under SampleConfig's "language
    models" or "diffusion models" heading."""
    other = "diffusion models" if kind == "lm" else "language models"
    return sorted(k for k in given if field_docs(SampleConfig).get(k, ("", ""))[0].startswith(other))


def refuse_flags_of_the_other_kind(given, kind, path):
    wrong = flags_for_the_other_kind(given, kind)
    require(not wrong, f"{', '.join('--' + k for k in wrong)}: for {'diffusion' if kind == 'lm' else 'language'} "
            f"models only, and {path} is a {'language' if kind == 'lm' else 'diffusion'} model's checkpoint")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = parse_config(SampleConfig, None, argv)
    given = cli_keys(argv)
    check_config(config, given)
    config.device = resolve_device(config.device)
    config.dtype = resolve_dtype(config.dtype, config.device)
    torch.manual_seed(config.seed)
    if config.init_from:
        return sample_released(config, given)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path, map_location=config.device)
    kind = checkpoint.get("kind")
    require(kind in ("lm", "diffusion"), f"{ckpt_path} is not a checkpoint of train_lm.py or train_diffusion.py "
            f"(kind {kind!r})")
    refuse_flags_of_the_other_kind(given, kind, ckpt_path)
    if kind == "lm":
        from model import Cogformer, CogformerConfig
        model = Cogformer(CogformerConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        sample_text(model, checkpoint["meta"]["tokenizer"], config)
    else:
        return sample_images(checkpoint, config)


def sample_released(config, given):
    """Sample from a released checkpoint file, recognised by its content (loaded without running code from it)."""
    from model import Cogformer, is_authors_lm, load_weights_file
    try:
        checkpoint = load_weights_file(config.init_from)
        if is_authors_lm(checkpoint):  # the authors' Cogformer / Transformer LM
            refuse_flags_of_the_other_kind(given, "lm", config.init_from)
            return sample_text(Cogformer.from_authors(checkpoint), "llama2", config)
    except ValueError as err:
        raise SystemExit(f"error: --init_from={config.init_from}: {err}") from None
    raise SystemExit(f"error: --init_from={config.init_from}: not a released format sample.py knows "
                     "(the authors' LM checkpoints hold 'model_cfg' and 'model')")


# -----------------------------------------------------------------------------
# diffusion


def sample_images(checkpoint, config):
    """Write a grid of num_samples images (at most 256 shown) drawn by the checkpoint's EMA model; with --fid,
    also the FID of all of them against CIFAR-10's training set (the paper: --num_samples=50000 --sampler=em)."""
    import diffusion
    from model import UViC, UViCConfig
    model_config = UViCConfig(**checkpoint["model_config"])
    model = UViC(model_config)
    model.load_state_dict(checkpoint["ema" if config.use_ema else "model"])
    model.eval().to(config.device)
    num_samples = config.num_samples or 64
    if config.sampler not in ("em", "dpm"):
        raise SystemExit(f"error: --sampler must be em or dpm, got {config.sampler!r}")
    steps = config.steps or {"em": 1000, "dpm": 50}[config.sampler]
    if config.fid:  # fail before sampling, not after: the Inception weights and the reference statistics
        if checkpoint["config"]["dataset"] != "cifar10":
            raise SystemExit(f"error: --fid compares with CIFAR-10; this model was trained on "
                             f"{checkpoint['config']['dataset']}")
        inception = diffusion.load_inception(config.device)
        ref_mu, ref_sigma = diffusion.cifar10_train_stats(config.data_dir, inception, config.device)
    weights = "EMA" if config.use_ema else "raw"
    print(f"sampling {num_samples} images from the {weights} weights at iteration {checkpoint['iter']}: "
          f"{config.sampler}, {steps} steps, seed {config.seed}")
    eps_fn = diffusion.noise_predictor(model, autocast_context(config.device, config.dtype),
                                       diffusion.checkpoint_prediction(checkpoint))
    shape = (model_config.in_chans, model_config.img_size, model_config.img_size)
    images = diffusion.generate(eps_fn, num_samples, shape, config.sampler, steps, config.seed, config.device,
                                config.batch_size, progress=True)
    output = config.output or os.path.join(config.out_dir, f"samples_{config.sampler}{steps}.png")
    diffusion.save_grid(images[:256], output)
    print(f"wrote {output}")
    if config.fid:
        features = diffusion.inception_features(inception, diffusion.to_uint8(images), config.device)
        fid = diffusion.frechet_distance(*diffusion.feature_stats(features), ref_mu, ref_sigma)
        print(f"FID {fid:.2f}: {num_samples} samples ({config.sampler}, {steps} steps) against CIFAR-10 train")
        return fid


if __name__ == "__main__":
    run_script(main)

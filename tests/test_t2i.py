"""
Tests of the text-to-image path: the conditional U-ViC (parameter count, context tokens), classifier-free guidance,
the discrete schedule, DPM-Solver++, MS-COCO preparation -> training -> sampling -> FID on a tiny MS-COCO-shaped folder
with tiny random autoencoder and CLIP models, the authors' checkpoint layout, the shapes demo with captions, and the
errors for missing or broken inputs. Run with `python -m pytest -q tests/test_t2i.py`.
"""

import json
import shutil
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion
import sample
import train_diffusion
from authors import load_uvic
from checkpoint import load_checkpoint
from data import prepare_coco
from data import shapes as demo_shapes
from diffusion import SD, generate_guided, noise_predictor, sample_dpm_pp
from logs import read_log
from model import UViC, UViCConfig
from test_diffusion import fake_inception

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_T2I = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=3, num_heads=2, num_clip_token=5,
                clip_dim=12)

# -----------------------------------------------------------------------------
# the network


def test_coco_network_has_the_papers_parameter_count():
    """U-ViT-S/2 for MS-COCO as the authors count it (4x32x32 latents, 77 CLIP tokens); the CIFAR model unchanged."""
    for attn in ("cog", "softmax"):
        model = UViC(UViCConfig(img_size=32, in_chans=4, num_clip_token=77, clip_dim=768, attn=attn))
        assert model.num_params()["total"] == 44_692_644
        assert model.pos_embed.shape == (1, 1 + 77 + 256, 512) and model.context_embed.weight.shape == (512, 768)
    assert UViC(UViCConfig()).context_embed is None


def test_the_caption_conditions_the_output():
    torch.manual_seed(0)
    model = UViC(UViCConfig(**TINY_T2I)).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5.0, 500.0, 900.0])
    a, b = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    out = model(x, t, a)
    assert out.shape == (3, 4, 8, 8)
    assert torch.equal(out, model(x, t, a))
    assert (out - model(x, t, b)).abs().amax((1, 2, 3)).min() > 1e-4  # every sample moves with its caption
    changed = a.clone()
    changed[1] += 1  # one caption changed: only its own sample changes
    out2 = model(x, t, changed)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2]) and not torch.allclose(out2[1], out[1])
    with pytest.raises(ValueError, match="needs context"):
        model(x, t)
    with pytest.raises(ValueError, match="takes no context"):
        UViC(UViCConfig(img_size=8, embed_dim=32, depth=3, num_heads=2))(torch.randn(1, 3, 8, 8), t[:1], a[:1])


def test_classifier_free_guidance_formula():
    """guided = cond + s * (cond - uncond); s = 0 is the plain conditional model (one batch, no empty caption)."""
    calls = []

    def fake(x, timesteps, context):  # "cond" and "uncond" are the first feature of each caption
        calls.append(len(x))
        return x * 0 + context[:, 0, 0].view(-1, 1, 1, 1)
    x = torch.zeros(2, 1, 2, 2)
    context, empty = torch.full((2, 3, 4), 2.0), torch.full((1, 3, 4), 0.5)
    for scale in (0.0, 1.0, 3.0):
        eps = noise_predictor(fake, schedule=SD, context=context, empty_context=empty, cfg_scale=scale)(x, 0.5)
        torch.testing.assert_close(eps, torch.full_like(x, 2.0 + scale * (2.0 - 0.5)))
    assert calls == [2, 4, 4]  # cond and uncond go through the network as one batch
    # with v-prediction the guidance is applied to v and the guided v converted to the noise (a linear map)
    alpha, sigma = (a.item() for a in SD.alpha_sigma(torch.tensor(0.5, dtype=torch.float64)))
    eps = noise_predictor(fake, prediction="v", schedule=SD, context=context, empty_context=empty, cfg_scale=1.0)
    torch.testing.assert_close(eps(x + 1, 0.5), sigma * (x + 1) + alpha * 3.5)


# -----------------------------------------------------------------------------
# the discrete schedule and DPM-Solver++


def test_discrete_schedule_matches_its_closed_form():
    betas = SD.betas.numpy()
    assert len(betas) == 1000 and betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, rtol=1e-9)
    abar = np.cumprod(1 - betas)  # prod_{i <= n} (1 - beta_i)
    assert abar[-1] == pytest.approx(0.00466, abs=2e-5)  # Stable Diffusion's final alphas_cumprod
    n = np.array([1, 2, 10, 500, 999, 1000])
    alpha, sigma = SD.alpha_sigma(torch.tensor(n / 1000, dtype=torch.float64))
    np.testing.assert_allclose(alpha.numpy() ** 2, abar[n - 1], rtol=1e-9)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1 - abar[n - 1], rtol=1e-9)
    # between steps log alpha is linear in t; training draws whole steps and gives the network n
    mid = SD.log_alpha(torch.tensor(0.2505, dtype=torch.float64)).item()
    assert mid == pytest.approx(0.25 * (np.log(abar[249]) + np.log(abar[250])), rel=1e-9)
    t = SD.sample_t(5000, torch.Generator().manual_seed(0), "cpu")
    steps = SD.timestep(t)
    assert torch.equal(steps, steps.round()) and steps.min() >= 1 and steps.max() <= 1000
    assert len(steps.unique()) > 900
    # the forward Markov chain x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) eps has the closed-form marginal
    g = torch.Generator().manual_seed(1)
    x0 = 2.0
    x = torch.full((20_000,), x0, dtype=torch.float64)
    for i, b in enumerate(betas, 1):
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(len(x), generator=g, dtype=torch.float64)
        if i in (100, 400, 1000):
            assert abs(x.mean().item() - math.sqrt(abar[i - 1]) * x0) < 0.02
            assert abs(x.var().item() - (1 - abar[i - 1])) < 0.03


MU, S = 0.3, 0.5  # data N(MU, S^2) in every pixel


def gaussian_eps(schedule):
    """The exact noise predictor for N(MU, S^2) data under the schedule."""
    def eps_fn(x, t):
        alpha, sigma = (v.item() for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        return (x - alpha * MU) * sigma / (alpha ** 2 * S ** 2 + sigma ** 2)
    return eps_fn


@pytest.mark.parametrize("schedule", [SD, diffusion.VP], ids=["discrete", "vp"])
def test_dpm_solver_pp_follows_the_exact_ode_on_gaussian_data(schedule):
    """For Gaussian data the probability-flow ODE is solved in closed form: x_t = alpha_t mu + std_t z with
    z = (x_1 - alpha_1 mu) / std_1. Second order converges as h^2 (first order, DDIM, as h)."""
    xT = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (a1, s1), (a, s) = ([v.item() for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))]
                        for t in (1.0, schedule.t_end))
    std1, std = math.sqrt(a1 ** 2 * S ** 2 + s1 ** 2), math.sqrt(a ** 2 * S ** 2 + s ** 2)
    exact = a * MU + std * (xT - a1 * MU) / std1

    def error(steps, order):
        return (sample_dpm_pp(gaussian_eps(schedule), xT, steps, schedule, order=order) - exact).abs().max().item()
    assert error(50, 2) < 0.15  # steps uniform in t are coarse near t = 0, where lambda moves fast
    assert error(400, 2) < 0.005 < 0.01 < error(400, 1)
    assert error(800, 2) < 0.35 * error(400, 2)  # halving the step divides the error by ~4
    x = sample_dpm_pp(gaussian_eps(schedule), xT, 200, schedule)
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - S) < 0.03


def test_guided_generation_is_seeded_and_follows_the_captions():
    torch.manual_seed(0)
    model = UViC(UViCConfig(**TINY_T2I)).eval()
    contexts, empty = torch.randn(5, 5, 12), torch.zeros(1, 5, 12)

    def draw(seed, batches):
        return torch.cat(list(generate_guided(model, batches, empty, 1.0, (4, 8, 8), 3, seed, "cpu", SD)))
    a = draw(7, contexts.split(3))
    assert a.shape == (5, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, draw(7, contexts.split(3)))
    assert not torch.allclose(a, draw(8, contexts.split(3)))


# -----------------------------------------------------------------------------
# MS-COCO: a tiny folder in the official layout, tiny random models


def tiny_vae(seed=0):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # the GPU machines lack diffusers and transformers
    torch.manual_seed(seed)  # 4 blocks: 8x down, as Stable Diffusion's KL-f8
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                         layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=32)


def tiny_clip(folder, seed=0):
    """A CLIPTextModel (16 wide, 77 positions as CLIP's) and a character-level CLIPTokenizer saved in folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


CAPTIONS = ["a red bus on a street", "a cat on a sofa", "two dogs", "a plate of food", "a man riding a horse",
            "a boat", "a tall clock tower", "three birds"]


def write_tiny_coco(root):
    """MS-COCO's layout: {train,val}2014/*.jpg of odd sizes and annotations/captions_{train,val}2014.json with one to
    three captions per image (image ids out of order, as in the real files)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, ids in (("train", [9, 3, 7, 1, 5]), ("val", [4, 2, 8])):
        os.makedirs(os.path.join(root, f"{split}2014"))
        images, annotations = [], []
        for image_id in ids:
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            h, w = (40, 56) if image_id % 2 else (64, 48)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, f"{split}2014", name), quality=95)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for k in range(1 + image_id % 3):
                annotations.append({"id": 100 * image_id + k, "image_id": image_id,
                                    "caption": CAPTIONS[(image_id + k) % len(CAPTIONS)]})
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"captions_{split}2014.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)


@pytest.fixture
def tiny_coco(tmp_path):
    pytest.importorskip("transformers")
    root = tmp_path / "coco"
    write_tiny_coco(str(root))
    vae_dir = str(tmp_path / "vae")
    tiny_vae().save_pretrained(vae_dir)
    clip_dir = tiny_clip(str(tmp_path / "clip"))
    return str(root), vae_dir, clip_dir


def prepare_args(coco, vae, clip, out):
    return [f"--coco_dir={coco}", f"--out_dir={out}", f"--vae={vae}", f"--text_encoder={clip}", "--image_size=32",
            "--shard_size=2", "--batch_size=2", "--device=cpu"]


COCO_TINY = ["--preset=coco", "--img_size=4", "--patch_size=2", "--embed_dim=32", "--depth=3", "--num_heads=2",
             "--clip_dim=16", "--num_clip_token=77", "--batch_size=4", "--eval_iters=1", "--grid_size=2",
             "--sample_steps=2", "--warmup_iters=1", "--learning_rate=1e-3", "--log_interval=1"]


def center_crop_independently(path, size):
    from PIL import Image
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return torch.from_numpy(np.array(square.resize((size, size), Image.LANCZOS))).permute(2, 0, 1)


def test_prepare_train_sample_and_fid_on_a_tiny_coco(tiny_coco, tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    coco, vae_dir, clip_dir = tiny_coco
    out = str(tmp_path / "features")
    meta = prepare_coco.main(prepare_args(coco, vae_dir, clip_dir, out))
    assert meta["latent_shape"] == [4, 4, 4] and meta["context_shape"] == [77, 16]
    assert meta["splits"] == {"train": {"images": 5, "captions": 9, "shards": 3},
                              "val": {"images": 3, "captions": 8, "shards": 2}}
    train = prepare_coco.CocoFeatures(out, "train")
    assert [e["id"] for e in train.entries] == [1, 3, 5, 7, 9]  # image-id order
    # image 2 (id 5, in the second shard): moments and caption features as the models compute them
    vae, (tokenizer, clip) = AutoencoderKL.from_pretrained(vae_dir), (CLIPTokenizer.from_pretrained(clip_dir),
                                                                      CLIPTextModel.from_pretrained(clip_dir))
    image = center_crop_independently(os.path.join(coco, "train2014", train.entries[2]["file_name"]), 32)
    with torch.no_grad():
        dist = vae.encode(image[None].float() / 127.5 - 1).latent_dist
        ids = tokenizer(train.entries[2]["captions"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        text = clip(input_ids=ids).last_hidden_state
        empty = clip(input_ids=tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    moments, context = train.read([2, 2], [0.0, 0.99])
    torch.testing.assert_close(moments[0], torch.cat([dist.mean, dist.logvar], 1)[0], atol=2e-2, rtol=2e-3)
    assert train.entries[2]["captions"] == ["a boat", "a tall clock tower", "three birds"]
    torch.testing.assert_close(context, text[[0, 2]], atol=1e-2, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(train.empty_context.astype("float32")), empty.last_hidden_state[0],
                               atol=1e-2, rtol=2e-3)
    # re-running keeps the finished shards; an interrupted shard (its .tmp folder) is redone
    first = os.path.join(out, "train", "shard_00000", "context.npy")
    stamp = os.stat(first).st_mtime_ns
    redo = os.path.join(out, "val", "shard_00001")
    expected = np.load(os.path.join(redo, "moments.npy"))
    os.rename(redo, redo + ".tmp")
    prepare_coco.main(prepare_args(coco, vae_dir, clip_dir, out))
    assert os.stat(first).st_mtime_ns == stamp and not os.path.exists(redo + ".tmp")
    assert np.array_equal(np.load(os.path.join(redo, "moments.npy")), expected)

    # train a few steps: loss logged, grids decoded through the autoencoder, a checkpoint
    run = str(tmp_path / "run")
    train_diffusion.main([*COCO_TINY, f"--data_dir={out}", "--max_iters=4", "--eval_interval=2", f"--out_dir={run}"])
    rows = read_log(os.path.join(run, "log.jsonl"))
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4] and sum("loss" in r for r in rows) == 4
    assert os.path.exists(os.path.join(run, "samples_000004.png"))
    ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"))
    assert ckpt["config"]["noise_schedule"] == "sd" and ckpt["model_config"]["num_clip_token"] == 77

    # sample prompts through CLIP and the autoencoder, reproducibly
    grids = [str(tmp_path / f"grid{i}.png") for i in range(2)]
    for grid in grids:
        sample.main([f"--out_dir={run}", "--prompt=a red bus", "--prompt=a cat", "--num_samples=3", "--steps=2",
                     f"--output={grid}"])
    with open(grids[0], "rb") as f0, open(grids[1], "rb") as f1:
        assert f0.read() == f1.read()
    # FID against the val2014 images (a stand-in for Inception), statistics computed once and cached
    monkeypatch.setattr(diffusion, "load_inception", lambda device: lambda x: fake_inception(x, dim=16))
    fid = sample.main([f"--out_dir={run}", "--fid", "--num_samples=5", "--steps=2", "--batch_size=2",
                       f"--output={tmp_path / 'fid.png'}"])
    assert "FID " in capsys.readouterr().out and np.isfinite(fid) and fid > 0
    assert os.path.exists(os.path.join(out, "fid_stats_val2014_32.npz"))
    mu, _ = prepare_coco.read_fid_stats(os.path.join(out, "fid_stats_val2014_32.npz"))
    val_images = torch.stack([center_crop_independently(os.path.join(coco, "val2014", e["file_name"]), 32)
                              for e in prepare_coco.CocoFeatures(out, "val").entries])
    np.testing.assert_allclose(mu[:3], (val_images.double() / 255).mean((0, 2, 3)).numpy(), rtol=1e-5)
    # a --data_dir given is the one used, even when it is sample.py's default (CIFAR-10's folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no prepared MS-COCO features in data/cifar10"):
        sample.main([f"--out_dir={run}", "--fid", "--num_samples=5", "--steps=2", "--data_dir=data/cifar10"])


def test_prepare_refuses_another_autoencoder_and_finds_broken_shards(tiny_coco, tmp_path):
    coco, vae_dir, clip_dir = tiny_coco
    out = str(tmp_path / "features")
    prepare_coco.main(prepare_args(coco, vae_dir, clip_dir, out))
    other = str(tmp_path / "other_vae")
    tiny_vae(seed=1).save_pretrained(other)
    with pytest.raises(SystemExit, match="autoencoder: the folder was made with") as err:
        prepare_coco.main(prepare_args(coco, other, clip_dir, out))
    assert "weights differ" in str(err.value)
    # the same weights under another name (a copy of the folder) are the same autoencoder
    copy = str(tmp_path / "vae_copy")
    tiny_vae().save_pretrained(copy)
    prepare_coco.main(prepare_args(coco, copy, clip_dir, out))
    # a truncated shard is an error that names the file and the fix, before any training
    path = os.path.join(out, "train", "shard_00001", "context.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(SystemExit, match="truncated") as err:
        prepare_coco.CocoFeatures(out, "train")
    assert path in str(err.value) and "re-run data/prepare_coco.py" in str(err.value)
    shutil.rmtree(os.path.join(out, "train", "shard_00001"))
    with pytest.raises(SystemExit, match="shard_00001 is missing"):
        prepare_coco.CocoFeatures(out, "train")


def test_missing_dataset_and_models_are_clear_errors(tiny_coco, tmp_path):
    coco, vae_dir, clip_dir = tiny_coco
    with pytest.raises(SystemExit, match="train2014") as err:
        prepare_coco.main(prepare_args(str(tmp_path / "nowhere"), vae_dir, clip_dir, str(tmp_path / "out")))
    assert "captions_train2014.json" in str(err.value) and "cocodataset.org" in str(err.value)
    with pytest.raises(SystemExit, match="autoencoder") as err:
        prepare_coco.main(prepare_args(coco, str(tmp_path / "no_vae"), clip_dir, str(tmp_path / "out")))
    assert "no_vae" in str(err.value) and "--vae=" in str(err.value)
    with pytest.raises(SystemExit, match="text encoder") as err:
        prepare_coco.main(prepare_args(coco, vae_dir, str(tmp_path / "no_clip"), str(tmp_path / "out")))
    assert "--text_encoder=" in str(err.value)
    with pytest.raises(SystemExit, match="prepare_coco.py --coco_dir=") as err:
        train_diffusion.main([*COCO_TINY, f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'run'}"])
    assert "meta.json" in str(err.value)


# -----------------------------------------------------------------------------
# the authors' checkpoints (U-ViT's uvit_t2i.py state dict)


def authors_state_dict(embed=32, depth=3, in_chans=4, patch=2, side=4, clip_dim=12, n_clip=77, mlp=4, seed=0):
    """Random tensors under the names and shapes of U-ViT's text-to-image network, written from its layout
    (docs/paper.md, "U-ViC"), not from our model."""
    D, H = embed, mlp * embed
    shapes = {"pos_embed": (1, 1 + n_clip + side * side, D), "patch_embed.proj.weight": (D, in_chans, patch, patch),
              "patch_embed.proj.bias": (D,), "context_embed.weight": (D, clip_dim), "context_embed.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,), "decoder_pred.weight": (patch * patch * in_chans, D),
              "decoder_pred.bias": (patch * patch * in_chans,), "final_layer.weight": (in_chans, in_chans, 3, 3),
              "final_layer.bias": (in_chans,)}
    blocks = [f"in_blocks.{i}" for i in range(depth // 2)] + ["mid_block"] + \
             [f"out_blocks.{i}" for i in range(depth // 2)]
    for name in blocks:
        shapes.update({f"{name}.norm1.weight": (D,), f"{name}.norm1.bias": (D,), f"{name}.attn.qkv.weight": (3 * D, D),
                       f"{name}.attn.proj.weight": (D, D), f"{name}.attn.proj.bias": (D,),
                       f"{name}.norm2.weight": (D,), f"{name}.norm2.bias": (D,), f"{name}.mlp.fc1.weight": (H, D),
                       f"{name}.mlp.fc1.bias": (H,), f"{name}.mlp.fc2.weight": (D, H), f"{name}.mlp.fc2.bias": (D,)})
        if name.startswith("out_blocks"):
            shapes.update({f"{name}.skip_linear.weight": (D, 2 * D), f"{name}.skip_linear.bias": (D,)})
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) for k, shape in shapes.items()}, blocks


def uvit_t2i_forward(sd, blocks, x, t, context, heads, cog_blocks):
    """U-ViT's text-to-image forward written from its description, straight on the state dict's tensors."""
    B, C, side = x.size(0), x.size(1), x.size(-1)
    D = sd["pos_embed"].size(-1)
    p = sd["patch_embed.proj.weight"].size(-1)
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).mT
    freqs = torch.exp(-math.log(10000) * torch.arange(D // 2) / (D // 2))
    time = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)[:, None]
    h = torch.cat([time, F.linear(context, sd["context_embed.weight"], sd["context_embed.bias"]), patches], 1)
    h = h + sd["pos_embed"]

    def block(name, h):
        y = F.layer_norm(h, (D,), sd[f"{name}.norm1.weight"], sd[f"{name}.norm1.bias"])
        q, k, v = F.linear(y, sd[f"{name}.attn.qkv.weight"]).view(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        s = q @ k.mT / math.sqrt(D // heads)
        w = torch.sign(s) * torch.softmax(s.abs(), -1) if name in cog_blocks else torch.softmax(s, -1)
        h = h + F.linear((w @ v).transpose(1, 2).reshape(B, -1, D), sd[f"{name}.attn.proj.weight"],
                         sd[f"{name}.attn.proj.bias"])
        y = F.layer_norm(h, (D,), sd[f"{name}.norm2.weight"], sd[f"{name}.norm2.bias"])
        y = F.linear(F.gelu(F.linear(y, sd[f"{name}.mlp.fc1.weight"], sd[f"{name}.mlp.fc1.bias"])),
                     sd[f"{name}.mlp.fc2.weight"], sd[f"{name}.mlp.fc2.bias"])
        return h + y
    skips = []
    for name in blocks:
        if name.startswith("out_blocks"):
            h = F.linear(torch.cat([h, skips.pop()], -1), sd[f"{name}.skip_linear.weight"],
                         sd[f"{name}.skip_linear.bias"])
        h = block(name, h)
        if name.startswith("in_blocks"):
            skips.append(h)
    h = F.layer_norm(h, (D,), sd["norm.weight"], sd["norm.bias"])
    h = F.linear(h, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1 + context.size(1):]
    n = side // p
    img = h.view(B, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, side, side)
    return F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)


def test_authors_checkpoint_maps_every_tensor(tmp_path):
    sd, blocks = authors_state_dict()
    path = str(tmp_path / "cog_nnet_ema.pth")
    torch.save(sd, path)
    model = load_uvic(path, num_heads=2).eval()
    assert model.config == UViCConfig(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=3, num_heads=2,
                                      mlp_ratio=4.0, attn="cog", clip_dim=12, num_clip_token=77)
    ours = model.state_dict()
    renamed = {k.replace("patch_embed.proj.", "patch_embed.").replace("mlp.fc1.", "mlp.0.")
               .replace("mlp.fc2.", "mlp.2.").replace("final_layer.", "final_conv."): v for k, v in sd.items()}
    assert set(renamed) == set(ours)  # every tensor is used, every parameter comes from the file
    assert all(torch.equal(ours[k], v) for k, v in renamed.items())
    # the same outputs as U-ViT's forward on the file's tensors, Cog in all blocks but the first and the last
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 77, 12)
    expected = uvit_t2i_forward(sd, blocks, x, t, context, heads=2, cog_blocks={"mid_block"})
    torch.testing.assert_close(model(x, t, context), expected, atol=1e-4, rtol=1e-4)
    softmax = load_uvic(path, attn="softmax", num_heads=2).eval()
    torch.testing.assert_close(softmax(x, t, context), uvit_t2i_forward(sd, blocks, x, t, context, 2, set()),
                               atol=1e-4, rtol=1e-4)
    # round trip: our weights written in U-ViT's names load back into the same network
    back = {k.replace("patch_embed.", "patch_embed.proj.").replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
            .replace("final_conv.", "final_layer."): v for k, v in model.state_dict().items()}
    torch.save(back, str(tmp_path / "again_np.pth"))
    again = load_uvic(str(tmp_path / "again_np.pth"), num_heads=2).eval()
    assert torch.equal(again(x, t, context), model(x, t, context))


def test_attention_kind_is_read_from_the_path(tmp_path):
    sd, _ = authors_state_dict()
    for name, kind in (("cog_nnet_ema.pth", "cog"), ("mscoco_uvit_small.pth", "softmax"),
                       ("mscoco_uvit_small_np_0_last/nnet_ema.pth", "cog"), ("plain/vanilla/nnet_ema.pth", "softmax")):
        path = tmp_path / "k" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, str(path))
        assert load_uvic(str(path)).config.attn == kind, name
    (tmp_path / "plain" / "weights").mkdir(parents=True)
    torch.save(sd, str(tmp_path / "plain" / "weights" / "nnet_ema.pth"))
    with pytest.raises(ValueError, match="cannot tell from its path"):
        load_uvic(str(tmp_path / "plain" / "weights" / "nnet_ema.pth"))
    assert load_uvic(str(tmp_path / "plain" / "weights" / "nnet_ema.pth"), attn="cog").config.attn == "cog"


def test_bad_authors_files_are_clear_errors(tmp_path):
    sd, _ = authors_state_dict()
    cases = {"garbage_np.pth": b"not a torch file", "empty_np.pth": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="cannot read"):
            load_uvic(str(tmp_path / name))
    torch.save({"weights": sd, "step": train_diffusion.TrainConfig()}, str(tmp_path / "objects_np.pth"))
    with pytest.raises(ValueError, match="cannot read"):  # a pickled object: refused, never run
        load_uvic(str(tmp_path / "objects_np.pth"))
    with pytest.raises(ValueError, match="no such file"):
        load_uvic(str(tmp_path / "missing_np.pth"))
    broken = {**{k: v for k, v in sd.items() if k != "final_layer.weight"}, "time_embed.0.weight": torch.zeros(8, 8)}
    torch.save(broken, str(tmp_path / "broken_np.pth"))
    with pytest.raises(ValueError, match="unused tensors \\['time_embed.0.weight'\\], missing tensors "
                                         "\\['final_layer.weight'\\]"):
        load_uvic(str(tmp_path / "broken_np.pth"))
    torch.save({**sd, "context_embed.bias": torch.zeros(7)}, str(tmp_path / "shape_np.pth"))
    with pytest.raises(ValueError, match="context_embed.bias has shape \\(7,\\), expected \\(32,\\)"):
        load_uvic(str(tmp_path / "shape_np.pth"))
    with pytest.raises(SystemExit, match="--init_from: cannot read"):
        sample.main([f"--init_from={tmp_path / 'garbage_np.pth'}"])
    torch.save({"some.weight": torch.zeros(2)}, str(tmp_path / "other.pth"))
    with pytest.raises(SystemExit, match="not one of the authors' files"):
        sample.main([f"--init_from={tmp_path / 'other.pth'}"])


def test_authors_checkpoint_samples_and_fine_tunes(tiny_coco, tmp_path):
    """sample.py --init_from draws from the authors' weights (through CLIP and the autoencoder given on the command
    line); train_diffusion.py --init_from starts from them."""
    coco, vae_dir, clip_dir = tiny_coco
    sd, _ = authors_state_dict(side=2, clip_dim=16)  # the tiny autoencoder's 4x4 latents
    path = str(tmp_path / "cog_nnet_ema.pth")
    torch.save(sd, path)
    grid = str(tmp_path / "grid.png")
    sample.main([f"--init_from={path}", "--prompt=a red bus", "--steps=2", f"--vae={vae_dir}",
                 f"--text_encoder={clip_dir}", f"--output={grid}", f"--data_dir={tmp_path / 'none'}"])
    from PIL import Image
    assert Image.open(grid).size[0] > 32
    out = str(tmp_path / "features")
    prepare_coco.main(prepare_args(coco, vae_dir, clip_dir, out))
    run = str(tmp_path / "run")
    args = [*COCO_TINY, f"--data_dir={out}", f"--out_dir={run}", f"--init_from={path}"]
    train_diffusion.main([*args, "--max_iters=0"])
    ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"))
    assert torch.equal(ckpt["model"]["context_embed.weight"], sd["context_embed.weight"])
    assert torch.equal(ckpt["ema"]["in_blocks.0.mlp.0.weight"], sd["in_blocks.0.mlp.fc1.weight"])
    with pytest.raises(SystemExit, match="holds another network: embed_dim=32 \\(this run: 64\\)"):
        train_diffusion.main([*args, "--embed_dim=64", "--max_iters=0", "--overwrite"])


# -----------------------------------------------------------------------------
# the shapes demo with captions


def test_shapes_captions_and_scorer():
    g = torch.Generator().manual_seed(0)
    images, kind, color = demo_shapes.captioned_shapes_batch(96, 16, g, "cpu")
    # the same draws as the unconditional demo's shapes (its tuned results stay valid)
    assert torch.equal(images, demo_shapes.shapes_batch(96, 16, torch.Generator().manual_seed(0), "cpu"))
    matches, iou = demo_shapes.score_shapes(images, kind, color)
    assert matches.all() and iou.min() > 0.9  # every training image matches its own caption
    assert not demo_shapes.score_shapes(images, (kind + 1) % 3, color)[0].any()  # another shape: no match
    assert not demo_shapes.score_shapes(images, kind, (color + 1) % 4)[0].any()  # another colour: no match
    background = torch.full_like(images, demo_shapes.BACKGROUND * 2 - 1)
    assert not demo_shapes.score_shapes(background, kind, color)[0].any()
    blobs = torch.where(torch.rand(images.shape[-2:], generator=g) < 0.5, images, background)  # ragged halves
    assert demo_shapes.score_shapes(blobs, kind, color)[0].float().mean() < 0.2
    # captions: three one-hot words; the empty caption is three blanks
    features = demo_shapes.demo_prompt_features(["a red circle", "a yellow triangle"])
    words = demo_shapes.DEMO_WORDS
    assert features.shape == (2, 3, len(words)) and torch.equal(features.sum(-1), torch.ones(2, 3))
    assert [words[i] for i in features[1].argmax(-1)] == ["a", "yellow", "triangle"]
    assert torch.equal(demo_shapes.demo_caption_features(kind[:2], color[:2]),
                       demo_shapes.demo_prompt_features([f"a {demo_shapes.COLOR_NAMES[c]} "
                                                             f"{demo_shapes.SHAPE_NAMES[k]}"
                                                             for k, c in zip(kind[:2], color[:2])]))
    assert [words[i] for i in demo_shapes.demo_caption_features(None, None)[0].argmax(-1)] == ["", "", ""]
    with pytest.raises(SystemExit, match="colour from red, green, blue, yellow"):
        demo_shapes.demo_prompt_features(["a purple circle"])


def test_guidance_dropout_uses_the_empty_caption():
    config = train_diffusion.TrainConfig(dataset="shapes_t2i", img_size=16)
    empty = demo_shapes.demo_caption_features(None, None)
    g = torch.Generator().manual_seed(0)
    _, context = train_diffusion.get_t2i_batch(None, config, 2000, g, "cpu", empty, p_uncond=0.1)
    dropped = (context == empty).all(-1).all(-1)
    assert 0.08 < dropped.float().mean() < 0.12
    _, context = train_diffusion.get_t2i_batch(None, config, 200, g, "cpu", empty, p_uncond=0.0)
    assert not (context == empty).all(-1).all(-1).any()


def test_coco_batches_draw_scaled_latents_and_drop_captions():
    """x0 = (mean + std * noise) * latent_scale from the stored moments, as U-ViT draws its latents."""
    class Moments:  # a stand-in for CocoFeatures: every image has mean 3 and std 2; captions are 1s
        def __len__(self):
            return 10

        def read(self, image_ix, caption_u):
            moments = torch.cat([torch.full((len(image_ix), 4, 4, 4), 3.0),
                                 torch.full((len(image_ix), 4, 4, 4), math.log(4.0))], dim=1)
            return moments, torch.ones(len(image_ix), 7, 5)
    config = train_diffusion.TrainConfig(dataset="coco", img_size=4, in_chans=4, latent_scale=0.5)
    empty = torch.zeros(1, 7, 5)
    x0, context = train_diffusion.get_t2i_batch(Moments(), config, 500, torch.Generator().manual_seed(0), "cpu",
                                                empty, p_uncond=0.2)
    assert x0.shape == (500, 4, 4, 4)
    assert abs(x0.mean().item() - 1.5) < 0.02 and abs(x0.std().item() - 1.0) < 0.02
    dropped = (context == 0).all(-1).all(-1).float().mean().item()
    assert 0.15 < dropped < 0.25 and ((context == 0) | (context == 1)).all()


def test_latents_are_unscaled_before_decoding():
    vae = tiny_vae().eval()
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(prepare_coco.decode_latents(vae, z * 0.23010, 0.23010, batch_size=2), expected)


DEMO_TINY = ["--preset=demo_t2i", "--img_size=8", "--patch_size=2", "--embed_dim=32", "--depth=3", "--num_heads=2",
             "--batch_size=32", "--learning_rate=3e-3", "--warmup_iters=5", "--eval_iters=1", "--grid_size=4",
             "--sample_steps=2", "--log_interval=1"]


def test_demo_t2i_trains_resumes_exactly_and_samples_prompts(tmp_path, capsys):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_diffusion.main([*DEMO_TINY, "--max_iters=6", "--eval_interval=3", f"--out_dir={full}"])
    train_diffusion.main([*DEMO_TINY, "--max_iters=3", "--eval_interval=3", f"--out_dir={split}"])
    train_diffusion.main([*DEMO_TINY, "--max_iters=6", "--eval_interval=3", f"--out_dir={split}", "--resume"])
    a, b = read_log(os.path.join(full, "log.jsonl")), read_log(os.path.join(split, "log.jsonl"))
    assert [(r["iter"], r.get("loss"), r.get("val_loss"), r.get("match")) for r in a] == \
           [(r["iter"], r.get("loss"), r.get("val_loss"), r.get("match")) for r in b]
    evals = [r for r in a if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6] and all(0 <= r["match_unguided"] <= 1 for r in evals)
    ca, cb = load_checkpoint(os.path.join(full, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    # sample.py draws the prompts, scores them, and writes the captioned grid
    grid = str(tmp_path / "grid.png")
    share = sample.main([f"--out_dir={full}", "--prompt=a yellow square", "--prompt=a green circle", "--steps=2",
                         f"--output={grid}"])
    assert 0 <= share <= 1 and "of 2 samples" in capsys.readouterr().out and os.path.exists(grid)
    with pytest.raises(SystemExit, match="a <colour> <shape>"):
        sample.main([f"--out_dir={full}", "--prompt=a bus"])
    with pytest.raises(SystemExit, match="--num_clip_token"):
        train_diffusion.main([*DEMO_TINY, "--num_clip_token=0", f"--out_dir={tmp_path / 'x'}"])

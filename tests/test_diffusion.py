"""
Tests of the diffusion side: the VP-SDE, the two samplers (checked on Gaussian data where the answer is known),
EMA, the trainer (loss falls, exact resume, CIFAR-10 loading), and FID. Tiny models: the file runs in ~1-2 minutes
on 2 CPU cores. Run with `python -m pytest -q tests/test_diffusion.py`.
"""

import math
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch

import diffusion
import sample
import train_diffusion
from checkpoint import load_checkpoint
from data import shapes
from diffusion import (BETA_0, BETA_1, T_END, alpha_sigma, ema_update, feature_stats, frechet_distance, generate,
                       load_cifar10, log_snr, noise_predictor, sample_dpm, sample_em, t_of_log_snr)
from logs import read_log
from model import UViC, UViCConfig

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["--img_size=8", "--patch_size=2", "--embed_dim=32", "--depth=3", "--num_heads=2", "--batch_size=32",
        "--learning_rate=3e-3", "--warmup_iters=5", "--eval_iters=1", "--grid_size=4", "--sample_steps=2",
        "--log_interval=1"]


def tiny_uvic(seed=0):
    torch.manual_seed(seed)
    return UViC(UViCConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2)).eval()


# -----------------------------------------------------------------------------
# the VP-SDE


def test_marginal_matches_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha, sigma = alpha_sigma(t)
    expected = torch.exp(-0.25 * t ** 2 * (BETA_1 - BETA_0) - 0.5 * t * BETA_0)
    torch.testing.assert_close(alpha, expected)
    torch.testing.assert_close(sigma ** 2, 1 - expected ** 2)
    assert (BETA_0, BETA_1) == (0.1, 20.0)
    # lambda = log(alpha / sigma) and its inverse
    torch.testing.assert_close(log_snr(t[1:]), torch.log(alpha[1:] / sigma[1:]))
    torch.testing.assert_close(t_of_log_snr(log_snr(t[1:])), t[1:])


def test_marginal_matches_simulated_forward_sde():
    """Simulate dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw from x0 = 3 with fine steps: mean alpha_t x0, var sigma_t^2."""
    g = torch.Generator().manual_seed(0)
    n, steps, x0 = 20_000, 500, 3.0
    x = torch.full((n,), x0, dtype=torch.float64)
    dt = 1.0 / steps
    for i in range(steps):
        b = BETA_0 + (i + 0.5) * dt * (BETA_1 - BETA_0)
        x = x - 0.5 * b * x * dt + math.sqrt(b * dt) * torch.randn(n, generator=g, dtype=torch.float64)
        t = (i + 1) * dt
        if i + 1 in (50, 100, 250, 500):
            alpha, sigma = (v.item() for v in alpha_sigma(torch.tensor(t, dtype=torch.float64)))
            assert abs(x.mean().item() - alpha * x0) < 0.025, (t, x.mean().item(), alpha * x0)
            assert abs(x.var().item() - sigma ** 2) < 0.03, (t, x.var().item(), sigma ** 2)


def test_diffusion_loss_is_noise_mse():
    """With a network that returns the true noise (recovered from x_t through the known x0), the loss is 0."""
    x0 = torch.randn(16, 3, 4, 4)

    def oracle(xt, timesteps):
        alpha, sigma = alpha_sigma(timesteps / 999)
        return (xt - alpha.view(-1, 1, 1, 1) * x0) / sigma.view(-1, 1, 1, 1)
    assert diffusion.diffusion_loss(oracle, x0, torch.Generator().manual_seed(0)).item() < 1e-8
    assert diffusion.diffusion_loss(lambda xt, t: torch.zeros_like(xt), x0, torch.Generator()).item() > 0.5


def test_v_prediction_loss_and_its_conversion_to_noise():
    """prediction="v": a network returning the true v = alpha eps - sigma x0 has loss 0 (and an eps-oracle does not),
    and noise_predictor turns its output back into the exact noise, eps = sigma x_t + alpha v."""
    x0 = torch.randn(16, 3, 4, 4)

    def v_oracle(xt, timesteps):
        alpha, sigma = (a.view(-1, 1, 1, 1) for a in alpha_sigma(timesteps / 999))
        return (alpha * xt - x0) / sigma

    def eps_oracle(xt, timesteps):
        alpha, sigma = (a.view(-1, 1, 1, 1) for a in alpha_sigma(timesteps / 999))
        return (xt - alpha * x0) / sigma
    assert diffusion.diffusion_loss(v_oracle, x0, torch.Generator().manual_seed(0), prediction="v").item() < 1e-6
    assert diffusion.diffusion_loss(eps_oracle, x0, torch.Generator().manual_seed(0), prediction="v").item() > 0.1
    for t in (0.05, 0.5, 0.95):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        alpha, sigma = (a.item() for a in alpha_sigma(torch.tensor(t)))
        eps = noise_predictor(v_oracle, prediction="v")(alpha * x0 + sigma * noise, t)
        torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion.diffusion_loss(v_oracle, x0, torch.Generator(), prediction="x0")


def test_ema_update():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    ema_update(ema, model, 0.0)
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p.detach())


# -----------------------------------------------------------------------------
# samplers

MU, S = 0.3, 0.5  # data distribution N(MU, S^2) in every pixel


def gaussian_eps(x, t):
    """The exact noise predictor for N(MU, S^2) data: E[eps | x_t] = (x - alpha mu) sigma / (alpha^2 s^2 + sigma^2)."""
    alpha, sigma = (v.item() for v in alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return (x - alpha * MU) * sigma / (alpha ** 2 * S ** 2 + sigma ** 2)


def test_dpm_solver_follows_the_exact_ode_on_gaussian_data():
    """For Gaussian data the probability-flow ODE is solved in closed form: x_t = alpha_t mu + std_t z,
    z = (x_1 - alpha_1 mu) / std_1. A first-order (DDIM) step or a wrong second-order term misses by > 0.05."""
    xT = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (a1, s1), (a, s) = ([v.item() for v in alpha_sigma(torch.tensor(t, dtype=torch.float64))] for t in (1.0, T_END))
    std1, std = math.sqrt(a1 ** 2 * S ** 2 + s1 ** 2), math.sqrt(a ** 2 * S ** 2 + s ** 2)
    exact = a * MU + std * (xT - a1 * MU) / std1
    x = sample_dpm(gaussian_eps, xT, 50)
    assert (x - exact).abs().max().item() < 0.01
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - S) < 0.03
    x = sample_dpm(gaussian_eps, xT, 50, skip="time")
    assert (x - exact).abs().max().item() < 0.1


def test_euler_maruyama_samples_gaussian_data():
    xT = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sample_em(gaussian_eps, xT, 1000, torch.Generator().manual_seed(2))
    assert abs(x.mean().item() - MU) < 0.015, x.mean().item()
    assert abs(x.std().item() - S) < 0.015, x.std().item()


@pytest.mark.parametrize("sampler", ["em", "dpm"])
def test_samplers_are_seeded_and_finite(sampler):
    eps_fn = noise_predictor(tiny_uvic())
    a = generate(eps_fn, 5, (3, 8, 8), sampler, 4, seed=7, device="cpu", batch_size=3)
    b = generate(eps_fn, 5, (3, 8, 8), sampler, 4, seed=7, device="cpu", batch_size=3)
    c = generate(eps_fn, 5, (3, 8, 8), sampler, 4, seed=8, device="cpu", batch_size=3)
    assert a.shape == (5, 3, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# -----------------------------------------------------------------------------
# the trainer


def test_shapes_are_one_coloured_shape_on_the_background():
    x = shapes.shapes_batch(32, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (32, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    background = torch.full((3,), shapes.BACKGROUND * 2 - 1)
    for img in x:
        colors = torch.unique(img.flatten(1).T, dim=0)
        assert len(colors) == 2 and (colors == background).all(1).any()
        mask = (img != background.view(3, 1, 1)).any(0)
        assert 40 <= mask.sum() <= 160  # 10 to 14 pixels wide
        assert torch.equal(mask, mask.flip(-1))  # centred: circles, squares and triangles are symmetric left-right


def test_demo_loss_falls_and_writes_everything(tmp_path):
    out = str(tmp_path / "run")
    train_diffusion.main(["--preset=demo", *TINY, "--max_iters=60", "--eval_interval=30", f"--out_dir={out}"])
    rows = read_log(os.path.join(out, "log.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 30, 60]
    for name in ("samples_000000.png", "samples_000030.png", "samples_000060.png", "loss.png", "ckpt.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["kind"] == "diffusion" and ckpt["iter"] == 60
    assert ckpt["model_config"] == {**vars(UViCConfig()), "img_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
    assert set(ckpt) >= {"model", "ema", "optimizer", "scaler", "config", "rng", "data_rng"}
    # the EMA lags the model
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    # sample.py draws grids from the checkpoint with either sampler, reproducibly
    for sampler in ("em", "dpm"):
        paths = [str(tmp_path / f"{sampler}{i}.png") for i in range(2)]
        for path in paths:
            sample.main([f"--out_dir={out}", f"--sampler={sampler}", "--steps=3", "--num_samples=5", f"--output={path}"])
        with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
            assert f0.read() == f1.read()
    sample.main([f"--out_dir={out}", "--steps=2", "--num_samples=4"])
    assert os.path.exists(os.path.join(out, "samples_dpm2.png"))
    # the demo's network predicts v, and sample.py reads that from the checkpoint: its grid is the v-model's
    assert ckpt["config"]["prediction"] == "v"
    ema = UViC(UViCConfig(**ckpt["model_config"]))
    ema.load_state_dict(ckpt["ema"])
    expected = str(tmp_path / "expected.png")
    diffusion.save_grid(generate(noise_predictor(ema.eval(), prediction="v"), 5, (3, 8, 8), "dpm", 3, 1337, "cpu"),
                        expected)
    with open(expected, "rb") as f0, open(str(tmp_path / "dpm0.png"), "rb") as f1:
        assert f0.read() == f1.read()


def test_resume_is_exact(tmp_path):
    args = ["--preset=demo", *TINY, "--eval_interval=3"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_diffusion.main([*args, "--max_iters=6", f"--out_dir={full}"])
    train_diffusion.main([*args, "--max_iters=3", f"--out_dir={split}"])
    train_diffusion.main([*args, "--max_iters=6", f"--out_dir={split}", "--resume"])
    a, b = read_log(os.path.join(full, "log.jsonl")), read_log(os.path.join(split, "log.jsonl"))
    assert [(r["iter"], r.get("loss"), r.get("val_loss")) for r in a] == \
           [(r["iter"], r.get("loss"), r.get("val_loss")) for r in b]
    ca, cb = load_checkpoint(os.path.join(full, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    with open(os.path.join(full, "samples_000006.png"), "rb") as fa, open(os.path.join(split, "samples_000006.png"), "rb") as fb:
        assert fa.read() == fb.read()


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch(tmp_path, monkeypatch):
    """grad_accum = 4 micro-batches of 2 images: the gradients of one batch of 8, not 4 times them. Each image's t and
    noise are drawn from a generator of its own, so that they do not depend on how the batch is split."""
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_loss, runs = train_diffusion.diffusion_loss, {}
    for grad_accum, batch_size in ((1, 8), (4, 2)):
        served, grads = [0], {}

        def draw_batch(data, config, generator, device, empty_context, p_uncond):
            start = served[0] % len(images) if torch.is_grad_enabled() else 0
            served[0] += config.batch_size if torch.is_grad_enabled() else 0
            return images[start:start + config.batch_size], None

        def per_image_loss(model, x0, generator, prediction, schedule, context):
            first = (served[0] - len(x0)) % len(images) if torch.is_grad_enabled() else 0
            return torch.stack([real_loss(model, x0[i:i + 1], torch.Generator().manual_seed(first + i), prediction,
                                          schedule) for i in range(len(x0))]).mean()

        def spy(model, optimizer, scaler, grad_clip, real_step=train_diffusion.optimizer_step, grads=grads):
            if not grads:
                grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
            real_step(model, optimizer, scaler, grad_clip)
        monkeypatch.setattr(train_diffusion, "draw_batch", draw_batch)
        monkeypatch.setattr(train_diffusion, "diffusion_loss", per_image_loss)
        monkeypatch.setattr(train_diffusion, "optimizer_step", spy)
        train_diffusion.main(["--preset=demo", *TINY, "--max_iters=1", f"--batch_size={batch_size}",
                              f"--grad_accum={grad_accum}", f"--out_dir={tmp_path / str(grad_accum)}"])
        monkeypatch.undo()
        runs[grad_accum] = grads
    for name in runs[1]:
        torch.testing.assert_close(runs[4][name], runs[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_prediction_errors(tmp_path):
    with pytest.raises(SystemExit, match="--prediction must be one of eps, v, got 'x0'"):
        train_diffusion.main(["--preset=demo", *TINY, "--prediction=x0", f"--out_dir={tmp_path}"])
    train_diffusion.main(["--preset=demo", *TINY, "--max_iters=1", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--prediction=eps: the run in .* has prediction='v', and --resume continues"):
        train_diffusion.main(["--preset=demo", *TINY, "--max_iters=2", "--prediction=eps", f"--out_dir={tmp_path}",
                              "--resume"])


def write_fake_cifar10(root, n_per_batch=4):
    """A few random images in CIFAR-10's on-disk format: pickled dicts (Python 2 str keys) whose 'data' rows hold
    the R, G and B planes of one image, 3072 bytes."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)
        images[name] = data.reshape(-1, 3, 32, 32)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=2)
    return images


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """Fake CIFAR-10 files; torchvision's md5 checks are for the real files, so they are switched off here."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    root = str(tmp_path / "cifar10")
    return root, write_fake_cifar10(root)


def fake_inception(x, dim=2048):
    """A stand-in for pytorch-fid's InceptionV3: (B, 3, H, W) in [0, 1] -> [(B, dim, 1, 1)] features."""
    assert 0 <= x.min() and x.max() <= 1
    return [x.mean(dim=(2, 3), keepdim=True).repeat(1, dim // 3 + 1, 1, 1)[:, :dim]]


def test_cifar10_loads_from_its_on_disk_format(fake_cifar10, tmp_path, monkeypatch, capsys):
    root, written = fake_cifar10
    train, labels = load_cifar10(root, train=True)
    assert train.dtype == torch.uint8 and train.shape == (20, 3, 32, 32) and labels.shape == (20,)
    assert np.array_equal(train[:4].numpy(), written["data_batch_1"])
    assert np.array_equal(load_cifar10(root, train=False)[0].numpy(), written["test_batch"])
    # batches are the images scaled to [-1, 1], some flipped left-right
    config = train_diffusion.TrainConfig()
    x = train_diffusion.get_batch(train, config, 64, torch.Generator().manual_seed(0), "cpu")
    pixels = train.float() / 127.5 - 1
    flipped = [any(torch.equal(img, p.flip(-1)) for p in pixels) for img in x]
    assert all(any(torch.equal(img, p) for p in pixels) or f for img, f in zip(x, flipped))
    assert 0 < sum(flipped) < 64
    # and the paper preset's data path trains on them (a wide patch keeps the model tiny)
    out = str(tmp_path / "run")
    train_diffusion.main(["--patch_size=8", "--embed_dim=32", "--depth=3", "--num_heads=2", "--batch_size=4",
                          "--max_iters=2", "--eval_iters=1", "--grid_size=2", "--sample_steps=2",
                          f"--data_dir={root}", f"--out_dir={out}"])
    assert os.path.exists(os.path.join(out, "samples_000002.png"))
    # sample.py --fid, with a stand-in for the Inception network (16 features: a 2048-d sqrtm takes a minute here)
    monkeypatch.setattr(diffusion, "load_inception", lambda device: lambda x: fake_inception(x, dim=16))
    sample.main([f"--out_dir={out}", "--fid", "--num_samples=6", "--steps=2", f"--data_dir={root}"])
    assert "FID " in capsys.readouterr().out and os.path.exists(os.path.join(root, "fid_stats_train.npz"))


def test_cifar10_download_failure_says_how_to_fix(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit, match="cifar-10-python.tar.gz") as err:
        load_cifar10(str(tmp_path / "cifar10"))
    assert "tar -xzf" in str(err.value) and str(tmp_path / "cifar10") in str(err.value)


# -----------------------------------------------------------------------------
# FID


def independent_frechet(mu1, s1, mu2, s2):
    """tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}, the second a symmetric matrix: eigh only, no sqrtm."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_frechet_distance_against_independent_computation():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(200, 16)), 0.5 + 1.5 * rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) / 4
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    assert mu1.shape == (16,) and s1.shape == (16, 16)
    np.testing.assert_allclose(s1, np.cov(f1.T))
    expected = independent_frechet(mu1, s1, mu2, s2)
    assert expected > 1
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-6 * expected
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    assert abs(frechet_distance(mu1, np.diag(a), mu1, np.diag(b)) - ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()) < 1e-9


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    import pytorch_fid.inception as inception
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the Inception weights")
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    expected = os.path.join(str(tmp_path / "hub"), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    assert diffusion.inception_weights_path() == expected
    with pytest.raises(SystemExit, match="Inception weights") as err:
        diffusion.load_inception("cpu")
    assert expected in str(err.value) and inception.FID_WEIGHTS_URL in str(err.value)


def test_train_stats_are_computed_once_and_cached(fake_cifar10):
    """The FID pipeline with a stand-in for Inception: [0, 1] pixels in, 2048-d features out, cached statistics."""
    root, written = fake_cifar10
    calls = []

    def counting_inception(x):
        calls.append(x)
        return fake_inception(x)
    mu, sigma = diffusion.cifar10_train_stats(root, counting_inception, "cpu")
    assert len(calls) > 0 and os.path.exists(os.path.join(root, "fid_stats_train.npz"))
    train = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]) / 255
    np.testing.assert_allclose(mu[:3], train.mean(axis=(2, 3)).mean(0), rtol=1e-6)
    assert sigma.shape == (2048, 2048)
    n = len(calls)
    mu2, _ = diffusion.cifar10_train_stats(root, counting_inception, "cpu")
    assert len(calls) == n and np.array_equal(mu, mu2)


def test_deterministic_flag(tmp_path, monkeypatch):
    """--deterministic switches on PyTorch's deterministic algorithms (and with them the kernel's two-pass backward)."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append((mode, kw)))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the flag sets it too: restored after the test
    train_diffusion.main(["--preset=demo", *TINY, "--max_iters=1", "--deterministic", f"--out_dir={tmp_path}"])
    assert calls == [(True, {"warn_only": True})]


def test_captions_wrap_between_words_and_the_grid_leaves_room_for_them(tmp_path):
    measure = lambda text: 10 * len(text)  # noqa: E731 (10 pixels a character)
    assert diffusion.wrap_to_width("a yellow square".split(), 130, measure, 6) == [["a", "yellow"], ["square"]]
    assert diffusion.wrap_to_width(["enormously"], 50, measure, 6) == [["enormously"]]  # too wide: a line of its own
    from PIL import Image
    images = torch.zeros(2, 3, 16, 16)
    diffusion.save_captioned_grid(images, ["a red circle", "a green square"], tmp_path / "one.png")
    diffusion.save_captioned_grid(images, ["a red circle", "a rather long caption that needs more lines"],
                                  tmp_path / "three.png")
    one, three = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "three.png")
    assert one.width == three.width and three.height > one.height  # a line of text per row: no more, no less

"""
Diffusion for U-ViC, as U-ViT does it: the continuous-time VP-SDE with noise prediction, two samplers, and FID.

VP-SDE (Song et al. 2021), beta(t) linear from 0.1 to 20 over t in [0, 1]:
    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,     x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I),
    log alpha_t = -1/4 t^2 (beta_1 - beta_0) - 1/2 t beta_0,     sigma_t^2 = 1 - alpha_t^2.
The network eps(x_t, t * 999) predicts the noise; the score is -eps / sigma_t. (Or it predicts v, see PREDICTIONS.)
Samplers: Euler-Maruyama on the reverse SDE (the paper's FID protocol, 1000 steps) and multistep DPM-Solver-2
(Lu et al. 2022, ~50 steps, deterministic). FID: pytorch-fid's Inception pool3 features against CIFAR-10 train stats.
"""

import math
import os
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

BETA_0, BETA_1 = 0.1, 20.0
T_MIN = 1e-5  # training t ~ U(T_MIN, 1): at t = 0 there is no noise to predict (sigma_0 = 0)
# What the network predicts. "eps", the noise, is U-ViT's and the paper's. "v" (Salimans & Ho 2022) is for small
# networks trained briefly (the CPU demo): at high noise (alpha_1 = 0.007) an eps-prediction says anything about x0
# only if it is accurate to about alpha_t, which the demo's 0.6M-parameter model trained for minutes is not (it
# draws off-colour blobs); v = alpha eps - sigma x0 is -x0 there and eps at low noise: its errors stay small in x0.
PREDICTIONS = ("eps", "v")
T_END = 1e-3  # samplers integrate from t = 1 down to T_END (sigma ~ 0.01 there), as U-ViT and DPM-Solver do

# -----------------------------------------------------------------------------
# the VP-SDE


def log_alpha(t):
    """log of the marginal mean coefficient alpha_t; t a float or a tensor."""
    return -0.25 * t ** 2 * (BETA_1 - BETA_0) - 0.5 * t * BETA_0


def alpha_sigma(t):
    """alpha_t and sigma_t = sqrt(1 - alpha_t^2) for a tensor t (expm1 keeps sigma accurate near t = 0)."""
    la = log_alpha(t)
    return torch.exp(la), torch.sqrt(-torch.expm1(2 * la))


def beta(t):
    return BETA_0 + t * (BETA_1 - BETA_0)


def log_snr(t):
    """lambda_t = log(alpha_t / sigma_t), decreasing in t."""
    la = log_alpha(t)
    return la - 0.5 * torch.log(-torch.expm1(2 * la))


def t_of_log_snr(lam):
    """The inverse of log_snr: alpha^2 = 1 / (1 + e^{-2 lambda}), then the root of the quadratic log alpha(t) = -c."""
    c = 0.5 * F.softplus(-2 * lam)  # -log alpha
    return 2 * c / (0.5 * BETA_0 + torch.sqrt(0.25 * BETA_0 ** 2 + (BETA_1 - BETA_0) * c))


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def checkpoint_prediction(checkpoint):
    """What a diffusion checkpoint's network predicts (checkpoints from before the option predicted the noise)."""
    return checkpoint["config"].get("prediction", "eps")


def diffusion_loss(model, x0, generator, prediction="eps"):
    """U-ViT's training loss: t ~ U(T_MIN, 1), x_t = alpha_t x0 + sigma_t eps, MSE of the network's noise prediction.
    prediction="v": the MSE of v = alpha_t eps - sigma_t x0 instead (Salimans & Ho 2022)."""
    check_prediction(prediction)
    B = x0.size(0)
    t = T_MIN + (1 - T_MIN) * torch.rand(B, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha, sigma = (a.view(B, 1, 1, 1) for a in alpha_sigma(t))
    out = model(alpha * x0 + sigma * noise, t * 999)
    target = noise if prediction == "eps" else alpha * noise - sigma * x0
    return F.mse_loss(out.float(), target)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (and a copy of any buffers)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# -----------------------------------------------------------------------------
# samplers: eps_fn(x, t) is the noise prediction at time t in [0, 1] (a Python float)


def noise_predictor(model, ctx=nullcontext(), prediction="eps"):
    """Wrap a U-ViC as eps_fn: a batch-wide time t becomes U-ViT's timestep t * 999; the output is float32.
    A v-predicting model's output is turned into the noise: eps = sigma_t x_t + alpha_t v (as alpha^2 + sigma^2 = 1)."""
    check_prediction(prediction)

    def eps_fn(x, t):
        with ctx:
            out = model(x, torch.full((x.size(0),), 999.0 * t, device=x.device)).float()
        if prediction == "eps":
            return out
        alpha, sigma = (a.item() for a in alpha_sigma(torch.as_tensor(t, dtype=torch.float64)))
        return sigma * x + alpha * out
    return eps_fn


@torch.no_grad()
def sample_em(eps_fn, x, steps, generator, progress=False):
    """Euler-Maruyama on the reverse SDE dx = [-1/2 beta x - beta * score] dt + sqrt(beta) dw_bar, integrated
    backwards from t = 1: steps - 1 uniform steps down to T_END, then one noiseless step to t = 0."""
    ts = torch.cat([torch.linspace(1.0, T_END, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    for i in tqdm(range(steps), desc="em", disable=not progress, leave=False):
        t, h = ts[i], ts[i] - ts[i + 1]  # h > 0: the step backwards in time
        b, (_, sigma) = beta(t).item(), alpha_sigma(t)
        eps = eps_fn(x, t.item())
        x = x + h.item() * (0.5 * b * x - b / sigma.item() * eps)  # score = -eps / sigma
        if i < steps - 1:
            x = x + math.sqrt(b * h.item()) * torch.randn(x.shape, generator=generator, device=x.device)
    return x


@torch.no_grad()
def sample_dpm(eps_fn, x, steps, skip="logSNR", progress=False):
    """Multistep DPM-Solver-2 for noise prediction (Lu et al. 2022), from t = 1 to T_END. With lambda = log(alpha/sigma)
    and h = lambda_t - lambda_s, the exact solution of the probability-flow ODE from s to t is
        x_t = (alpha_t / alpha_s) x_s - sigma_t * int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} eps(lambda) d lambda.
    Order 1 (eps constant, = DDIM):  x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s.
    Order 2 adds the slope of eps in lambda from the previous step, D = (eps_s - eps_prev) * h / h_prev:
                                     x_t = ... - 1/2 sigma_t (e^h - 1) D.
    skip: "logSNR" (steps uniform in lambda, DPM-Solver's choice for low resolution) or "time" (uniform in t)."""
    if skip == "logSNR":
        lam = torch.linspace(log_snr(torch.tensor(1.0, dtype=torch.float64)).item(),
                             log_snr(torch.tensor(T_END, dtype=torch.float64)).item(), steps + 1, dtype=torch.float64)
        ts = t_of_log_snr(lam)
    elif skip == "time":
        ts = torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64)
    else:
        raise ValueError(f"skip must be 'logSNR' or 'time', got {skip!r}")
    lams = log_snr(ts)
    (alphas, sigmas), eps_prev, h_prev = alpha_sigma(ts), None, None
    for i in tqdm(range(steps), desc="dpm", disable=not progress, leave=False):
        eps = eps_fn(x, ts[i].item())
        h = (lams[i + 1] - lams[i]).item()
        phi = math.expm1(h)
        x_next = (alphas[i + 1] / alphas[i]).item() * x - sigmas[i + 1].item() * phi * eps
        if eps_prev is not None:
            x_next = x_next - 0.5 * sigmas[i + 1].item() * phi * (eps - eps_prev) * (h / h_prev)
        x, eps_prev, h_prev = x_next, eps, h
    return x


@torch.no_grad()
def generate(eps_fn, num_samples, shape, sampler, steps, seed, device, batch_size=256, progress=False):
    """num_samples images (N, C, H, W) in [-1, 1], in batches; the same seed gives the same images."""
    if sampler not in ("em", "dpm"):
        raise ValueError(f"sampler must be 'em' or 'dpm', got {sampler!r}")
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    batches = range(0, num_samples, batch_size)
    for start in tqdm(batches, desc=f"{sampler} batches", disable=not progress or len(batches) == 1):
        n = min(batch_size, num_samples - start)
        x = torch.randn((n, *shape), generator=generator, device=device)
        inner = progress and len(batches) == 1
        if sampler == "em":
            x = sample_em(eps_fn, x, steps, generator, inner)
        else:
            x = sample_dpm(eps_fn, x, steps, progress=inner)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels, rounded as an 8-bit PNG would store them."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, min_size=64):
    """A grid PNG of images in [-1, 1]; small images are scaled up (nearest) to at least min_size pixels to be seen."""
    from torchvision.utils import make_grid, save_image
    scale = max(1, min_size // images.size(-1))
    images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    save_image(make_grid((images + 1) / 2, nrow=math.ceil(math.sqrt(images.size(0))), padding=2), path)


# -----------------------------------------------------------------------------
# CIFAR-10 and FID

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def load_cifar10(data_dir, train=True):
    """CIFAR-10 as uint8 (N, 3, 32, 32) and int64 labels, through torchvision (downloaded into data_dir once)."""
    from torchvision.datasets import CIFAR10
    try:  # the batch files are pickles: torchvision unpickles them only once their MD5s match the real CIFAR-10's
        dataset = CIFAR10(data_dir, train=train, download=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a corrupted download
        raise SystemExit(f"error: could not download CIFAR-10 into {data_dir}: {err}\nfix: fetch {CIFAR10_URL} "
                         f"yourself and unpack it there:\n  mkdir -p {data_dir} && tar -xzf cifar-10-python.tar.gz "
                         f"-C {data_dir}    # gives {data_dir}/cifar-10-batches-py/data_batch_1 ...") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(dataset.targets)


def inception_weights_path():
    """Where pytorch-fid's Inception loader looks for its weights before it tries to download them."""
    from pytorch_fid.inception import FID_WEIGHTS_URL
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))


def load_inception(device):
    """pytorch-fid's InceptionV3 up to the 2048-d pool3 features; a clear error, not a hung download, when the weight
    file is missing."""
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    path = inception_weights_path()
    if not os.path.exists(path):
        raise SystemExit(f"error: FID needs pytorch-fid's Inception weights at {path} (missing).\nfix: download "
                         f"{FID_WEIGHTS_URL}\n  and place it there: mkdir -p {os.path.dirname(path)} && "
                         f"curl -L -o {path} {FID_WEIGHTS_URL}")
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()


@torch.no_grad()
def inception_features(inception, images, device, batch_size=200):
    """uint8 images (N, 3, H, W) -> pool3 features (N, 2048) float64; pixels go in as [0, 1], as pytorch-fid feeds
    its PNGs (it resizes to 299 and rescales itself)."""
    feats = [inception(images[i:i + batch_size].to(device).float() / 255)[0].flatten(1).double().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats).numpy()


def feature_stats(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), the distance between N(mu1, S1) and N(mu2, S2)."""
    from scipy import linalg
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns about ill-conditioned products: the check below handles them
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # a singular product: nudge both covariances off the boundary
            offset = eps * np.eye(sigma1.shape[0])
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # tiny imaginary parts come from rounding
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def cifar10_train_stats(data_dir, inception, device):
    """mu and sigma of the CIFAR-10 training set's Inception features, computed once and cached in data_dir."""
    path = os.path.join(data_dir, "fid_stats_train.npz")
    if not os.path.exists(path):
        print(f"computing the FID statistics of the CIFAR-10 training set into {path} (once)")
        images, _ = load_cifar10(data_dir, train=True)
        mu, sigma = feature_stats(inception_features(inception, images, device))
        np.savez(path, mu=mu, sigma=sigma)
    stats = np.load(path, allow_pickle=False)
    return stats["mu"], stats["sigma"]

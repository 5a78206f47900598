"""
Diffusion for U-ViC, as U-ViT does it: the continuous-time VP-SDE with noise prediction, two samplers, and FID.

VP-SDE (Song et al. 2021), beta(t) linear from 0.1 to 20 over t in [0, 1]:
    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,     x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I),
    log alpha_t = -1/4 t^2 (beta_1 - beta_0) - 1/2 t beta_0,     sigma_t^2 = 1 - alpha_t^2.
The network eps(x_t, t * 999) predicts the noise; the score is -eps / sigma_t. (Or it predicts v, see PREDICTIONS.)
Samplers: Euler-Maruyama on the reverse SDE (the paper's FID protocol, 1000 steps) and multistep DPM-Solver-2
(Lu et al. 2022, ~50 steps, deterministic). FID: pytorch-fid's Inception pool3 features against CIFAR-10 train stats.

Text-to-image (U-ViT's MS-COCO recipe): discrete-time DDPM with Stable Diffusion's betas (DiscreteSchedule), the network
given the caption's features as context, classifier-free guidance (guided noise = cond + scale * (cond - uncond)) and
multistep DPM-Solver++ (Lu et al. 2022b, the data-prediction form) for sampling.
"""

import math
import os
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from logs import progress as progress_bar

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


# -----------------------------------------------------------------------------
# noise schedules, as the loss, the noise predictor and DPM-Solver++ use them: a time t in (0, 1], the marginal
# x_t = alpha_t x0 + sigma_t eps, and the timestep the network is given


class VPSchedule:
    """U-ViT's CIFAR-10 schedule: the VP-SDE above; training draws t ~ U(T_MIN, 1); the network sees t * 999."""
    t_end = T_END

    def alpha_sigma(self, t):
        return alpha_sigma(t)

    def sample_t(self, n, generator, device):
        return T_MIN + (1 - T_MIN) * torch.rand(n, generator=generator, device=device)

    def timestep(self, t):
        return 999 * t


class DiscreteSchedule:
    """U-ViT's MS-COCO schedule: discrete-time DDPM with Stable Diffusion's betas, linear in sqrt(beta) from 0.00085 to
    0.012 over N = 1000 steps. x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps with abar_n = prod_{i <= n} (1 - beta_i);
    training draws n uniformly from 1..N and gives the network n. Step n is time t = n / N, and between steps log alpha
    is interpolated linearly (DPM-Solver's NoiseScheduleVP('discrete')), so an ODE solver sees a continuous schedule
    and gives the network the fractional step t * N."""

    def __init__(self, beta_start=0.00085, beta_end=0.012, num_steps=1000):
        self.N = num_steps
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
        self.log_alphas = 0.5 * torch.cumsum(torch.log1p(-self.betas), 0)  # log sqrt(abar_n) for n = 1..N
        self.t_end = 1 / num_steps  # step 1, where U-ViT's DPM-Solver stops

    def log_alpha(self, t):
        """log alpha_t, exact at t = n / N and linear in t between (constant below t = 1 / N); float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.log_alphas.to(t.device)
        pos = (t * self.N - 1).clamp(0, self.N - 1)  # a fractional index into the table
        lo = pos.floor().long().clamp(max=self.N - 2)
        frac = pos - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return torch.exp(la), torch.sqrt(-torch.expm1(2 * la))

    def sample_t(self, n, generator, device):
        steps = torch.randint(1, self.N + 1, (n,), generator=generator, device=device)
        return steps.double() / self.N

    def timestep(self, t):
        return t * self.N


VP, SD = VPSchedule(), DiscreteSchedule()
SCHEDULES = {"vp": VP, "sd": SD}  # the names train_diffusion.py's --noise_schedule takes


def get_schedule(name):
    if name not in SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def checkpoint_prediction(checkpoint):
    """What a diffusion checkpoint's network predicts (checkpoints from before the option predicted the noise)."""
    return checkpoint["config"].get("prediction", "eps")


def checkpoint_schedule(checkpoint):
    """The noise schedule a diffusion checkpoint was trained on (checkpoints from before the option: the VP-SDE)."""
    return checkpoint["config"].get("noise_schedule", "vp")


def diffusion_loss(model, x0, generator, prediction="eps", schedule=None, context=None):
    """U-ViT's training loss: t from the schedule (VP: t ~ U(T_MIN, 1)), x_t = alpha_t x0 + sigma_t eps, MSE of the
    network's noise prediction; context: the text features of a text-to-image model (B, L, D).
    prediction="v": the MSE of v = alpha_t eps - sigma_t x0 instead (Salimans & Ho 2022)."""
    check_prediction(prediction)
    schedule = schedule or VP
    B = x0.size(0)
    t = schedule.sample_t(B, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha, sigma = (a.to(x0.dtype).view(B, 1, 1, 1) for a in schedule.alpha_sigma(t))
    xt, timesteps = alpha * x0 + sigma * noise, schedule.timestep(t).float()
    out = model(xt, timesteps) if context is None else model(xt, timesteps, context)
    target = noise if prediction == "eps" else alpha * noise - sigma * x0
    return F.mse_loss(out.float(), target)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (and a copy of any buffers); model's may be
    sharded (FSDP), the EMA's are whole."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if hasattr(p, "full_tensor"):  # a shard of FSDP's (DTensor): gathered whole (every rank calls this in turn)
            p = p.full_tensor()
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# -----------------------------------------------------------------------------
# samplers: eps_fn(x, t) is the noise prediction at time t in [0, 1] (a Python float)


def noise_predictor(model, ctx=nullcontext(), prediction="eps", schedule=None, context=None, empty_context=None,
                    cfg_scale=0.0):
    """Wrap a U-ViC as eps_fn: a batch-wide time t becomes the network's timestep (t * 999 for the VP-SDE, t * 1000
    for the discrete schedule); the output is float32. A v-predicting model's output is turned into the noise:
    eps = sigma_t x_t + alpha_t v (as alpha^2 + sigma^2 = 1).
    A text-to-image model gets context (B, L, D); with cfg_scale != 0 also the empty caption's features empty_context
    (1, L, D), and the prediction is classifier-free guided: cond + cfg_scale * (cond - uncond), both from one batch."""
    check_prediction(prediction)
    schedule = schedule or VP

    def eps_fn(x, t):
        timesteps = torch.full((x.size(0),), schedule.timestep(t), device=x.device)
        with ctx:
            if context is None:
                out = model(x, timesteps).float()
            elif cfg_scale == 0:
                out = model(x, timesteps, context).float()
            else:
                both = torch.cat([context, empty_context.expand_as(context)])
                cond, uncond = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).float().chunk(2)
                out = cond + cfg_scale * (cond - uncond)
        if prediction == "eps":
            return out
        alpha, sigma = (a.item() for a in schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64)))
        return sigma * x + alpha * out
    return eps_fn


@torch.no_grad()
def sample_em(eps_fn, x, steps, generator, progress=False):
    """Euler-Maruyama on the reverse SDE dx = [-1/2 beta x - beta * score] dt + sqrt(beta) dw_bar, integrated
    backwards from t = 1: steps - 1 uniform steps down to T_END, then one noiseless step to t = 0."""
    ts = torch.cat([torch.linspace(1.0, T_END, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    for i in progress_bar(range(steps), desc="em", disable=not progress, leave=False):
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
    for i in progress_bar(range(steps), desc="dpm", disable=not progress, leave=False):
        eps = eps_fn(x, ts[i].item())
        h = (lams[i + 1] - lams[i]).item()
        phi = math.expm1(h)
        x_next = (alphas[i + 1] / alphas[i]).item() * x - sigmas[i + 1].item() * phi * eps
        if eps_prev is not None:
            x_next = x_next - 0.5 * sigmas[i + 1].item() * phi * (eps - eps_prev) * (h / h_prev)
        x, eps_prev, h_prev = x_next, eps, h
    return x


@torch.no_grad()
def sample_dpm_pp(eps_fn, x, steps, schedule, order=2, progress=False):
    """Multistep DPM-Solver++ (Lu et al. 2022b), the data-prediction form U-ViT samples MS-COCO with, from t = 1 to
    schedule.t_end in steps uniform in t (DPM-Solver's choice for discrete schedules). With the data prediction
    x0 = (x - sigma eps) / alpha and h = lambda_t - lambda_s > 0, the exact solution of the probability-flow ODE is
        x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) d lambda.
    Order 1 (x0 constant, = DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s.
    Order 2 ("2M") uses x0_s + (x0_s - x0_prev) / (2r) instead, r = h_prev / h: a line through the last two x0s.
    (U-ViT's own runs used DPM-Solver's singlestep order-3 variant; 2M is the form its authors advise with guidance.)"""
    ts = torch.linspace(1.0, schedule.t_end, steps + 1, dtype=torch.float64)
    alphas, sigmas = schedule.alpha_sigma(ts)
    lams = torch.log(alphas / sigmas)
    x0_prev, h_prev = None, None
    for i in progress_bar(range(steps), desc="dpm++", disable=not progress, leave=False):
        x0 = (x - sigmas[i].item() * eps_fn(x, ts[i].item())) / alphas[i].item()
        h = (lams[i + 1] - lams[i]).item()
        d = x0 if order == 1 or x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        x = (sigmas[i + 1] / sigmas[i]).item() * x - alphas[i + 1].item() * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def generate_guided(model, context_batches, empty_context, cfg_scale, shape, steps, seed, device, schedule,
                    prediction="eps", ctx=nullcontext(), progress=False):
    """Text-to-image samples, one per row of each (n, L, D) context batch that context_batches yields: DPM-Solver++ on
    the classifier-free guided noise prediction. Yields the samples (n, *shape) batch by batch (latents for MS-COCO:
    the caller decodes them); the same seed and batches give the same samples."""
    generator = torch.Generator(device).manual_seed(seed)
    for context in context_batches:
        context = context.to(device)
        x = torch.randn((context.size(0), *shape), generator=generator, device=device)
        eps_fn = noise_predictor(model, ctx, prediction, schedule, context, empty_context.to(device), cfg_scale)
        yield sample_dpm_pp(eps_fn, x, steps, schedule, progress=progress)


@torch.no_grad()
def generate(eps_fn, num_samples, shape, sampler, steps, seed, device, batch_size=256, progress=False, schedule=None):
    """num_samples images (N, C, H, W) in [-1, 1], in batches; the same seed gives the same images.
    "em" and "dpm" integrate the VP-SDE; "dpm++" (DPM-Solver++) follows any schedule, the discrete one too."""
    if sampler not in ("em", "dpm", "dpm++"):
        raise ValueError(f"sampler must be 'em', 'dpm' or 'dpm++', got {sampler!r}")
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    batches = range(0, num_samples, batch_size)
    for start in progress_bar(batches, desc=f"{sampler} batches", disable=not progress or len(batches) == 1):
        n = min(batch_size, num_samples - start)
        x = torch.randn((n, *shape), generator=generator, device=device)
        inner = progress and len(batches) == 1
        if sampler == "em":
            x = sample_em(eps_fn, x, steps, generator, inner)
        elif sampler == "dpm":
            x = sample_dpm(eps_fn, x, steps, progress=inner)
        else:
            x = sample_dpm_pp(eps_fn, x, steps, schedule or VP, progress=inner)
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


def save_captioned_grid(images, captions, path, min_size=128, lines=3, font_size=16):
    """A grid PNG of images in [-1, 1], each with its caption written underneath in a font_size-pixel font (wrapped at
    word boundaries to the image's width, at most `lines` lines); small images are scaled up (nearest) to at least
    min_size pixels."""
    from PIL import Image, ImageDraw, ImageFont
    scale = max(1, min_size // images.size(-1))
    pixels = to_uint8(images).repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)
    try:  # Pillow 10.1 and later: a scalable font (FreeType), so the size and spacing are what we ask
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # older Pillow: its small bitmap font
        font, font_size = ImageFont.load_default(), 11
    size, pad, gap = pixels.shape[1], 8, 3
    line_height, space = font_size + gap, max(4, round(0.35 * font_size))  # (space: pixels between words)

    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text):
        return scratch.textlength(text, font=font)
    wrapped = [wrap_to_width(caption.split(), size, measure, space)[:lines] for caption in captions[:len(pixels)]]
    lines = max(map(len, wrapped), default=1)  # room for the longest caption only
    cols = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / cols)
    cell_w, cell_h = size + pad, size + gap + lines * line_height + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption_lines) in enumerate(zip(pixels, wrapped)):
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        canvas.paste(Image.fromarray(image), (x, y))
        for j, line in enumerate(caption_lines):
            left = x
            for word in line:  # word by word, with a wide space: the default font's own is narrow ("a yellowsquare")
                draw.text((left, y + size + gap + j * line_height), word, fill="black", font=font)
                left += measure(word) + space
    canvas.save(path)


def wrap_to_width(words, width, measure, space):
    """words in lines (lists of words) no wider than width, as measure(word) and a space between words say; a word
    wider than that has a line of its own."""
    lines, used = [], 0
    for word in words:
        if lines and used + space + measure(word) <= width:
            lines[-1].append(word)
            used += space + measure(word)
        else:
            lines.append([word])
            used = measure(word)
    return lines


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
        with open(path + ".tmp", "wb") as f:  # written whole, then renamed: an interrupted run leaves no half cache
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(path + ".tmp", path)
    stats = np.load(path, allow_pickle=False)
    return stats["mu"], stats["sigma"]

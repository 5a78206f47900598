"""
The shapes demos' data: one coloured circle, square or triangle per image, drawn on the fly (no download); for the
text-to-image demo its caption, "a <colour> <shape>", as one-hot word features in place of CLIP's; the prompt parser;
and the scorer that says whether a generated image shows its prompt. train_diffusion.py trains on them
(--dataset=shapes, shapes_t2i), sample.py draws prompts and scores samples with them.
"""

import torch
import torch.nn.functional as F

COLORS = torch.tensor([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.10]])
BACKGROUND = 0.1  # dark grey
COLOR_NAMES = ("red", "green", "blue", "yellow")  # the rows of COLORS
SHAPE_NAMES = ("circle", "square", "triangle")  # kind 0, 1 and 2
R_MIN, R_MAX = 0.3, 0.42  # half the width of a shape, as a fraction of the image


def shape_masks(kind, r, size):
    """Boolean masks (n, size, size) of centred shapes: kind (n,) in 0..2 and half-widths r (n,) in pixels."""
    kind, r = kind.view(-1, 1, 1), r.view(-1, 1, 1)
    offset = torch.arange(size, device=r.device) + 0.5 - size / 2  # pixel centres from the image centre
    dx, dy = offset.view(1, 1, size), offset.view(1, size, 1)  # broadcast with r: masks are (n, size, size)
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)  # apex up, base 2r wide
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def captioned_shapes_batch(n, size, generator, device):
    """n images (n, 3, size, size) in [-1, 1]: one circle, square or triangle in red, green, blue or yellow,
    centred, of a random size, on a plain background; and what they show, kind (n,) and color (n,). (Centred because
    the demo's small U-ViC, given shapes at random places as well, still drew ragged blobs after the same training;
    centred, it draws the shapes.)"""
    kind = torch.randint(3, (n,), generator=generator, device=device)
    color = torch.randint(len(COLORS), (n,), generator=generator, device=device)
    r = size * (R_MIN + (R_MAX - R_MIN) * torch.rand((n,), generator=generator, device=device))  # half the width
    mask = shape_masks(kind, r, size).unsqueeze(1)  # (n, 1, s, s)
    images = torch.where(mask, COLORS.to(device)[color].view(n, 3, 1, 1), torch.tensor(BACKGROUND, device=device))
    return images * 2 - 1, kind, color


def shapes_batch(n, size, generator, device):
    return captioned_shapes_batch(n, size, generator, device)[0]


# the demo's captions, "a <colour> <shape>", each word a one-hot vector (a stand-in for CLIP's features); the empty
# caption, for guidance, is three blanks
DEMO_WORDS = ("", "a", *COLOR_NAMES, *SHAPE_NAMES)
DEMO_PROMPTS = [f"a {c} {k}" for k in SHAPE_NAMES for c in COLOR_NAMES]


def parse_demo_prompt(prompt):
    """(kind, color) of "a <colour> <shape>"; a clear error for anything else."""
    words = prompt.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOR_NAMES or words[2] not in SHAPE_NAMES:
        raise SystemExit(f"error: the shapes demo draws \"a <colour> <shape>\" with a colour from "
                         f"{', '.join(COLOR_NAMES)} and a shape from {', '.join(SHAPE_NAMES)}; got {prompt!r}")
    return SHAPE_NAMES.index(words[2]), COLOR_NAMES.index(words[1])


def demo_caption_features(kind, color):
    """One-hot word features (n, 3, len(DEMO_WORDS)) of "a <colour> <shape>"; kind or color None: the empty caption."""
    if kind is None:
        return F.one_hot(torch.zeros(1, 3, dtype=torch.long), len(DEMO_WORDS)).float()
    ids = torch.stack([torch.ones_like(kind), DEMO_WORDS.index(COLOR_NAMES[0]) + color,
                       DEMO_WORDS.index(SHAPE_NAMES[0]) + kind], dim=1)
    return F.one_hot(ids, len(DEMO_WORDS)).float()


def demo_prompt_features(prompts, device="cpu"):
    kind, color = (torch.tensor(v, device=device) for v in zip(*map(parse_demo_prompt, prompts)))
    return demo_caption_features(kind, color)


def score_shapes(images, kind, color, threshold=0.6, min_iou=0.5):
    """Does each image (n, 3, s, s) in [-1, 1] show its prompt's shape (kind) in its colour? The foreground is every
    pixel further than threshold from the background; its mean colour must be nearest to the prompt's colour, and
    among templates of the three shapes at every size the data uses, the prompt's shape must overlap the foreground
    best, with an intersection over union of at least min_iou (so a shapeless blob does not count).
    Returns the matches (n,) bool and the best IoU (n,)."""
    n, size = images.size(0), images.size(-1)
    palette = COLORS.to(images.device) * 2 - 1  # (4, 3)
    foreground = (images - (BACKGROUND * 2 - 1)).norm(dim=1) > threshold  # (n, s, s)
    area = foreground.sum((1, 2)).clamp(min=1)
    mean_color = (images * foreground.unsqueeze(1)).sum((2, 3)) / area.unsqueeze(1)  # (n, 3)
    seen_color = torch.cdist(mean_color, palette).argmin(1)
    radii = size * torch.linspace(R_MIN, R_MAX, 13, device=images.device)
    kinds = torch.arange(3, device=images.device).repeat_interleave(len(radii))
    templates = shape_masks(kinds, radii.repeat(3), size)  # (3 * 13, s, s)
    inter = (foreground.unsqueeze(1) & templates).sum((2, 3))  # (n, 39)
    union = (foreground.unsqueeze(1) | templates).sum((2, 3))
    iou = (inter / union).view(n, 3, len(radii)).amax(2)  # best size per shape: (n, 3)
    best_iou, seen_kind = iou.max(1)
    matches = (seen_color == color) & (seen_kind == kind) & (best_iou >= min_iou) & foreground.any(dim=(1, 2))
    return matches, best_iou

"""
MS-COCO 2014 for the text-to-image U-ViC, prepared as U-ViT prepares it: every image center-cropped to 256 and encoded
by Stable Diffusion's KL-f8 autoencoder (the latent's mean and log-variance: the trainer draws a latent from them each
time), every caption through CLIP ViT-L/14's text encoder (77 tokens, last hidden state), and the empty caption's
features, which stand in for "no text" in classifier-free guidance.

    python data/prepare_coco.py --coco_dir=PATH/coco            # -> data/coco; a GPU is used when there is one
    python data/prepare_coco.py --coco_dir=PATH/coco --vae=DIR --text_encoder=DIR   # local copies of the models

--coco_dir is the layout the official site ships: train2014/*.jpg, val2014/*.jpg and
annotations/captions_{train,val}2014.json. --vae is a diffusers AutoencoderKL and --text_encoder a transformers
CLIPTextModel with its CLIPTokenizer: each a hub id (downloaded on first use) or a local folder; "owner/repo/subfolder"
reads a subfolder of a hub repository. The defaults are the models U-ViT used, the autoencoder of Stable Diffusion v1
(CompVis/stable-diffusion-v1-4/vae) and openai/clip-vit-large-patch14.

Output: per split (train: 82,783 images, val: 40,504), shards of --shard_size images in image-id order, each a folder of
.npy files that the trainer memory-maps (np.load(mmap_mode="r")), float16 (about 50 GB for train and 25 GB for val,
nearly all of it caption features):
    <split>/shard_00000/moments.npy        (n, 8, 32, 32)  the latent's mean and log-variance, concatenated
                        context.npy        (m, 77, 768)    CLIP features of the n images' m captions
                        caption_start.npy  (n + 1,) int64  image i's captions: rows caption_start[i]:caption_start[i+1]
                        captions.json      the images' ids, file names and caption texts
    empty_context.npy (77, 768); meta.json: the models (and a fingerprint of their weights), shapes and counts.
A shard is written into a temporary folder that is renamed when complete: re-running skips finished shards and redoes an
interrupted one. A folder prepared with another autoencoder or text encoder (other weights) is refused.
"""

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    from logs import progress
except ImportError:  # run as python data/prepare_coco.py: the project's modules are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from logs import progress

DEFAULT_VAE = "CompVis/stable-diffusion-v1-4/vae"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
SPLITS = ("train", "val")
ARRAYS = ("moments", "context", "caption_start")
COCO_LAYOUT = ("{split}2014/", "annotations/captions_{split}2014.json")

# -----------------------------------------------------------------------------
# the raw dataset


def read_annotations(coco_dir, split):
    """[{"id", "file_name", "captions"}] of a split's images that have captions, sorted by image id (as U-ViT)."""
    path = os.path.join(coco_dir, "annotations", f"captions_{split}2014.json")
    folder = os.path.join(coco_dir, f"{split}2014")
    if not os.path.isfile(path) or not os.path.isdir(folder):
        expected = ", ".join(os.path.join(coco_dir, p.format(split=split)) for p in COCO_LAYOUT)
        raise SystemExit(f"error: MS-COCO 2014 is not in {coco_dir}: expected {expected}.\nfix: download "
                         f"{split}2014.zip and annotations_trainval2014.zip from https://cocodataset.org/#download, "
                         f"unzip them into one folder and pass it as --coco_dir")
    with open(path) as f:
        data = json.load(f)
    captions = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    images = sorted(data["images"], key=lambda im: im["id"])
    return [{"id": im["id"], "file_name": im["file_name"], "captions": captions[im["id"]]}
            for im in images if im["id"] in captions]


def load_image(path, size):
    """U-ViT's crop: the central square of the image, resized to size x size (Lanczos); uint8 (size, size, 3)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as err:
        raise SystemExit(f"error: cannot read the image {path}: {err}") from None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def load_images(paths, size, pool):
    """uint8 (n, 3, size, size); JPEG decoding in threads (PIL releases the GIL), no forked processes."""
    return torch.from_numpy(np.stack(list(pool.map(lambda p: load_image(p, size), paths)))).permute(0, 3, 1, 2)


# -----------------------------------------------------------------------------
# the autoencoder and the text encoder (diffusers and transformers are imported only here)


def hub_location(name):
    """(path or hub id, subfolder) of a --vae / --text_encoder value: a local folder, "owner/repo" or
    "owner/repo/subfolder"."""
    if os.path.isdir(name):
        return name, None
    if name.startswith(("/", ".", "~")):  # a path, not a hub id
        raise FileNotFoundError(f"no such folder: {name}")
    parts = name.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def model_load_error(what, name, err, fix):
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return SystemExit(f"error: cannot load the {what} {name!r} ({type(err).__name__}: {message}).\n"
                      f"It is a hub id (downloaded on first use, which needs the internet) or a local folder. "
                      f"Offline: {fix}")


def load_vae(name, device="cpu"):
    """A diffusers AutoencoderKL, frozen, in eval mode, and the fingerprint of its weights."""
    try:
        from diffusers import AutoencoderKL
        path, subfolder = hub_location(name)
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    except Exception as err:  # ImportError, a missing folder, no network, not an autoencoder
        raise model_load_error("autoencoder (--vae)", name, err,
                               "pip install diffusers; on a machine with internet, huggingface-cli download "
                               "CompVis/stable-diffusion-v1-4 --include 'vae/*' --local-dir sd-v1-4, copy the "
                               "folder here and pass --vae=sd-v1-4/vae") from None
    return vae.eval().requires_grad_(False).to(device), fingerprint(vae)


def load_text_encoder(name, device="cpu"):
    """A transformers CLIPTextModel and its CLIPTokenizer from one folder or hub id, and the model's fingerprint."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
        path, subfolder = hub_location(name)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tokenizer = CLIPTokenizer.from_pretrained(path, **kwargs)
        model = CLIPTextModel.from_pretrained(path, **kwargs)
    except Exception as err:
        raise model_load_error("text encoder (--text_encoder)", name, err,
                               "pip install transformers; on a machine with internet, huggingface-cli download "
                               "openai/clip-vit-large-patch14 --local-dir clip-l14, copy the folder here and pass "
                               "--text_encoder=clip-l14") from None
    return (tokenizer, model.eval().requires_grad_(False).to(device)), fingerprint(model)


def fingerprint(module):
    """Numbers that tell two sets of weights apart: how many, their sum and their sum of squares (float64)."""
    tensors = [t.detach().double().cpu() for t in module.state_dict().values() if t.is_floating_point()]
    return {"tensors": len(tensors), "numel": sum(t.numel() for t in tensors),
            "sum": float(sum(t.sum() for t in tensors)), "sum_sq": float(sum((t * t).sum() for t in tensors))}


def same_weights(a, b):
    return a["tensors"] == b["tensors"] and a["numel"] == b["numel"] and all(
        abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in ("sum", "sum_sq"))


@torch.no_grad()
def encode_images(vae, images, device):
    """uint8 (n, 3, H, W) -> the latent distribution's mean and log-variance, (n, 2 * 4, H / 8, W / 8) float32."""
    x = images.to(device).float() / 127.5 - 1
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()


@torch.no_grad()
def encode_captions(text_encoder, captions, device):
    """CLIP's last hidden state for each caption, padded or cut to the encoder's 77 positions: (n, 77, 768)."""
    tokenizer, model = text_encoder
    length = model.config.max_position_embeddings
    ids = tokenizer(list(captions), truncation=True, max_length=length, padding="max_length",
                    return_tensors="pt").input_ids
    return model(input_ids=ids.to(device)).last_hidden_state.float().cpu()


def load_prepared_vae(meta, device, name=None):
    """The autoencoder a folder was prepared with (or another one, name), to decode samples; a changed model under the
    same name is an error, since its latents would not be the ones the U-ViC learned."""
    vae, weights = load_vae(name or meta["vae"], device)
    if name is None and not same_weights(weights, meta["vae_fingerprint"]):
        raise SystemExit(f"error: the autoencoder {meta['vae']!r} now has other weights than when the features were "
                         "prepared; pass the original with --vae")
    return vae


@torch.no_grad()
def decode_latents(vae, z, latent_scale, batch_size=50):
    """Latents (n, 4, h, w) as the U-ViC samples them (scaled by latent_scale) -> images (n, 3, 8h, 8w) in [-1, 1];
    in batches, since the decoder needs far more memory than the U-ViC."""
    return torch.cat([vae.decode(z[i:i + batch_size] / latent_scale).sample.float().clamp(-1, 1)
                      for i in range(0, len(z), batch_size)])


# -----------------------------------------------------------------------------
# writing shards


def shard_folder(out_dir, split, index):
    return os.path.join(out_dir, split, f"shard_{index:05d}")


def save_npy_atomic(path, array):
    tmp = f"{path}.tmp.{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_shard(entries, folder, images_dir, models, config, device, pool, bar):
    """Encode one shard's images and captions into folder.tmp, then rename it to folder."""
    vae, text_encoder = models
    moments, contexts = [], []
    for i in range(0, len(entries), config.batch_size):
        batch = entries[i:i + config.batch_size]
        images = load_images([os.path.join(images_dir, e["file_name"]) for e in batch], config.image_size, pool)
        moments.append(encode_images(vae, images, device).half())
        contexts.append(encode_captions(text_encoder, [c for e in batch for c in e["captions"]], device).half())
        bar.update(len(batch))
    tmp = f"{folder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier run's unfinished shard
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "moments.npy"), torch.cat(moments).numpy())
    np.save(os.path.join(tmp, "context.npy"), torch.cat(contexts).numpy())
    np.save(os.path.join(tmp, "caption_start.npy"), np.cumsum([0] + [len(e["captions"]) for e in entries]))
    with open(os.path.join(tmp, "captions.json"), "w") as f:
        json.dump(entries, f)
    os.replace(tmp, folder)  # a folder rename is atomic: a shard folder is always complete


def check_same_recipe(meta, recipe, out_dir):
    """Refuse to add to a folder prepared from other models, sizes or images."""
    lines = []
    for what, key in (("autoencoder", "vae"), ("text encoder", "text_encoder")):
        if not same_weights(meta[f"{key}_fingerprint"], recipe[f"{key}_fingerprint"]):
            lines.append(f"  {what}: the folder was made with {meta[key]!r}, whose weights differ from {recipe[key]!r}")
    for key in ("image_size", "shard_size", "latent_shape", "context_shape", "splits"):
        if meta[key] != recipe[key]:
            lines.append(f"  {key}: has {meta[key]!r}, asked for {recipe[key]!r}")
    if lines:
        raise SystemExit(f"error: {out_dir} was prepared differently:\n" + "\n".join(lines) +
                         "\ndelete the folder or choose another --out_dir")


def prepare(config):
    """Encode MS-COCO into config.out_dir; finished shards of an earlier run with the same recipe are kept."""
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    entries = {split: read_annotations(config.coco_dir, split) for split in SPLITS}
    vae, vae_fingerprint = load_vae(config.vae, device)
    text_encoder, text_fingerprint = load_text_encoder(config.text_encoder, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder block but the last halves the size
    latent_shape = [vae.config.latent_channels, config.image_size // factor, config.image_size // factor]
    empty_context = encode_captions(text_encoder, [""], device)[0]
    recipe = {"coco_dir": os.path.abspath(config.coco_dir), "vae": config.vae, "vae_fingerprint": vae_fingerprint,
              "text_encoder": config.text_encoder, "text_encoder_fingerprint": text_fingerprint,
              "image_size": config.image_size, "shard_size": config.shard_size, "latent_shape": latent_shape,
              "context_shape": list(empty_context.shape),
              "splits": {split: {"images": len(e), "captions": sum(len(x["captions"]) for x in e),
                                 "shards": -(-len(e) // config.shard_size)} for split, e in entries.items()}}
    meta_path = os.path.join(config.out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            check_same_recipe(json.load(f), recipe, config.out_dir)
    os.makedirs(config.out_dir, exist_ok=True)
    save_npy_atomic(os.path.join(config.out_dir, "empty_context.npy"), empty_context.half().numpy())
    with open(f"{meta_path}.tmp", "w") as f:
        json.dump(recipe, f, indent=2)
    os.replace(f"{meta_path}.tmp", meta_path)
    with ThreadPoolExecutor(8) as pool:
        for split in SPLITS:
            os.makedirs(os.path.join(config.out_dir, split), exist_ok=True)
            images_dir = os.path.join(config.coco_dir, f"{split}2014")
            with progress(total=len(entries[split]), unit="img", desc=f"encoding {split}") as bar:
                for index in range(recipe["splits"][split]["shards"]):
                    shard = entries[split][index * config.shard_size:(index + 1) * config.shard_size]
                    folder = shard_folder(config.out_dir, split, index)
                    if os.path.isdir(folder):  # finished by an earlier run
                        bar.update(len(shard))
                        continue
                    write_shard(shard, folder, images_dir, (vae, text_encoder), config, device, pool, bar)
    counts = ", ".join(f"{s}: {v['images']:,} images, {v['captions']:,} captions" for s, v in recipe["splits"].items())
    print(f"wrote {config.out_dir} ({counts}); latents {latent_shape}, text features {list(empty_context.shape)}")
    return recipe


# -----------------------------------------------------------------------------
# reading: what train_diffusion.py and sample.py use


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no prepared MS-COCO features in {data_dir} ({path} is missing).\nfix: prepare them "
                         f"from the MS-COCO 2014 folder (train2014/, val2014/, annotations/):\n  python "
                         f"data/prepare_coco.py --coco_dir=PATH/TO/coco --out_dir={data_dir}")
    with open(path) as f:
        return json.load(f)


def load_array(path, shape, dtype):
    """A memory-mapped .npy of the expected shape; a clear error for a truncated or foreign file."""
    fix = f"delete {os.path.dirname(path)} and re-run data/prepare_coco.py, which redoes that shard"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {path} is missing, truncated or not an .npy file ({err}): {fix}") from None
    if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
        raise SystemExit(f"error: {path} holds {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} "
                         f"{tuple(shape)}: {fix}")
    return array


class CocoFeatures:
    """One split of a prepared folder, memory-mapped: len() images; read() draws the moments of images and the
    features of one of each image's captions."""

    def __init__(self, data_dir, split):
        self.meta = read_meta(data_dir)
        self.empty_context = load_array(os.path.join(data_dir, "empty_context.npy"), self.meta["context_shape"],
                                        np.float16)
        info = self.meta["splits"][split]
        self.shards, self.entries = [], []
        for index in range(info["shards"]):
            folder = shard_folder(data_dir, split, index)
            if not os.path.isdir(folder):
                raise SystemExit(f"error: {folder} is missing: the {split} split is incomplete. Re-run "
                                 f"data/prepare_coco.py --coco_dir={self.meta['coco_dir']} --out_dir={data_dir} "
                                 "(it keeps the finished shards)")
            with open(os.path.join(folder, "captions.json")) as f:
                entries = json.load(f)
            n, m = len(entries), sum(len(e["captions"]) for e in entries)
            self.shards.append({
                "moments": load_array(os.path.join(folder, "moments.npy"),
                                      [n, 2 * self.meta["latent_shape"][0], *self.meta["latent_shape"][1:]],
                                      np.float16),
                "context": load_array(os.path.join(folder, "context.npy"), [m, *self.meta["context_shape"]],
                                      np.float16),
                "caption_start": load_array(os.path.join(folder, "caption_start.npy"), [n + 1], np.int64)})
            self.entries += entries
        self.image_shard = np.repeat(np.arange(len(self.shards)), [len(s["moments"]) for s in self.shards])
        self.image_local = np.concatenate([np.arange(len(s["moments"])) for s in self.shards])

    def __len__(self):
        return len(self.entries)

    def caption_features(self, caption_ids):
        """Float32 (n, 77, D) features of the captions (i, k): image i's caption k."""
        rows = []
        for i, k in caption_ids:
            shard = self.shards[self.image_shard[i]]
            rows.append(shard["context"][shard["caption_start"][self.image_local[i]] + k])
        return torch.from_numpy(np.stack(rows)).float()

    def caption_texts(self, caption_ids):
        return [self.entries[i]["captions"][k] for i, k in caption_ids]

    def read(self, image_ix, caption_u):
        """Float32 tensors: moments (B, 8, h, w) of the images image_ix, and the features (B, 77, D) of caption
        floor(u * count) of each, u in [0, 1)."""
        moments = [self.shards[self.image_shard[i]]["moments"][self.image_local[i]] for i in image_ix]
        caption_ids = [(i, int(u * len(self.entries[i]["captions"]))) for i, u in zip(image_ix, caption_u)]
        return torch.from_numpy(np.stack(moments)).float(), self.caption_features(caption_ids)

    def sample_caption_ids(self, start, n):
        """The captions (i, k) that samples start..start+n are drawn for: sample j gets image j mod len(self) and
        its caption (j div len(self)) mod count, so the first len(self) samples cover every image once."""
        ids = []
        for j in range(start, start + n):
            i = j % len(self)
            ids.append((i, (j // len(self)) % len(self.entries[i]["captions"])))
        return ids


# -----------------------------------------------------------------------------
# FID reference statistics of the val2014 images, cropped as the training images are


def val_fid_stats(data_dir, inception, device, batch_size=200):
    """mu and sigma of the Inception features of every val2014 image (center-cropped to the prepared size), computed
    once from the raw images and cached in data_dir (U-ViT's fid_stats_mscoco256_val.npz is the same statistic)."""
    import diffusion
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, f"fid_stats_val2014_{meta['image_size']}.npz")
    if not os.path.exists(path):
        entries = read_annotations(meta["coco_dir"], "val")
        folder = os.path.join(meta["coco_dir"], "val2014")
        print(f"computing the FID statistics of {len(entries):,} val2014 images into {path} (once)")
        features = []
        with ThreadPoolExecutor(8) as pool:
            for i in progress(range(0, len(entries), batch_size), desc="val2014 features"):
                paths = [os.path.join(folder, e["file_name"]) for e in entries[i:i + batch_size]]
                images = load_images(paths, meta["image_size"], pool)
                features.append(diffusion.inception_features(inception, images, device, batch_size))
        mu, sigma = diffusion.feature_stats(np.concatenate(features))
        np.savez(f"{path}.tmp.npz", mu=mu, sigma=sigma)
        os.replace(f"{path}.tmp.npz", path)
    return read_fid_stats(path)


def read_fid_stats(path):
    """mu and sigma from an .npz (ours, or U-ViT's / pytorch-fid's files, which use the same two names)."""
    try:
        stats = np.load(path, allow_pickle=False)
        return stats["mu"], stats["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: cannot read FID statistics (arrays mu and sigma) from {path}: {err}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco_dir", required=True, help="MS-COCO 2014: train2014/, val2014/, annotations/")
    parser.add_argument("--out_dir", default="data/coco", help="where the shards go (default data/coco)")
    parser.add_argument("--vae", default=DEFAULT_VAE, help=f"diffusers AutoencoderKL (default {DEFAULT_VAE})")
    parser.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER,
                        help=f"transformers CLIPTextModel + CLIPTokenizer (default {DEFAULT_TEXT_ENCODER})")
    parser.add_argument("--image_size", type=int, default=256, help="center crops of this size (default 256)")
    parser.add_argument("--shard_size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--batch_size", type=int, default=32, help="images encoded at once (default 32)")
    parser.add_argument("--device", default="auto", help="auto: cuda if there is a GPU, else cpu")
    config = parser.parse_args(argv)
    if config.image_size % 8 or config.shard_size < 1 or config.batch_size < 1:
        parser.error("--image_size must be a multiple of 8, --shard_size and --batch_size positive")
    return prepare(config)


if __name__ == "__main__":
    main()

"""
The authors' released checkpoints as nanoCog networks, checked tensor by tensor (every tensor used, every shape right):

1) their Cogformer / Transformer LM (trestad/CogAttn: cog_ckpt_100.00_Bi.pt, vanilla_ckpt_100.00_Bi.pt):
   load_cogformer(path);
2) U-ViT state dicts (U-ViT's libs/uvit_t2i.py network, nnet_ema.pth; the authors' U-ViC is the same network with
   Cog attention): load_uvic(path).
"""

import math
import os
import re

import torch

from checkpoint import DamagedFile, RefusedFile, load_plain
from model import Cogformer, CogformerConfig, UViC, UViCConfig, rope_tables

# -----------------------------------------------------------------------------
# the authors' LM checkpoint format (their Cogformer/model.py and attention.py):
#   {"model_cfg": {vocab_size, n_layers, max_seq_length, dim, n_heads, head_dim, hidden_dim, norm_eps,
#                  attn_type ("np": Cog in all but the first and last layer, "vanilla": softmax), shared_expert_recipe},
#    "model": state dict}
# Their projections are (in, out) matrices used as x @ W: ours are nn.Linear weights, (out, in), so each is transposed.
# Their RoPE turns the pairs (2i, 2i+1) of a head as complex numbers; ours turns (i, i + hs/2). A head's q and k
# components are therefore reordered, evens first, then odds: q.k is unchanged by a permutation applied to both,
# and each pair lands where our rotation expects it with the same frequency (theta 10000 in both).

AUTHORS_IGNORED = ("freqs_cis", "shortcut_bar")  # their RoPE table (recomputed here) and an unused buffer
AUTHORS_CONFIG_KEYS = ("vocab_size", "n_layers", "max_seq_length", "dim", "n_heads", "head_dim", "hidden_dim",
                       "norm_eps", "attn_type", "shared_expert_recipe")


def load_weights_file(path):
    """What a torch.save file holds (a released checkpoint, a state dict), read safely (checkpoint.load_plain: tensors
    and plain containers only, so no code from the file runs)."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path} (no such file)")
    try:
        return load_plain(path, "cpu")
    except RefusedFile as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    except DamagedFile as err:
        raise ValueError(f"cannot read {path}: it is damaged or not a torch.save file ({err})") from None


def is_authors_lm(checkpoint):
    """True for a dict in the authors' LM format (a model_cfg and a state dict)."""
    return isinstance(checkpoint, dict) and "model_cfg" in checkpoint and "model" in checkpoint


def authors_config(cfg):
    """(our CogformerConfig, the number of FFN experts in the file) for the authors' model_cfg."""
    missing = [k for k in AUTHORS_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"authors' checkpoint: model_cfg lacks {', '.join(missing)}")
    if cfg["n_heads"] * cfg["head_dim"] != cfg["dim"]:
        raise ValueError(f"authors' checkpoint: n_heads * head_dim = {cfg['n_heads']} * {cfg['head_dim']} is not "
                         f"dim = {cfg['dim']}, which this Cogformer needs")
    attn = {"np": "cog", "vanilla": "softmax"}.get(cfg["attn_type"])
    if attn is None:
        raise ValueError(f"authors' checkpoint: unknown attn_type {cfg['attn_type']!r} (expected 'np' or 'vanilla')")
    # their FFN splits hidden_dim over "shared experts" in proportion to the recipe, but only expert 0 runs
    recipe = cfg["shared_expert_recipe"]
    fuels = [1] * recipe if isinstance(recipe, int) else list(recipe or [])
    if not fuels:
        raise ValueError("authors' checkpoint: shared_expert_recipe names no FFN expert")
    return CogformerConfig(block_size=cfg["max_seq_length"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layers"],
                           n_head=cfg["n_heads"], n_embd=cfg["dim"],
                           ffn_hidden=fuels[0] * (cfg["hidden_dim"] // sum(fuels)), norm_eps=cfg["norm_eps"],
                           attn=attn), len(fuels)


def authors_to_nanocog(checkpoint):
    """(CogformerConfig, our state dict) from the authors' {"model_cfg", "model"} dict. Every expected key must be
    there with its shape, and no other key (but the ignored buffers and the FFN experts their forward never calls)."""
    if not is_authors_lm(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not the authors' LM format (a dict with 'model_cfg' and 'model'); found {found}")
    config, n_experts = authors_config(checkpoint["model_cfg"])
    theirs = dict(checkpoint["model"])
    C, H, V, L = config.n_embd, config.ffn_hidden, config.vocab_size, config.n_layer
    expected = {"embedding.weight": (V, C), "norm.weight": (C,), "output.weight": (V, C)}
    for i in range(L):
        p = f"layers.{i}."
        expected.update({p + "attention.qw": (C, C), p + "attention.kw": (C, C), p + "attention.vw": (C, C),
                         p + "attention.ow": (C, C), p + "attention_norm.weight": (C,), p + "ffn_norm.weight": (C,),
                         p + "ffn.shared_experts.0.gw": (C, H), p + "ffn.shared_experts.0.pw": (C, H),
                         p + "ffn.shared_experts.0.ow": (H, C)})
    unused = [k for k in theirs if k in AUTHORS_IGNORED or
              any(k.startswith(f"layers.{i}.ffn.shared_experts.{e}.") for i in range(L) for e in range(1, n_experts))]
    missing = [k for k in expected if k not in theirs]
    extra = [k for k in theirs if k not in expected and k not in unused]
    if missing or extra:
        raise ValueError("authors' checkpoint does not match its model_cfg: "
                         + (f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"unexpected keys {extra[:6]}{' ...' if len(extra) > 6 else ''}" if extra else ""))
    for k, shape in expected.items():
        if tuple(theirs[k].shape) != shape:
            raise ValueError(f"authors' checkpoint: {k} has shape {tuple(theirs[k].shape)}, model_cfg implies {shape}")
    hs = C // config.n_head
    if "freqs_cis" in theirs:  # their RoPE table, e^(i t f_j): it must be ours, or theta (or the layout) differs
        table = theirs["freqs_cis"][:config.block_size]
        cos, sin = rope_tables(hs, len(table), config.rope_theta)
        if table.shape[-1:] != (hs // 2,) or not table.is_complex() or max(
                (table.real - cos[:, :hs // 2]).abs().max(), (table.imag - sin[:, :hs // 2]).abs().max()) > 1e-4:
            raise ValueError(f"authors' checkpoint: its RoPE table freqs_cis is not RoPE with theta "
                             f"{config.rope_theta} over head dim {hs}")
    # output column of our rotated q/k layout -> theirs: in each head, the even components, then the odd ones
    rope_order = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    rope_order = (torch.arange(config.n_head)[:, None] * hs + rope_order).flatten()
    ours = {"tok_emb.weight": theirs["embedding.weight"], "norm.weight": theirs["norm.weight"],
            "lm_head.weight": theirs["output.weight"]}
    for i in range(L):
        p, b = f"layers.{i}.", f"blocks.{i}."
        q, k = theirs[p + "attention.qw"].t()[rope_order], theirs[p + "attention.kw"].t()[rope_order]
        ours[b + "attn.qkv.weight"] = torch.cat([q, k, theirs[p + "attention.vw"].t()])
        ours[b + "attn.proj.weight"] = theirs[p + "attention.ow"].t()
        ours[b + "attn_norm.weight"] = theirs[p + "attention_norm.weight"]
        ours[b + "mlp_norm.weight"] = theirs[p + "ffn_norm.weight"]
        ours[b + "mlp.up.weight"] = theirs[p + "ffn.shared_experts.0.gw"].t()  # the linear branch
        ours[b + "mlp.gate.weight"] = theirs[p + "ffn.shared_experts.0.pw"].t()  # the SiLU branch
        ours[b + "mlp.proj.weight"] = theirs[p + "ffn.shared_experts.0.ow"].t()
    return config, {k: v.contiguous() for k, v in ours.items()}


# -----------------------------------------------------------------------------
# U-ViT's state dicts

# our parameter names -> U-ViT's, where they differ: U-ViT wraps the patch convolution in PatchEmbed.proj, uses timm's
# Mlp (fc1, fc2) and calls the closing 3x3 convolution final_layer
AUTHORS_RENAMES = (("patch_embed.", "patch_embed.proj."), (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."),
                   ("final_conv.", "final_layer."))


def authors_name(name):
    for ours, theirs in AUTHORS_RENAMES:
        if name.startswith(ours) or (ours.startswith(".") and ours in name):
            return name.replace(ours, theirs, 1)
    return name


def load_state_dict_file(path):
    """A flat {name: tensor} dict from a torch.save file."""
    state = load_weights_file(path)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a flat dict of tensors, as nnet_ema.pth is)")
    return state


def authors_architecture(state, num_clip_token, num_heads):
    """UViCConfig fields read from the shapes of a U-ViT state dict."""
    for key in ("pos_embed", "patch_embed.proj.weight", "in_blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"not a U-ViT state dict: no {key!r} (its keys start {sorted(state)[:4]})")
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape
    num_in = len({k.split(".")[1] for k in state if k.startswith("in_blocks.")})
    if "context_embed.weight" not in state:
        num_clip_token = 0
    num_patches = state["pos_embed"].shape[1] - 1 - num_clip_token
    side = math.isqrt(max(num_patches, 0))
    if side * side != num_patches or side == 0:
        raise ValueError(f"pos_embed holds {state['pos_embed'].shape[1]} tokens: not 1 + {num_clip_token} text tokens "
                         "+ a square of patches")
    return dict(img_size=side * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                depth=2 * num_in + 1, num_heads=num_heads or max(1, embed_dim // 64),
                mlp_ratio=state["in_blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, num_clip_token=num_clip_token,
                clip_dim=state["context_embed.weight"].shape[1] if num_clip_token else 768)


def attn_from_name(path):
    """The attention kind a checkpoint's path names, nearest folder first: the authors call their U-ViC's file
    cog_nnet_ema.pth and its config mscoco_uvit_small_np_0_last ("np": negative weights); U-ViT's are softmax."""
    for part in reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)):
        words = set(re.split(r"[^a-z0-9]+", part.lower()))
        if words & {"cog", "np", "uvic"}:
            return "cog"
        if words & {"uvit", "vanilla", "softmax"}:
            return "softmax"
    raise ValueError(f"cannot tell from its path whether {path} is a U-ViC (Cog) or a U-ViT (softmax): "
                     "say which (attn='cog' or 'softmax'; --attn on the command line)")


def uvit_to_nanocog(state, model, path):
    """Our state dict for a UViC from a U-ViT state dict, after checking that the names and shapes match one for one."""
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    theirs = {authors_name(name): name for name in shapes}
    unused, missing = sorted(set(state) - set(theirs)), sorted(set(theirs) - set(state))
    if unused or missing:
        raise ValueError(f"{path} does not match a U-ViT of {model.config}: unused tensors {unused[:6]}, "
                         f"missing tensors {missing[:6]}")
    for their_name, our_name in theirs.items():
        if state[their_name].shape != shapes[our_name]:
            raise ValueError(f"{path}: {their_name} has shape {tuple(state[their_name].shape)}, "
                             f"expected {tuple(shapes[our_name])}")
    return {our_name: state[their_name] for their_name, our_name in theirs.items()}


def load_cogformer(path, block_size=None):
    """The authors' released Cogformer or Transformer (trestad/CogAttn: cog_ckpt_100.00_Bi.pt,
    vanilla_ckpt_100.00_Bi.pt) as a Cogformer in eval mode. path: the file, or the dict torch.load gave.
    block_size: the context to use (default: the max_seq_length they trained with)."""
    checkpoint = load_weights_file(path) if isinstance(path, str) else path
    config, state = authors_to_nanocog(checkpoint)
    if block_size is not None:
        config.block_size = block_size
    model = Cogformer(config)
    model.load_state_dict(state)
    return model.eval()


def load_uvic(path, attn=None, num_clip_token=77, num_heads=None):
    """A UViC loaded from a state dict saved by U-ViT's (or the authors') code (nnet_ema.pth). The architecture is
    read from the tensors' shapes, except what they cannot tell: the attention kind (attn, or else the file's name:
    "cog", "np" or "uvic" in it means Cog, "uvit" or "vanilla" softmax), the number of text tokens (77, CLIP's) and
    the heads (default: 64 wide, as in U-ViT-S/2's 8 heads of 512). Every tensor must be used."""
    state = load_state_dict_file(path)
    attn = attn or attn_from_name(path)
    model = UViC(UViCConfig(**authors_architecture(state, num_clip_token, num_heads), attn=attn))
    model.load_state_dict(uvit_to_nanocog(state, model, path))
    return model

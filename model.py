"""
The two networks of the Cog attention paper (arXiv 2411.07176), in one readable file.

1) Cogformer: a Llama-style decoder LM (pre-norm, fp32 RMSNorm, RoPE, SwiGLU, no biases, untied embeddings).
   With attn="cog" the first and the last layer keep softmax attention and every other layer uses Cog attention,
   w = sign(s) * softmax(|s|); attn="softmax" is the Transformer baseline.
2) UViC: U-ViT (Bao et al., "All are Worth Words") for diffusion, with Cog attention in all blocks but the
   first in-block and the last out-block; unconditional (CIFAR-10) or text-to-image (MS-COCO, CLIP context tokens).

Cog attention itself lives in cog_kernel.py (reference and fused Triton kernel); softmax layers use PyTorch's
scaled_dot_product_attention.
"""

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cog_kernel import causal_mask, cog_attention, document_mask

ATTN_KINDS = ("cog", "softmax")


def check_attn(attn):
    if attn not in ATTN_KINDS:
        raise ValueError(f"attn must be one of {ATTN_KINDS}, got {attn!r}")


def layer_pattern(attn, softmax_layers, n_layer):
    """The attention kind of each of n_layer layers: attn everywhere, except that with attn="cog" the layers listed in
    softmax_layers (comma-separated indices, negative ones counting from the end) keep softmax."""
    try:
        listed = [int(i) for i in softmax_layers.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"softmax_layers must be comma-separated layer indices, got {softmax_layers!r}") from None
    bad = [i for i in listed if not -n_layer <= i < n_layer]
    if bad:
        raise ValueError(f"softmax_layers: layer {bad[0]} does not exist in a network of {n_layer} layers")
    keep = {i % n_layer for i in listed}
    return [("softmax" if attn == "cog" and i in keep else attn) for i in range(n_layer)]


def softmax_attention(q, k, v, causal, doc_ids=None):
    """Softmax attention with the same end-aligned causal convention and document ids as cog_attention."""
    Tq, Tk = q.size(-2), k.size(-2)
    if doc_ids is not None:  # a boolean mask, (B, 1, Tq, Tk): SDPA then picks a kernel that takes one
        mask = document_mask(doc_ids, Tq)
        if causal:
            mask = mask & causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not causal or Tq == 1:  # one new query at the end of the cache sees every key
        return F.scaled_dot_product_attention(q, k, v)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal aligns the mask to the top-left corner; we want it aligned to the end
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device))


def attend(kind, q, k, v, causal, doc_ids=None):
    """Route to the attention of this layer's kind; q: (B, nh, Tq, hs), k, v: (B, nh, Tk, hs), doc_ids: (B, Tk)."""
    if kind == "cog":
        return cog_attention(q, k, v, causal=causal, doc_ids=doc_ids)
    return softmax_attention(q, k, v, causal, doc_ids)


def document_ids(idx, start_token):
    """(B, T) document ids of packed token sequences idx: each start_token opens a new document (and belongs to it).
    Whatever precedes the first start_token in a window is document 0, the rest of a document cut off by the window."""
    return torch.cumsum(idx == start_token, dim=1)


def configure_adamw(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices (every parameter of dim >= 2) and none on gains, biases and 1-D params."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda"  # the fused CUDA implementation is several times faster per step
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


# -----------------------------------------------------------------------------
# Cogformer: the language model

@dataclass
class CogformerConfig:
    block_size: int = 2048  # context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64; the paper used Llama-2's 32000
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = 2304  # SwiGLU width: 141.18M parameters with the paper's 32k vocabulary
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attn: str = "cog"  # "cog": Cog attention in every layer but softmax_layers; "softmax": the baseline everywhere
    softmax_layers: str = "0,-1"  # with attn="cog", the layers that keep softmax (the paper's: first and last; "": none)

    def __post_init__(self):
        check_attn(self.attn)
        layer_pattern(self.attn, self.softmax_layers, self.n_layer)  # a bad index is an error now, not at build time
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim ({self.n_embd // self.n_head}) must be even for RoPE")

    def layer_kinds(self):
        """The attention kind of each layer: the paper keeps softmax in the boundary layers (for fast convergence)."""
        return layer_pattern(self.attn, self.softmax_layers, self.n_layer)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (or float64 for float64 inputs), whatever the input dtype (bf16
    squares lose too much)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).type_as(x)


def rope_tables(head_dim, max_len, theta):
    """cos and sin tables, (max_len, head_dim), for rotating pairs (x_i, x_{i + head_dim/2}) by angle pos * freq_i."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), freqs)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); cos, sin: (T, hs). Rotates in float32 (float64 for float64 x), returns x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, kind):
        super().__init__()
        check_attn(kind)
        self.kind = kind
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def qkv_heads(self, x, cos, sin):
        """Rotated q, k and v as (B, nh, T, hs); cos and sin are the rows for these T positions."""
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None, doc_ids=None):
        B, T, C = x.size()
        q, k, v = self.qkv_heads(x, cos, sin)  # (B, nh, T, hs)
        if cache is not None:  # generation: keep this layer's keys and values, attend to all of them
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attend(self.kind, q, k, v, True, doc_ids)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    """W_o( W_g x * silu(W_p x) )."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)  # W_p, through silu
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)  # W_g
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)  # W_o

    def forward(self, x):
        return self.proj(self.up(x) * F.silu(self.gate(x)))


class DecoderBlock(nn.Module):

    def __init__(self, config, kind):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, kind)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, doc_ids=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, doc_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Cogformer(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([DecoderBlock(config, kind) for kind in config.layer_kinds()])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from tok_emb
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # nanoGPT's init: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer) (two per block)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameter counts: total, and without the input embedding and output head (Kaplan's "non-embedding")."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.tok_emb.weight.numel() + self.lm_head.weight.numel()
        return {"total": total, "non_embedding": total - embedding}

    def new_cache(self):
        """An empty KV cache for generate(): one dict per layer, filled by the layers as tokens come in."""
        return [{} for _ in self.blocks]

    def forward(self, idx, targets=None, cache=None, doc_ids=None):
        """idx: (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy against targets (or None).
        With a cache, idx holds only the new tokens and positions continue after the cached ones.
        doc_ids: (B, start + T) document ids of every position so far (document_ids() makes them from the tokens);
        a token then attends only within its document. Positions (RoPE) run on across documents: it is relative."""
        B, T = idx.size()
        start = cache[0]["k"].size(2) if cache and "k" in cache[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.tok_emb(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i] if cache is not None else None, doc_ids)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12 * L * H * hs * T."""
        cfg = self.config
        n = self.num_params()["total"] - self.tok_emb.weight.numel()  # the embedding lookup is not a matmul
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens, using a KV cache. temperature=0 means greedy.
        When the context is full the cache is rebuilt from the last block_size tokens (RoPE positions restart)."""
        cache, new = None, idx
        for _ in range(max_new_tokens):
            if cache is None or cache[0]["k"].size(2) + new.size(1) > self.config.block_size:
                cache, new = self.new_cache(), idx[:, -self.config.block_size:]
            logits, _ = self(new, cache=cache)
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, idx_next], dim=1)
            new = idx_next
        return idx

    @classmethod
    def from_authors(cls, path, block_size=None):
        """The authors' released Cogformer or Transformer (trestad/CogAttn: cog_ckpt_100.00_Bi.pt,
        vanilla_ckpt_100.00_Bi.pt) as a Cogformer in eval mode. path: the file, or the dict torch.load gave.
        block_size: the context to use (default: the max_seq_length they trained with)."""
        checkpoint = load_weights_file(path) if isinstance(path, str) else path
        config, state = authors_to_nanocog(checkpoint)
        if block_size is not None:
            config.block_size = block_size
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()


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
    """What a torch.save file holds (a released checkpoint, a state dict), read with weights_only=True: tensors and
    plain containers only, so no code from the file runs."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path} (no such file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or pickled objects other than tensors and plain values
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot read {path}: not a plain checkpoint of tensors and values, refused to load it "
                         f"({type(err).__name__}: {first_line})") from None


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
# UViC: U-ViT with Cog attention, for diffusion

@dataclass
class UViCConfig:
    img_size: int = 32  # U-ViT-S/2 for CIFAR-10
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 13  # depth // 2 in-blocks, one mid-block, depth // 2 out-blocks
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attn: str = "cog"  # "cog": Cog attention in every block but softmax_layers; "softmax": U-ViT
    softmax_layers: str = "0,-1"  # with attn="cog", the blocks (in-, mid-, out-blocks in order) that keep softmax
    clip_dim: int = 768  # width of the text features (CLIP ViT-L/14's last hidden state)
    num_clip_token: int = 0  # text tokens per caption: 77 for MS-COCO; 0 = unconditional (no context_embed)

    def __post_init__(self):
        check_attn(self.attn)
        layer_pattern(self.attn, self.softmax_layers, self.depth)
        if self.depth % 2 == 0:
            raise ValueError(f"depth must be odd (in-blocks, one mid-block, out-blocks), got {self.depth}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_clip_token < 0 or self.clip_dim < 1:
            raise ValueError(f"need num_clip_token >= 0 and clip_dim >= 1, got {self.num_clip_token}, {self.clip_dim}")

    def block_kinds(self):
        """The attention kind of each block in order: in-blocks, mid-block, out-blocks."""
        return layer_pattern(self.attn, self.softmax_layers, self.depth)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t: (B,) -> (B, dim), as in U-ViT and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SelfAttention(nn.Module):
    """Bidirectional attention over the time token, any text tokens and the patch tokens; no qkv bias, as in U-ViT."""

    def __init__(self, dim, num_heads, kind):
        super().__init__()
        check_attn(kind)
        self.kind = kind
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, L, hs)
        y = attend(self.kind, q, k, v, causal=False)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class ViTBlock(nn.Module):
    """Pre-norm transformer block; an out-block first merges its long skip with a Linear (2C -> C)."""

    def __init__(self, config, kind, skip=False):
        super().__init__()
        dim = config.embed_dim
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, config.num_heads, kind)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViC(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        num_patches = (c.img_size // c.patch_size) ** 2
        kinds = c.block_kinds()
        n_in = c.depth // 2
        self.extras = 1 + c.num_clip_token  # tokens before the patches: time, then the caption's (text-to-image)
        self.patch_embed = nn.Conv2d(c.in_chans, c.embed_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.context_embed = nn.Linear(c.clip_dim, c.embed_dim) if c.num_clip_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, c.embed_dim))
        self.in_blocks = nn.ModuleList([ViTBlock(c, kinds[i]) for i in range(n_in)])
        self.mid_block = ViTBlock(c, kinds[n_in])
        self.out_blocks = nn.ModuleList([ViTBlock(c, kinds[n_in + 1 + i], skip=True) for i in range(n_in)])
        self.norm = nn.LayerNorm(c.embed_dim)
        self.decoder_pred = nn.Linear(c.embed_dim, c.patch_size ** 2 * c.in_chans)
        self.final_conv = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1)
        # U-ViT's init: truncated N(0, 0.02) for the position embedding and the Linear weights, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameter counts: total, and without the position embedding."""
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "non_embedding": total - self.pos_embed.numel()}

    def unpatchify(self, x):
        """(B, L, p*p*C) patch pixels -> (B, C, H, W) image."""
        B, L, _ = x.shape
        p, c, h = self.config.patch_size, self.config.in_chans, int(math.isqrt(L))
        x = x.view(B, h, h, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, c, h * p, h * p)

    def forward(self, x, t, context=None):
        """x: (B, C, H, W) noisy images; t: (B,) timesteps as U-ViT feeds them (t * 999, or the discrete step n);
        context: (B, num_clip_token, clip_dim) text features of a text-to-image model -> the prediction (B, C, H, W)."""
        if (context is None) != (self.context_embed is None):
            need = "needs context (B, num_clip_token, clip_dim)" if context is None else "takes no context"
            raise ValueError(f"this U-ViC (num_clip_token={self.config.num_clip_token}) {need}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D)
        time_token = timestep_embedding(t, self.config.embed_dim).to(x.dtype).unsqueeze(1)  # (B, 1, D)
        prefix = [time_token] if context is None else [time_token, self.context_embed(context)]  # (B, 77, D)
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]  # drop the time and text tokens: (B, L, p*p*C)
        return self.final_conv(self.unpatchify(x))

    # -------------------------------------------------------------------------
    # the authors' released checkpoints: state dicts of U-ViT's libs/uvit_t2i.py network (nnet_ema.pth)

    @classmethod
    def from_authors(cls, path, attn=None, num_clip_token=77, num_heads=None):
        """A U-ViC or U-ViT loaded from a state dict saved by U-ViT's (or the authors') code. The architecture is read
        from the tensors' shapes, except what they cannot tell: the attention kind (attn, or else the file's name:
        "cog", "np" or "uvic" in it means Cog, "uvit" or "vanilla" softmax), the number of text tokens (77, CLIP's)
        and the heads (default: 64 wide, as in U-ViT-S/2's 8 heads of 512). Every tensor must be used."""
        state = load_state_dict_file(path)
        attn = attn or attn_from_name(path)
        config = UViCConfig(**authors_architecture(state, num_clip_token, num_heads), attn=attn)
        model = cls(config)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        theirs = {authors_name(name): name for name in shapes}
        unused, missing = sorted(set(state) - set(theirs)), sorted(set(theirs) - set(state))
        if unused or missing:
            raise ValueError(f"{path} does not match a U-ViT of {config}: unused tensors {unused[:6]}, "
                             f"missing tensors {missing[:6]}")
        for their_name, our_name in theirs.items():
            if state[their_name].shape != shapes[our_name]:
                raise ValueError(f"{path}: {their_name} has shape {tuple(state[their_name].shape)}, "
                                 f"expected {tuple(shapes[our_name])}")
        model.load_state_dict({our_name: state[their_name] for their_name, our_name in theirs.items()})
        return model


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

"""
The two networks of the Cog attention paper (arXiv 2411.07176), in one readable file.

1) Cogformer: a Llama-style decoder LM (pre-norm, fp32 RMSNorm, RoPE, SwiGLU, no biases, untied embeddings).
2) UViC: U-ViT (Bao et al., "All are Worth Words") for diffusion; unconditional (CIFAR-10) or text-to-image
   (MS-COCO, CLIP context tokens).

In both, attn="cog" gives Cog attention, w = sign(s) * softmax(|s|), to every layer but those in softmax_layers (the
paper's: the first and the last), and attn="softmax" is the softmax baseline. The authors' released checkpoints load
through authors.py (load_cogformer, load_uvic).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cog_attention import cog_attention
from cog_kernel import causal_mask, document_mask

# -----------------------------------------------------------------------------
# attention: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs). causal masks are aligned to the end (query
# i sees keys up to i + Tk - Tq, as with a KV cache); doc_ids (B, Tk) limits each query to keys of its own document.


def cog_attn(q, k, v, causal, doc_ids=None):
    """Cog attention, w = sign(s) * softmax(|s|) with s = q k^T / sqrt(hs): a key can add its value or subtract it;
    y = w v. cog_attention runs a fused Triton kernel on a GPU and the PyTorch reference elsewhere."""
    return cog_attention(q, k, v, causal=causal, doc_ids=doc_ids)


def softmax_attn(q, k, v, causal, doc_ids=None):
    """Softmax attention, w = softmax(s), with PyTorch's scaled_dot_product_attention."""
    Tq, Tk = q.size(-2), k.size(-2)
    if doc_ids is not None:  # a boolean mask, (B, 1, Tq, Tk): SDPA then picks a kernel that takes one
        mask = document_mask(doc_ids, Tq)
        if causal:
            mask = mask & causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # SDPA's is_causal aligns the mask top-left: the end only when Tq == Tk (one query at the end sees every key)
    if not causal or Tq == 1 or Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq == Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device))


# the attention kinds, by the name configs use (attn=...): adding a kind is adding its function here
ATTENTION = {"cog": cog_attn, "softmax": softmax_attn}


def check_attn(attn):
    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {tuple(ATTENTION)}, got {attn!r}")


def check_sizes(config, *names):
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


def layer_pattern(attn, softmax_layers, n_layer):
    """The attention kind of each of n_layer layers: softmax in the layers listed in softmax_layers (comma-separated
    indices, negative ones counting from the end, "" for none), attn in all the others."""
    check_attn(attn)
    try:
        listed = [int(i) for i in softmax_layers.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"softmax_layers must be comma-separated layer indices, got {softmax_layers!r}") from None
    bad = [i for i in listed if not -n_layer <= i < n_layer]
    if bad:
        raise ValueError(f"softmax_layers: layer {bad[0]} does not exist in a network of {n_layer} layers")
    keep = {i % n_layer for i in listed}
    return [("softmax" if i in keep else attn) for i in range(n_layer)]


def run_block(model, block, *args):
    """block(*args); with model.activation_checkpointing (--activation_checkpointing) while training, its activations
    are recomputed in the backward instead of kept: the same gradients for about a third more compute."""
    if model.activation_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def document_ids(idx, start_token):
    """(B, T) document ids of packed token sequences idx: each start_token opens a new document (and belongs to it).
    Whatever precedes the first start_token in a window is document 0, the rest of a document cut off by the window."""
    return torch.cumsum(idx == start_token, dim=1)


# -----------------------------------------------------------------------------
# Cogformer: the language model

@dataclass
class CogformerConfig:
    # a field's metadata["help"] is its --help text in the trainers (which take these fields as flags)
    block_size: int = field(default=2048, metadata={"help": "context length"})
    vocab_size: int = field(default=50304, metadata={
        "help": "GPT-2's 50257 padded up to a multiple of 64; the paper used Llama-2's 32000"})
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn_hidden: int = field(default=2304, metadata={
        "help": "SwiGLU width: 141.18M parameters with the paper's 32k vocabulary; 0: attention only"})
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attn: str = field(default="cog", metadata={"choices": tuple(ATTENTION),
                      "help": "the attention of every layer but softmax_layers; softmax: the Transformer baseline"})
    softmax_layers: str = field(default="0,-1", metadata={
        "help": "the layers that use softmax whatever attn is (the paper's: first and last; \"\": none)"})

    def __post_init__(self):
        check_sizes(self, "block_size", "n_layer", "n_head", "n_embd")
        layer_pattern(self.attn, self.softmax_layers, self.n_layer)  # a bad kind or index: an error now, not at build
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim ({self.n_embd // self.n_head}) must be even for RoPE")
        if self.ffn_hidden < 0:
            raise ValueError(f"ffn_hidden must be >= 0 (0: no feed-forward network), got {self.ffn_hidden}")

    def layer_kinds(self):
        """The attention kind of each layer: the paper keeps softmax in the boundary layers (for fast convergence)."""
        return layer_pattern(self.attn, self.softmax_layers, self.n_layer)

    def model_name(self):
        """What the model is: a Cogformer if any layer is Cog, else a Transformer (the baseline, attn=softmax)."""
        return "Cogformer" if "cog" in self.layer_kinds() else "Transformer"


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (float64 for float64 inputs) whatever the input dtype: bf16 squares lose too much."""

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
        y = ATTENTION[self.kind](q, k, v, True, doc_ids)  # (B, nh, T, hs)
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
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps) if config.ffn_hidden else None
        self.mlp = SwiGLU(config) if config.ffn_hidden else None  # ffn_hidden=0: attention-only blocks

    def forward(self, x, cos, sin, cache=None, doc_ids=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, doc_ids)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class Cogformer(nn.Module):
    activation_checkpointing = False  # recompute each block in the backward (run_block); not part of the config

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
        # nanoGPT's init: N(0, 0.02), residual projections scaled down by sqrt(their number): two per block
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residuals = config.n_layer * (2 if config.ffn_hidden else 1)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(residuals))

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
            x = run_block(self, block, x, cos, sin, cache[i] if cache is not None else None, doc_ids)
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
            idx, new = torch.cat([idx, idx_next], dim=1), idx_next
        return idx


# -----------------------------------------------------------------------------
# UViC: U-ViT with Cog attention, for diffusion

@dataclass
class UViCConfig:
    img_size: int = field(default=32, metadata={"help": "the defaults: U-ViT-S/2 for CIFAR-10"})
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = field(default=13, metadata={"help": "depth // 2 in-blocks, one mid-block, depth // 2 out-blocks"})
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attn: str = field(default="cog", metadata={"choices": tuple(ATTENTION),
                      "help": "the attention of every block but softmax_layers; softmax: the U-ViT baseline"})
    softmax_layers: str = field(default="0,-1", metadata={
        "help": "the blocks (in-, mid-, out-blocks in order) that use softmax whatever attn is"})
    clip_dim: int = field(default=768, metadata={"help": "width of the text features (CLIP ViT-L/14's hidden state)"})
    num_clip_token: int = field(default=0, metadata={
        "help": "text tokens per caption: 77 for MS-COCO; 0: unconditional (no context_embed)"})

    def __post_init__(self):
        check_sizes(self, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
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

    def model_name(self):
        """What the model is: a U-ViC if any block is Cog, else a U-ViT (the baseline, attn=softmax)."""
        return "U-ViC" if "cog" in self.block_kinds() else "U-ViT"


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
        y = ATTENTION[self.kind](q, k, v, False)
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
        return x + self.mlp(self.norm2(x))


class UViC(nn.Module):
    activation_checkpointing = False  # recompute each block in the backward (run_block); not part of the config

    def __init__(self, config):
        super().__init__()
        self.config = c = config
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
        # U-ViT's init: truncated N(0, 0.02) for the position embedding and the Linear weights, zero biases (LayerNorm's
        # default, ones and zeros, is U-ViT's too)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
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
            x = run_block(self, block, x)
            skips.append(x)
        x = run_block(self, self.mid_block, x)
        for block in self.out_blocks:
            x = run_block(self, block, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]  # drop the time and text tokens: (B, L, p*p*C)
        return self.final_conv(self.unpatchify(x))

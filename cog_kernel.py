"""
Cog attention (Lv et al., "More Expressive Attention with Negative Weights", arXiv 2411.07176): for one query row with
scaled logits s_j = q . k_j * scale, the weights are w = sign(s) * softmax(|s|), and o = sum_j w_j v_j. Weights can be
negative; each row has sum |w| = 1. Masked keys get -inf after the absolute value, so they get weight 0.

q: (B, H, Tq, D), k and v: (B, H, Tk, D), Tq <= Tk. With causal=True, query i sits at position i + Tk - Tq and sees keys
j <= i + Tk - Tq (aligned to the end, as a KV-cache step is). With doc_ids (B, Tk), a query sees only the keys of its
own document. This file holds the definition (cog_attention_reference), the compact fused kernel (FlashAttention-2
style, written to be read) and cog_attention, the chooser the models call. The tuned kernel is in cog_kernel_tuned.py.
"""

import contextlib
import math
import os
import types
import warnings
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the reference still works; the kernel definitions below stay inert
    triton, tl = None, types.SimpleNamespace(constexpr=None)

# Triton runs kernels on CPU tensors in its interpreter (slow; for tests) if TRITON_INTERPRET=1 when it is imported
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def causal_mask(Tq, Tk, device=None):
    """(Tq, Tk) bool, True where query i may see key j: j <= i + (Tk - Tq)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def document_mask(doc_ids, Tq):
    """(B, 1, Tq, Tk) bool, True where query i and key j lie in the same document; doc_ids: (B, Tk), the queries
    being the last Tq positions."""
    return (doc_ids[:, -Tq:, None] == doc_ids[:, None, :]).unsqueeze(1)


def cog_attention_weights(q, k, causal=False, scale=None, doc_ids=None):
    """The signed weights w = sign(s) * softmax(|s|), (B, H, Tq, Tk), in float32 (float64 for float64 inputs).
    With doc_ids (B, Tk), a query sees only the keys of its own document."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    a = s.abs()
    if causal:
        a = a.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    if doc_ids is not None:  # a query always sees itself, so no row is left without keys
        a = a.masked_fill(~document_mask(doc_ids, q.size(-2)), float("-inf"))
    # subtract the row max of |s| (not of s): every exponent is <= 0 and the denominator is >= 1, so no inf and no eps
    e = torch.exp(a - a.amax(dim=-1, keepdim=True))
    p = e / e.sum(dim=-1, keepdim=True)
    return torch.sign(s) * p


def cog_attention_reference(q, k, v, causal=False, scale=None, doc_ids=None):
    """The definition: materialises the weights. Computes in float32 (or float64), returns q's dtype."""
    check_attention_inputs(q, k, v, doc_ids)
    w = cog_attention_weights(q, k, causal, scale, doc_ids)
    return torch.matmul(w, v.to(w.dtype)).to(q.dtype)  # (B, H, Tq, D)


def cog_attention_reference_backward(do, q, k, v, causal=False, scale=None, doc_ids=None):
    """dq, dk, dv of the reference for upstream gradient do, by the formulas the kernels use (see the backward below);
    autograd through cog_attention_reference gives the same. Computes in float32 (or float64)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    w = cog_attention_weights(q, k, causal, scale, doc_ids)  # (B, H, Tq, Tk)
    q_, k_, v_, do_ = (t.to(w.dtype) for t in (q, k, v, do))
    dp = do_ @ v_.transpose(-2, -1)
    ds = w.abs() * dp - w * (w * dp).sum(-1, keepdim=True)  # dL/ds; (w * dp).sum(-1) = rowsum(dO * O)
    dq, dk, dv = scale * ds @ k_, scale * ds.transpose(-2, -1) @ q_, w.transpose(-2, -1) @ do_
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def cog_attention_triton(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None):
    """The tuned fused kernel alone, without the chooser."""
    return _tuned().cog_attention_triton(q, k, v, causal, scale, deterministic, doc_ids)


# --- The compact fused kernel ----------------------------------------------------------------------------------------
# FlashAttention-2, as in Triton's tutorial 06-fused-attention, with Cog's two changes: the softmax runs over |s|, and
# the sign comes back before the weights meet V. Logits are kept in base 2, s2 = (q . k) * c with c = scale * log2(e),
# so exp2 does the work of exp (c > 0: the chooser moves a negative scale into q, so sign(s2) = sign(s)).
#
# Forward: one program per block of BLOCK_M query rows, streaming over blocks of BLOCK_N keys, keeping per row a
# running max m of |s2| and a running sum l:
#     m' = max(m, rowmax |s2|),  alpha = 2^(m - m'),  p = 2^(|s2| - m'),  l' = alpha * l + rowsum p,
#     acc' = alpha * acc + (sign(s2) * p) @ V,       and at the end  o = acc / l,  lse = m + log2(l).
# m starts at 0, not -inf: |s2| >= 0, so 0 is a valid start, and a block whose keys are all masked gives p = 0
# (2^(-inf - 0)) instead of the NaN of 2^(-inf - -inf).
#
# Backward: with P = softmax(|S|) recomputed from lse as 2^(|s2| - lse), W = sign(S) * P, dP = dO V^T:
#     dV = W^T dO,   dS = |W| * dP - W * D,   dQ = scale * dS K,   dK = scale * dS^T Q,   D_i = rowsum(dO_i * o_i)
# where dS comes from the chain rule through w = sign(s) * p(|s|):
#     d sign/ds = 0, so dL/dp_ij = sign(s_ij) dP_ij;
#     softmax over |s|: dL/d|s_ij| = p_ij (sign(s_ij) dP_ij - sum_k p_ik sign(s_ik) dP_ik) = p_ij (sign(s_ij) dP_ij - D_i)
#     (sum_k w_ik dP_ik = dO_i . sum_k w_ik v_k = dO_i . o_i = D_i, the delta pre-pass);
#     d|s|/ds = sign(s): dS_ij = sign(s_ij)^2 p_ij dP_ij - w_ij D_i = |w_ij| dP_ij - w_ij D_i.
# Two passes, no atomic adds, so the gradients are bit-reproducible: one program per key block sums dK and dV over the
# query blocks, then one program per query block sums dQ over the key blocks (S and dP are computed twice).
#
# Masks: key j is visible to query row i iff j < Tk, and j <= i + Tk - Tq if causal, and doc(j) == doc(i + Tk - Tq) with
# document ids. Causal programs stop at the last key block any of their rows sees. Rows and columns past the ends (and
# head-dim columns past D: tiles are BLOCK_D = next power of two >= 16 wide) load as zeros. Dots take the input dtype
# with fp32 accumulation (weights and dS are rounded to it first, as in FlashAttention); fp32 dots are tf32 on NVIDIA.
# Inputs are contiguous (B, H, T, D): row t of batch-head bh starts at (bh * T + t) * D; bh is int64 in the offsets,
# as B * H * T * D may pass 2^31.

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _rows(bh, T, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of the (BLOCK, BLOCK_D) tile of rows start.. of batch-head bh: inside T and HEAD_DIM."""
    rows, cols = start + tl.arange(0, BLOCK), tl.arange(0, BLOCK_D)
    offsets = (bh.to(tl.int64) * T + rows[:, None]) * HEAD_DIM + cols[None, :]
    return offsets, (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)


@_jit
def _load_rows(ptr, bh, T, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offsets, inside = _rows(bh, T, start, BLOCK, HEAD_DIM, BLOCK_D)
    return tl.load(ptr + offsets, mask=inside, other=0.0)


@_jit
def _store_rows(ptr, x, bh, T, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offsets, inside = _rows(bh, T, start, BLOCK, HEAD_DIM, BLOCK_D)
    tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=inside)


@_jit
def _doc_of_rows(DOCS, b, rows, Tq, Tk, DOC_MASK: tl.constexpr):
    if DOC_MASK:  # query row i is position i + Tk - Tq
        return tl.load(DOCS + b.to(tl.int64) * Tk + rows + (Tk - Tq), mask=rows < Tq, other=-2)
    return rows


@_jit
def _visible(rows, cols, doc_rows, DOCS, b, Tq, Tk, CAUSAL: tl.constexpr, DOC_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: may query row i see key j (the masks above)?"""
    visible = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (Tk - Tq))
    if DOC_MASK:
        doc_cols = tl.load(DOCS + b.to(tl.int64) * Tk + cols, mask=cols < Tk, other=-1)
        visible = visible & (doc_rows[:, None] == doc_cols[None, :])
    return visible


@_jit
def _signed_weights(s2, shift, visible):
    """p = 2^(|s2| - shift) on the visible keys (0 elsewhere), and w = sign(s2) * p (sign(0) = 0: a zero logit adds to
    the sum l but not to o)."""
    p = tl.where(visible, tl.exp2(tl.abs(s2) - shift[:, None]), 0.0)
    return tl.where(s2 > 0, p, tl.where(s2 < 0, -p, 0.0)), p


@_jit
def _compact_fwd(Q, K, V, O, LSE, DOCS, qk_scale, H, Tq, Tk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOC_MASK: tl.constexpr):
    bh, start_m = tl.program_id(0), tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    doc_rows = _doc_of_rows(DOCS, bh // H, rows, Tq, Tk, DOC_MASK)
    q = _load_rows(Q, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    m = tl.zeros([BLOCK_M], dtype=tl.float32)  # running max of |s2| (see above: 0 is a valid start)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(|s2| - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq) if CAUSAL else Tk  # past the last key the last row sees
    for start_n in range(0, end, BLOCK_N):
        k = _load_rows(K, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
        s2 = tl.dot(q, tl.trans(k)) * qk_scale
        cols = start_n + tl.arange(0, BLOCK_N)
        visible = _visible(rows, cols, doc_rows, DOCS, bh // H, Tq, Tk, CAUSAL, DOC_MASK)
        m_new = tl.maximum(m, tl.max(tl.where(visible, tl.abs(s2), 0.0), 1))
        w, p = _signed_weights(s2, m_new, visible)
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v)
        m = m_new
    l = tl.where(l > 0, l, 1.0)  # rows past Tq see nothing; they are not stored
    _store_rows(O, acc / l[:, None], bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m + tl.log2(l), mask=rows < Tq)


@_jit
def _compact_delta(O, DO, DELTA, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = rowsum(dO_i * o_i), in fp32."""
    bh, start_m = tl.program_id(0), tl.program_id(1) * BLOCK_M
    o = _load_rows(O, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D).to(tl.float32)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@_jit
def _compact_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DOCS, qk_scale, scale, H, Tq, Tk, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  DOC_MASK: tl.constexpr):
    """Pass 1: one program per key block sums dV = W^T dO and dK = scale * dS^T Q over the query blocks."""
    bh, start_n = tl.program_id(0), tl.program_id(1) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    v = _load_rows(V, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # causal: the first query row that sees key start_n is start_n - (Tk - Tq)
    begin = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(begin, Tq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
        do = _load_rows(DO, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
        lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
        doc_rows = _doc_of_rows(DOCS, bh // H, rows, Tq, Tk, DOC_MASK)
        visible = _visible(rows, cols, doc_rows, DOCS, bh // H, Tq, Tk, CAUSAL, DOC_MASK)
        w, p = _signed_weights(tl.dot(q, tl.trans(k)) * qk_scale, lse, visible)
        dv += tl.dot(tl.trans(w.to(do.dtype)), do)
        ds = tl.abs(w) * tl.dot(do, tl.trans(v)) - w * delta[:, None]
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_rows(DK, dk * scale, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    _store_rows(DV, dv, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)


@_jit
def _compact_dq(Q, K, V, DO, DQ, LSE, DELTA, DOCS, qk_scale, scale, H, Tq, Tk, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                DOC_MASK: tl.constexpr):
    """Pass 2: one program per query block sums dQ = scale * dS K over the key blocks (the forward's loop)."""
    bh, start_m = tl.program_id(0), tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    doc_rows = _doc_of_rows(DOCS, bh // H, rows, Tq, Tk, DOC_MASK)
    q = _load_rows(Q, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq) if CAUSAL else Tk
    for start_n in range(0, end, BLOCK_N):
        k = _load_rows(K, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, bh, Tk, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
        cols = start_n + tl.arange(0, BLOCK_N)
        visible = _visible(rows, cols, doc_rows, DOCS, bh // H, Tq, Tk, CAUSAL, DOC_MASK)
        w, p = _signed_weights(tl.dot(q, tl.trans(k)) * qk_scale, lse, visible)
        ds = tl.abs(w) * tl.dot(do, tl.trans(v)) - w * delta[:, None]
        dq += tl.dot(ds.to(k.dtype), k)
    _store_rows(DQ, dq * scale, bh, Tq, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)


# Tiles per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages), tried in order: the first that compiles and passes the
# first-use check (see the chooser) runs. (64, 64) fits the ~99 KB of shared memory of consumer GPUs at head dim 128 in
# fp16/bf16; (32, 32) is the small tile for fp32 and head dims up to 256. Untimed: no GPU has run this kernel yet.
COMPACT_TILES = {kind: [(64, 64, 4, 2), (32, 32, 4, 1)] for kind in ("fwd", "dkdv", "dq")}
COMPACT_TILES["delta"] = [(64, None, 4, 1), (32, None, 4, 1)]  # BLOCK_N unused
INTERPRETER_TILES = {"fwd": [(16, 32, 1, 1)], "dkdv": [(16, 32, 1, 1)], "dq": [(16, 32, 1, 1)],
                     "delta": [(16, None, 1, 1)]}


def compact_kernels():
    """{kind: jit function}; the constexprs are HEAD_DIM, BLOCK_D (padded_head_dim), BLOCK_M, and but for delta
    BLOCK_N, CAUSAL, DOC_MASK. The grid is (B * H, blocks of Tq, or of Tk for dkdv)."""
    return dict(fwd=_compact_fwd, delta=_compact_delta, dkdv=_compact_dkdv, dq=_compact_dq)


def padded_head_dim(D):
    """The tile width for head dim D: the next power of two, at least 16 (the smallest dot). The host passes it in:
    computed inside a kernel, it is not a constant to Triton 3.6."""
    return max(16, 1 << (D - 1).bit_length())


def _tile_sets():
    """The compact kernel's tile choices, as dicts {kind: tile}: the i-th tile of every kind together."""
    tiles = INTERPRETER_TILES if _INTERPRET else COMPACT_TILES
    return [{kind: tiles[kind][i] for kind in tiles} for i in range(len(tiles["fwd"]))]


def _launch(kind, grid_rows, tile, q, *args, **constants):
    block_m, block_n, warps, stages = tile[kind]
    sizes = dict(BLOCK_M=block_m) if block_n is None else dict(BLOCK_M=block_m, BLOCK_N=block_n)
    B, H, _, D = q.shape
    grid = (B * H, triton.cdiv(grid_rows, block_n if kind == "dkdv" else block_m))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        compact_kernels()[kind][grid](*args, HEAD_DIM=D, BLOCK_D=padded_head_dim(D), **sizes, **constants,
                                      num_warps=warps, num_stages=stages)


def compact_forward(q, k, v, causal, scale, doc_ids, tile):
    """o and lse (base 2, fp32, (B, H, Tq)) through the compact forward; scale > 0."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    (B, H, Tq, _), Tk = q.shape, k.size(2)
    o, lse = torch.empty_like(q), q.new_empty((B, H, Tq), dtype=torch.float32)
    docs = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    _launch("fwd", Tq, tile, q, q, k, v, o, lse, docs, scale * LOG2E, H, Tq, Tk, CAUSAL=causal,
            DOC_MASK=docs is not None)
    return o, lse


def compact_backward(do, q, k, v, o, lse, causal, scale, deterministic, doc_ids, tile):
    """dq, dk, dv through the delta pre-pass and the two backward passes (always deterministic)."""
    do, q, k, v, o = (t.contiguous() for t in (do, q, k, v, o))
    H, Tq, Tk = q.size(1), q.size(2), k.size(2)
    dq, dk, dv, delta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lse)
    docs = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    _launch("delta", Tq, tile, q, o, do, delta, Tq)
    common = dict(CAUSAL=causal, DOC_MASK=docs is not None)
    _launch("dkdv", Tk, tile, q, q, k, v, do, dk, dv, lse, delta, docs, scale * LOG2E, scale, H, Tq, Tk, **common)
    _launch("dq", Tq, tile, q, q, k, v, do, dq, lse, delta, docs, scale * LOG2E, scale, H, Tq, Tk, **common)
    return dq, dk, dv


# --- Input checks ----------------------------------------------------------------------------------------------------

def check_attention_inputs(q, k, v, doc_ids=None):
    """Raise a ValueError that names the problem if q, k, v (and doc_ids) do not fit the contract at the top."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"cog attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"cog attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"cog attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"cog attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"cog attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"cog attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, Tq, D), (Bk, Hk, Tk, Dk) = q.shape, k.shape
    if (B, H) != (Bk, Hk):
        raise ValueError(f"cog attention: batch and head sizes differ: q has (B, H) = {(B, H)}, k has {(Bk, Hk)}")
    if D != Dk:
        raise ValueError(f"cog attention: head dims differ: q has D = {D}, k and v have D = {Dk}")
    if Tk == 0:
        raise ValueError("cog attention: k and v hold no keys (Tk = 0)")
    if Tq > Tk:
        raise ValueError(f"cog attention: needs Tq <= Tk (queries are the last Tq positions), got Tq = {Tq} > Tk = {Tk}")
    if doc_ids is not None:
        check_doc_ids(doc_ids, B, Tk, q.device)


def check_doc_ids(doc_ids, B, Tk, device):
    """doc_ids: (B, Tk) integers on q's device, non-decreasing along each row (documents packed one after another)."""
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(f"cog attention: doc_ids must be a torch.Tensor, got {type(doc_ids).__name__}")
    if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
        raise ValueError(f"cog attention: doc_ids must be an integer tensor, got {doc_ids.dtype}")
    if tuple(doc_ids.shape) != (B, Tk):
        raise ValueError(f"cog attention: doc_ids must have shape (B, Tk) = {(B, Tk)}, one id per key, "
                         f"got {tuple(doc_ids.shape)}")
    if doc_ids.device != device:
        raise ValueError(f"cog attention: doc_ids must be on q's device {device}, got {doc_ids.device}")
    if torch.compiler.is_compiling() or Tk < 2:  # a data-dependent check would break torch.compile's graph
        return
    ordered = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all()
    message = "cog attention: doc_ids must be non-decreasing along the sequence (packed documents)"
    if doc_ids.is_cuda:  # checked on the GPU without waiting for it (reading the answer would stall every layer)
        torch._assert_async(ordered, message)
    elif not ordered:
        raise ValueError(message + ", but they decrease somewhere")


# --- The chooser -----------------------------------------------------------------------------------------------------
# cog_attention runs the first backend of BACKENDS that applies to the inputs and passes its first-use check (or only
# the one named by its backend argument or COG_BACKEND). The check runs once per configuration (device, dtype, head dim,
# causal, document masks, deterministic) and process; a backend that fails it, or fails later, is skipped with one
# warning; one asked for by name raises. docs/kernel.md says more. The choice is made inside a custom op, at run time,
# so a fallback under torch.compile needs no recompile; the backward runs the backend its forward ran.

BACKENDS = ("tuned", "compact", "reference")
VERIFY_TOL = {torch.float32: 2e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # relative L2; fp32 dots are tf32
# Decode steps (Tq = 1) of few sequences launch only B * H programs of a fused kernel, while the reference needs only
# O(Tq * Tk) memory there. Untimed: bench.py's decode rows are where to set this bound from a GPU run.
DECODE_REFERENCE_MAX_HEADS = 64
_verdicts = {}  # (backend, config) -> (True, tile) or (False, why)


def _config(q, causal, doc_ids, deterministic):
    """What a first-use check covers, in the words that name it in warnings."""
    flags = [name for name, on in (("causal", causal), ("doc_ids", doc_ids is not None),
                                   ("deterministic", deterministic)) if on]
    return " ".join([str(q.device), str(q.dtype).replace("torch.", ""), f"head dim {q.size(-1)}"] + flags)


def _not_for(name, q):
    """Why backend `name` does not apply to these inputs (auto skips it silently), or None."""
    if name == "reference":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the fused kernels take float16, bfloat16 or float32, not {q.dtype}"
    if q.size(-1) > MAX_HEAD_DIM:
        return f"the fused kernels take head dims up to {MAX_HEAD_DIM}, not {q.size(-1)}"
    if q.is_cuda:
        return None
    if q.device.type != "cpu" or not (_INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"tensors on {q.device} need CUDA, or Triton's interpreter (TRITON_INTERPRET=1 before importing triton)"
    return "Triton's interpreter computes bfloat16 dots wrongly" if q.dtype == torch.bfloat16 else None


def _tuned():  # imported when first needed: it imports this file
    import cog_kernel_tuned
    return cog_kernel_tuned


def _reference_forward(q, k, v, causal, scale, doc_ids, tile):
    return cog_attention_reference(q, k, v, causal, scale, doc_ids), q.new_empty(q.shape[:3], dtype=torch.float32)


# forward(q, k, v, causal, scale, doc_ids, tile) -> o, lse; backward(do, q, k, v, o, lse, causal, scale, deterministic,
# doc_ids, tile) -> dq, dk, dv (the reference's backward is cog_attention_reference_backward)
_FORWARD = dict(tuned=lambda *args: _tuned().forward(*args), compact=compact_forward, reference=_reference_forward)
_BACKWARD = dict(tuned=lambda *args: _tuned().backward(*args), compact=compact_backward)


def _check(name, tile, q, causal, scale, deterministic, doc_ids, judged=("output", "dq", "dk", "dv")):
    """Raise unless backend `name` (with `tile`) gives the reference's output and gradients (those named in judged) on a
    small random problem in q's configuration, a few tiles long and ragged (Tq < Tk, neither a multiple of a tile)."""
    Tk = 263 if q.is_cuda else 71
    g = torch.Generator().manual_seed(0)
    q_, k_, v_, do_ = (torch.randn(1, 2, T, q.size(-1), generator=g).to(q.device, q.dtype)
                       for T in (Tk - 6, Tk, Tk, Tk - 6))
    docs = None if doc_ids is None else (torch.arange(Tk, device=q.device) * 3 // Tk)[None].to(doc_ids.dtype)
    o, lse = _FORWARD[name](q_, k_, v_, causal, scale, docs, tile)
    grads = judged != ("output",)
    got = (o, *_BACKWARD[name](do_, q_, k_, v_, o, lse, causal, scale, deterministic, docs, tile)) if grads else (o,)
    q64, k64, v64, do64 = (t.double() for t in (q_, k_, v_, do_))
    want = (cog_attention_reference(q64, k64, v64, causal, scale, docs),
            *(cog_attention_reference_backward(do64, q64, k64, v64, causal, scale, docs) if grads else ()))
    for label, x, ref in zip(("output", "dq", "dk", "dv"), got, want):
        if label not in judged:
            continue
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        if not err < VERIFY_TOL[q.dtype]:  # (a NaN fails too)
            raise RuntimeError(f"wrong numbers: {label} is off by {err:.1e} (relative L2) from the reference")


def _one_line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def _verify(name, config, q, causal, scale, deterministic, doc_ids):
    """(True, the tile to run) or (False, why not): the compact tier runs its first tile set that passes _check; the
    tuned tier checks each of its kernels' tiles and autotunes over those that pass (cog_kernel_tuned.check_tiles).
    Warns of the tiles dropped."""
    if name == "reference":
        return True, None
    problem = "Triton is not installed" if triton is None else _tuned().kernel_problem() if name == "tuned" else None
    if problem:
        return False, problem

    def why_wrong(tile, judged=("output", "dq", "dk", "dv")):
        try:
            _check(name, tile, q, causal, scale, deterministic, doc_ids, judged)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compile error, out of resources, an unsupported configuration, wrong numbers
            return _one_line(error)

    if name == "tuned":  # (tile None: it autotunes)
        tile, (ok, failures) = None, _tuned().check_tiles(why_wrong, q, causal, deterministic, doc_ids is not None)
    else:
        ok, failures = False, []
        for tile in _tile_sets():
            why = why_wrong(tile)
            if not why:
                ok = True
                break
            failures.append(f"tile {tile['fwd'][:2]}: {why}")
    if ok and failures:
        warnings.warn(f"cog_attention: {name} backend, {config}: dropped {'; '.join(failures)}", RuntimeWarning,
                      stacklevel=2)
    return (True, tile) if ok else (False, "; ".join(failures))


def _give_up(name, config, why, named, rest, q, k):
    """Backend `name` failed for config: raise if it was asked for by name, else skip it from now on with a warning
    that names what the reference will need if only it is left."""
    if named:
        raise RuntimeError(f"cog_attention: backend {name!r} failed for {config}: {why}")
    _verdicts[(name, config)] = (False, why)
    note = ""
    if rest == ["reference"]:
        B, H, Tq, Tk = *q.shape[:3], k.size(2)
        note = (f"; the reference materialises the (Tq, Tk) weights: B*H*Tq*Tk*4 bytes per weight matrix, "
                f"{B * H * Tq * Tk * 4 / 2**30:.2f} GiB at this call's shape (B={B}, H={H}, Tq={Tq}, Tk={Tk})")
    warnings.warn(f"cog_attention: skipping the {name} backend for {config}: {why}{note}", RuntimeWarning, stacklevel=3)


def _order(q, named):
    """The backends to try, in order, for these inputs."""
    if named:
        why = _not_for(named, q)
        if why:
            raise RuntimeError(f"cog_attention: backend {named!r} cannot run here: {why}")
        return [named]
    B, H, Tq = q.shape[:3]
    if Tq == 1 and B * H <= DECODE_REFERENCE_MAX_HEADS:
        return ["reference"]
    return [name for name in BACKENDS if _not_for(name, q) is None]


def _run_forward(q, k, v, causal, scale, deterministic, doc_ids, named):
    config, order = _config(q, causal, doc_ids, deterministic), _order(q, named)
    for i, name in enumerate(order):
        first_use = (name, config) not in _verdicts
        if first_use:
            _verdicts[(name, config)] = _verify(name, config, q, causal, scale, deterministic, doc_ids)
        ok, tile = _verdicts[(name, config)]
        if not ok:
            if first_use or named:
                _give_up(name, config, tile, named, order[i + 1:], q, k)
            continue
        try:
            return (*_FORWARD[name](q, k, v, causal, scale, doc_ids, tile), name)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # it passed its check, but fails at this shape
            _give_up(name, config, _one_line(error), named, order[i + 1:], q, k)
    raise AssertionError("unreachable: the reference is always in the order")


@torch.library.custom_op("nanocog::cog_attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, deterministic: bool,
               doc_ids: Optional[torch.Tensor], named: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, lse, name = _run_forward(q, k, v, causal, scale, deterministic, doc_ids, named or None)
    return o.contiguous(), lse, torch.tensor([BACKENDS.index(name)])  # which backend ran, for the backward (on the CPU)


@_attention.register_fake
def _(q, k, v, causal, scale, deterministic, doc_ids, named):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), torch.empty(1, dtype=torch.long)


@torch.library.custom_op("nanocog::cog_attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, used: torch.Tensor, causal: bool, scale: float, deterministic: bool,
                        doc_ids: Optional[torch.Tensor], named: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name, config = BACKENDS[int(used[0])], _config(q, causal, doc_ids, deterministic)
    ok, tile = _verdicts.get((name, config), (False, None))
    if name != "reference" and ok:
        try:
            grads = _BACKWARD[name](do, q, k, v, o, lse, causal, scale, deterministic, doc_ids, tile)
            return tuple(g.contiguous() for g in grads)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            _give_up(name, config, _one_line(error), named or None, ["reference"], q, k)
    return cog_attention_reference_backward(do, q, k, v, causal, scale, doc_ids)


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, used, causal, scale, deterministic, doc_ids, named):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale, ctx.deterministic, doc_ids, ctx.named = inputs
    ctx.save_for_backward(q, k, v, *output, doc_ids)


def _backward(ctx, do, dlse, dused):  # lse and the backend index are internal outputs: no gradient
    q, k, v, o, lse, used, doc_ids = ctx.saved_tensors
    dq, dk, dv = _attention_backward(do, q, k, v, o, lse, used, ctx.causal, ctx.scale, ctx.deterministic, doc_ids,
                                     ctx.named)
    return dq, dk, dv, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def cog_attention(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None, backend=None):
    """Cog attention for the models: (B, H, Tq, D) in q's dtype, through the chosen backend (see above).
    deterministic: bit-reproducible gradients (None follows torch.are_deterministic_algorithms_enabled(); the compact
    kernel and the reference always are, the tuned kernel then takes its two-pass backward).
    doc_ids (B, Tk): per-key document ids of packed sequences (query i has id doc_ids[:, Tk - Tq + i]); a query sees
    only keys of its own document. backend: None (auto, or COG_BACKEND), "tuned", "compact" or "reference"."""
    check_attention_inputs(q, k, v, doc_ids)
    choice = (os.environ.get("COG_BACKEND", "") if backend is None else backend).strip().lower()
    if choice not in ("", "auto") + BACKENDS:
        raise ValueError(f"cog_attention: backend must be auto, tuned, compact or reference (argument or COG_BACKEND), "
                         f"got {choice!r}")
    named = None if choice in ("", "auto") else choice
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    deterministic = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    if scale < 0:  # the fused kernels need c > 0 (sign(s) = sign(q . k)): move the sign into q, exactly
        q, scale = -q, -scale
    if _order(q, named) == ["reference"] or scale == 0:  # (scale 0: every logit is 0, so every weight is 0)
        return cog_attention_reference(q, k, v, causal, scale, doc_ids)
    return _attention(q, k, v, bool(causal), scale, deterministic, doc_ids, named or "")[0]

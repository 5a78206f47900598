"""
Cog attention (Lv et al., "More Expressive Attention with Negative Weights", arXiv 2411.07176): for one query row with
scaled logits s_j = q . k_j * scale, the weights are w = sign(s) * softmax(|s|), and o = sum_j w_j v_j. Weights can be
negative; each row has sum |w| = 1. Masked keys get -inf after the absolute value, so they get weight 0.

q: (B, H, Tq, D), k and v: (B, H, Tk, D), Tq <= Tk. With causal=True, query i sits at position i + Tk - Tq and sees keys
j <= i + Tk - Tq (aligned to the end, as a KV-cache step is). With doc_ids (B, Tk), a query sees only the keys of its
own document. This file holds, in that order, the definition (cog_attention_reference and its backward), the compact
fused kernel (FlashAttention-2 style, written to be read: forward, delta pre-pass, dK/dV, dQ, then their launchers)
and the input checks. It is also where Triton is imported and the constants live, for cog_kernel_tuned.py (the tuned
kernel) to share. cog_attention.py holds cog_attention, the chooser the models call.
"""

import contextlib
import math
import os
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the reference still works; the kernel definitions below stay inert
    triton, tl = None, types.SimpleNamespace(constexpr=None)

# Triton runs kernels on CPU tensors in its interpreter (slow; for tests) if TRITON_INTERPRET=1 when it is imported
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # the fused kernels' widest head dim

# --- The definition ---------------------------------------------------------------------------------------------------

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


def cog_attention_reference(q, k, v, causal=False, scale=None, doc_ids=None, check=True):
    """The definition: materialises the weights. Computes in float32 (or float64), returns q's dtype. check=False skips
    the input checks, for a caller that has run them."""
    if check:
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


# --- Tiles and launchers ---------------------------------------------------------------------------------------------
# Tiles per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages), tried in order: the first that compiles and passes the
# first-use check (see cog_attention.py) runs. (64, 64) fits the ~99 KB of shared memory of consumer GPUs at head dim
# 128 in fp16/bf16; (32, 32) is the small tile for fp32 and head dims up to 256. Untimed: no GPU has run this kernel.
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


def compact_tile_sets():
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

"""
Cog attention (Lv et al., "More Expressive Attention with Negative Weights", arXiv 2411.07176).

For one query row with scaled logits s_j = q . k_j * scale over the keys it may see:

    w_j = sign(s_j) * exp(|s_j| - m) / sum_k exp(|s_k| - m),    m = max_k |s_k|
    o   = sum_j w_j v_j

i.e. w = sign(s) * softmax(|s|): weights can be negative, and each row has sum |w| = 1.
Masked keys get -inf AFTER the absolute value, so they get weight 0.

Three entry points with one signature, q: (B, H, Tq, D), k and v: (B, H, Tk, D), Tq <= Tk:
- cog_attention_reference: the definition in plain PyTorch, materialising the (Tq, Tk) weights.
- cog_attention_triton: a fused Triton kernel (FlashAttention-2 style forward and backward), autograd-capable.
- cog_attention: what the model calls; picks the best implementation for the inputs.
With causal=True, query i sits at position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq) (aligned to the end,
so a KV-cache step with one new query sees the whole cache).

The kernel runs on CUDA tensors, and on CPU tensors in Triton's interpreter (slow; for tests), which needs
TRITON_INTERPRET=1 in the environment before triton is first imported (Triton reads it then).
"""

import contextlib
import functools
import math
import os
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the reference still works; the kernel definitions below stay inert
    triton, tl = None, types.SimpleNamespace(constexpr=None)


def check_attention_inputs(q, k, v, doc_ids=None):
    """Raise a ValueError that names the problem if q, k, v (and doc_ids) do not fit the contract above."""
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
    # a data-dependent check: skipped while torch.compile traces (it would break the graph)
    if not torch.compiler.is_compiling() and Tk > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("cog attention: doc_ids must be non-decreasing along the sequence (packed documents), "
                         "but they decrease somewhere")


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


# ---------------------------------------------------------------------------------------------------------------------
# The fused kernel: FlashAttention-2 structure, as in Triton's tutorial 06-fused-attention.
#
# Forward, one program per block of BLOCK_M query rows, streaming over blocks of BLOCK_N keys. In base-2 units
# (s2 = s * log2(e), so exp2 does the work of exp and sign(s2) = sign(s)) it keeps a running max m and sum l of |s2|:
#     m' = max(m, rowmax |s2|),   alpha = 2^(m - m'),   p = 2^(|s2| - m')
#     l' = alpha * l + rowsum p,  acc' = alpha * acc + (sign(s2) * p) @ V
# and ends with o = acc / l and lse = m + log2(l) (fp32), from which the backward recomputes p = 2^(|s2| - lse).
#
# Backward: D_i = dO_i . o_i (a small pre-pass), then with P = softmax(|S|), W = sign(S) * P, dP = dO V^T:
#     dV = W^T dO,   dS = sign(S)^2 * P * dP - W * D,   dQ = scale * dS K,   dK = scale * dS^T Q
# where the dS formula comes from:
#     W = sign(S) * P and d sign/ds = 0, so dL/dP_ij = sign(s_ij) dP_ij;
#     softmax over |S|: dL/d|s_ij| = P_ij (sign(s_ij) dP_ij - sum_k P_ik sign(s_ik) dP_ik) = P_ij (sign(s_ij) dP_ij - D_i);
#     d|s|/ds = sign(s): dS_ij = sign(s_ij)^2 P_ij dP_ij - W_ij D_i   (sign^2 = 0 at s = 0 exactly, as torch autograd).
# One program per key block accumulates dK, dV over query blocks; another per query block accumulates dQ over key
# blocks (two passes that recompute S, but no atomics).
#
# Masking: with off = Tk - Tq, query i sees key j iff j <= i + off and j < Tk. Blocks that no row of the program sees
# are skipped; blocks that every row sees run without the mask (MASK=False); only the boundary blocks pay for it.
# Rows past the end load as zeros: in the backward such a row has s = 0 exactly, so sign(s) = 0, and its dO, Q, K, V
# rows are 0, so it adds nothing to dQ, dK, dV; only the forward's sum l needs the ragged key tail masked.
# Dots take the input dtype (fp16/bf16 with fp32 accumulation; P and dS are rounded to it before their dots, as in
# FlashAttention). fp32 inputs use Triton's default fp32 dot precision, which is tf32 on NVIDIA GPUs (exact fp32 in the
# interpreter).

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
# Triton builds kernels for its interpreter (CPU tensors, one program at a time) when TRITON_INTERPRET=1 at import.
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)


def _autotune(kind):
    """Autotune over block sizes, warps and stages on a GPU (keyed on head dim, causal and lengths rounded up to powers
    of two, so a KV-cache decode does not re-tune every step); one fixed config in the interpreter."""
    def wrap(fn):
        if triton is None:
            return fn
        if _INTERPRET:  # it runs programs one by one: few, big blocks are fastest (test_kernel.py swaps in small ones)
            return triton.autotune([triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})], key=[])(fn)
        shapes = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts query rows, BLOCK_N key rows
            "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 3)],
            "dkdv": [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 4)],
            "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
        }[kind]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
        streamed = "BLOCK_M" if kind == "dkdv" else "BLOCK_N"  # the tiles the inner loop streams through (pipelined)
        prune = functools.partial(_prune_configs, streamed=streamed)
        return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "LEN_Q", "LEN_K"],
                               prune_configs_by={"early_config_prune": prune})(fn)
    return wrap


def _prune_configs(configs, named_args, streamed, **kwargs):
    """Drop configs whose pipelined tiles (num_stages copies of two streamed tiles, plus two resident ones) would not
    fit in shared memory: a rough estimate, Triton skips the rest itself if they fail to compile."""
    args = {**named_args, **kwargs}
    bytes_per_row = args["HEAD_DIM"] * args["Q"].element_size()
    resident = "BLOCK_N" if streamed == "BLOCK_M" else "BLOCK_M"
    need = lambda c: (c.num_stages * 2 * c.kwargs[streamed] + 2 * c.kwargs[resident]) * bytes_per_row
    fits = [c for c in configs if need(c) <= _shared_memory(args["Q"].device)]
    return fits or [min(configs, key=need)]


@functools.lru_cache
def _shared_memory(device):
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 99 * 1024)


@_jit
def _head(ptr, bh, H, stride_b, stride_h):
    """Base pointer of the (T, D) matrix of batch bh // H, head bh % H (64-bit offsets: big tensors are fine)."""
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@_jit
def _load(ptr, rows, T, stride_t, HEAD_DIM: tl.constexpr):
    """(len(rows), HEAD_DIM) tile; rows >= T read as 0. The head dim has unit stride."""
    return tl.load(ptr + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :], mask=rows[:, None] < T, other=0.0)


@_jit
def _store(ptr, rows, T, stride_t, x, HEAD_DIM: tl.constexpr):
    tl.store(ptr + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :], x.to(ptr.dtype.element_ty),
             mask=rows[:, None] < T)


@_jit
def _visible(i, j, Tk, off, CAUSAL: tl.constexpr):
    """Query i may see key j (i and j broadcast against each other)."""
    ok = j < Tk
    if CAUSAL:
        ok = ok & (j <= i + off)
    return ok


@_jit
def _key_blocks(start_m, Tk, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): keys [0, full) are seen by every row, [full, hi) by some (masked
    blocks), [hi, Tk) by none (skipped). full is a multiple of BLOCK_N, so the ragged key tail is always masked."""
    full, hi = Tk // BLOCK_N * BLOCK_N, Tk
    if CAUSAL:
        full, hi = tl.minimum(Tk, start_m + off + 1) // BLOCK_N * BLOCK_N, tl.minimum(Tk, start_m + BLOCK_M + off)
    return full, hi


@_jit
def _signed(s, p):
    return tl.where(s > 0, p, tl.where(s < 0, -p, 0.0))  # sign(s) * p, with sign(0) = 0


@_jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, lo, hi, Tk, off, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, Tk, stride_kt, HEAD_DIM)
        v = _load(V, cols, Tk, stride_vt, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) logits in base-2 units
        a = tl.abs(s)
        if MASK:
            a = tl.where(_visible(rows[:, None], cols[None, :], Tk, off, CAUSAL), a, float("-inf"))  # after abs
        m_new = tl.maximum(m_i, tl.max(a, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(a - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_signed(s, p).to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd")
@_jit
def _cog_fwd(Q, K, V, O, LSE, qk_scale,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
             stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
             H, Tq, Tk, LEN_Q, LEN_K,
             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    Q, O = _head(Q, bh, H, stride_qb, stride_qh), _head(O, bh, H, stride_ob, stride_oh)
    K, V = _head(K, bh, H, stride_kb, stride_kh), _head(V, bh, H, stride_vb, stride_vh)
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(Q, rows, Tq, stride_qt, HEAD_DIM)
    off = Tk - Tq
    full, hi = _key_blocks(start_m, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # unmasked blocks first: every row sees key 0, so the first block processed gives each row a finite max (no NaN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, 0, full, Tk, off, qk_scale,
                               HEAD_DIM, BLOCK_N, CAUSAL, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, full, hi, Tk, off, qk_scale,
                               HEAD_DIM, BLOCK_N, CAUSAL, True)
    _store(O, rows, Tq, stride_ot, acc / l_i[:, None], HEAD_DIM)
    tl.store(LSE + bh * Tq + rows, m_i + tl.math.log2(l_i), mask=rows < Tq)


@_jit
def _cog_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, H, Tq,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = dO_i . o_i in fp32."""
    rows, bh = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.program_id(1)
    o = _load(_head(O, bh, H, stride_ob, stride_oh), rows, Tq, stride_ot, HEAD_DIM).to(tl.float32)
    do = _load(_head(DO, bh, H, stride_db, stride_dh), rows, Tq, stride_dt, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@_jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dt, cols, lo, hi, Tq, Tk, off, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load(Q, rows, Tq, stride_qt, HEAD_DIM)
        do = _load(DO, rows, Tq, stride_dt, HEAD_DIM)
        lse = tl.load(LSE + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < Tq, other=0.0)
        sT = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): transposed, so dK and dV come out of plain dots
        aT = tl.abs(sT)
        if MASK:
            aT = tl.where(_visible(rows[None, :], cols[:, None], Tk, off, CAUSAL), aT, float("-inf"))
        pT = tl.math.exp2(aT - lse[None, :])
        wT = _signed(sT, pT)
        dv += tl.dot(wT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = tl.where(sT != 0, pT * dpT, 0.0) - wT * delta[None, :]
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@_autotune("dkdv")
@_jit
def _cog_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, qk_scale,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                  stride_db, stride_dh, stride_dt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                  H, Tq, Tk, LEN_Q, LEN_K,
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    Q, DO = _head(Q, bh, H, stride_qb, stride_qh), _head(DO, bh, H, stride_db, stride_dh)
    LSE, DELTA = LSE + bh * Tq, DELTA + bh * Tq
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load(_head(K, bh, H, stride_kb, stride_kh), cols, Tk, stride_kt, HEAD_DIM)
    v = _load(_head(V, bh, H, stride_vb, stride_vh), cols, Tk, stride_vt, HEAD_DIM)
    off = Tk - Tq
    # queries [0, lo) see none of these keys (skipped), [lo, mid) some, [mid, Tq) all (blocks start at lo, unaligned)
    lo, mid = 0, 0
    if CAUSAL:
        lo = tl.maximum(start_n - off, 0)
        mid = lo + (tl.maximum(start_n + BLOCK_N - 1 - off - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dt, cols, lo, mid, Tq, Tk, off, qk_scale,
                         HEAD_DIM, BLOCK_M, CAUSAL, True)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dt, cols, mid, Tq, Tq, Tk, off, qk_scale,
                         HEAD_DIM, BLOCK_M, CAUSAL, False)
    _store(_head(DK, bh, H, stride_dkb, stride_dkh), cols, Tk, stride_dkt, dk * sm_scale, HEAD_DIM)
    _store(_head(DV, bh, H, stride_dvb, stride_dvh), cols, Tk, stride_dvt, dv, HEAD_DIM)


@_jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, lo, hi, Tk, off, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, Tk, stride_kt, HEAD_DIM)
        v = _load(V, cols, Tk, stride_vt, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        a = tl.abs(s)
        if MASK:
            a = tl.where(_visible(rows[:, None], cols[None, :], Tk, off, CAUSAL), a, float("-inf"))
        p = tl.math.exp2(a - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = tl.where(s != 0, p * dp, 0.0) - _signed(s, p) * delta[:, None]
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@_autotune("dq")
@_jit
def _cog_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, qk_scale,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                stride_db, stride_dh, stride_dt, stride_dqb, stride_dqh, stride_dqt,
                H, Tq, Tk, LEN_Q, LEN_K,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    K, V = _head(K, bh, H, stride_kb, stride_kh), _head(V, bh, H, stride_vb, stride_vh)
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(_head(Q, bh, H, stride_qb, stride_qh), rows, Tq, stride_qt, HEAD_DIM)
    do = _load(_head(DO, bh, H, stride_db, stride_dh), rows, Tq, stride_dt, HEAD_DIM)
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DELTA + bh * Tq + rows, mask=rows < Tq, other=0.0)
    off = Tk - Tq
    full, hi = _key_blocks(start_m, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, 0, full, Tk, off, qk_scale,
                   HEAD_DIM, BLOCK_N, CAUSAL, False)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, full, hi, Tk, off, qk_scale,
                   HEAD_DIM, BLOCK_N, CAUSAL, True)
    _store(_head(DQ, bh, H, stride_dqb, stride_dqh), rows, Tq, stride_dqt, dq * sm_scale, HEAD_DIM)


# --- launchers, wrapped as torch custom ops: opaque to torch.compile (no graph break), autograd through the backward op


def _strides(*tensors):  # the (b, h, t) strides of each tensor; the head dim must have unit stride
    return [s for t in tensors for s in t.stride()[:3]]


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_device(t):  # Triton launches on the current CUDA device: make it t's
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _lengths(Tq, Tk):  # the autotuning key's lengths
    return triton.next_power_of_2(Tq), triton.next_power_of_2(Tk)


@torch.library.custom_op("nanocog::cog_attention_fwd", mutates_args=())
def _cog_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    (B, H, Tq, D), Tk = q.shape, k.size(2)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    o = q.new_empty(q.shape)  # (B, H, Tq, D)
    lse = q.new_empty((B, H, Tq), dtype=torch.float32)  # log2-sum-exp2 of |s| * log2(e), per query row
    if o.numel() > 0:
        grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)
        with _on_device(q):
            _cog_fwd[grid](q, k, v, o, lse, scale * LOG2E, *_strides(q, k, v, o), H, Tq, Tk, *_lengths(Tq, Tk),
                           HEAD_DIM=D, CAUSAL=causal)
    return o, lse


@_cog_attention_fwd.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nanocog::cog_attention_bwd", mutates_args=())
def _cog_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (B, H, Tq, D), Tk = q.shape, k.size(2)
    do, q, k, v = _unit_stride(do), _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)  # (B, H, Tq)
    with _on_device(q):
        _cog_bwd_delta[(triton.cdiv(Tq, 64), B * H)](o, do, delta, *_strides(o, do), H, Tq, HEAD_DIM=D, BLOCK_M=64)
        args = (scale, scale * LOG2E, *_strides(q, k, v, do))
        meta = dict(HEAD_DIM=D, CAUSAL=causal)
        _cog_bwd_dkdv[lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H)](
            q, k, v, do, dk, dv, lse, delta, *args, *_strides(dk, dv), H, Tq, Tk, *_lengths(Tq, Tk), **meta)
        _cog_bwd_dq[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, *args, *_strides(dq), H, Tq, Tk, *_lengths(Tq, Tk), **meta)
    return dq, dk, dv


@_cog_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, do, dlse):  # lse is an internal output: its gradient is ignored
    dq, dk, dv = _cog_attention_bwd(do, *ctx.saved_tensors, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_cog_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def cog_attention_triton(q, k, v, causal=False, scale=None):
    """The fused kernel: (B, H, Tq, D) in q's dtype; fp16, bf16 (GPU only) or fp32, head dim 16, 32, 64 or 128."""
    check_attention_inputs(q, k, v)
    D = q.size(-1)
    if triton is None:
        raise ValueError("cog_attention_triton: Triton is not installed (use cog_attention_reference)")
    if D not in HEAD_DIMS:
        raise ValueError(f"cog_attention_triton: head dim {D} is not supported, only {', '.join(map(str, HEAD_DIMS))}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cog_attention_triton: dtype {q.dtype} is not supported, only float16, bfloat16, float32")
    if not q.is_cuda and not (_INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"cog_attention_triton: tensors on {q.device} need CUDA (CPU tensors run in Triton's "
                         "interpreter, which needs TRITON_INTERPRET=1 set before triton is imported)")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise ValueError("cog_attention_triton: bfloat16 is not supported in Triton's interpreter (its bf16 dots are wrong)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _cog_attention_fwd(q, k, v, bool(causal), scale)[0]


def _use_triton(q):
    """CUDA tensors; CPU tensors in Triton's interpreter while TRITON_INTERPRET=1 (read at each call, too)."""
    if triton is None or q.size(-1) not in HEAD_DIMS:
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    interpret = _INTERPRET and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return interpret and q.dtype in (torch.float16, torch.float32)  # the interpreter's bf16 dots are wrong


def cog_attention(q, k, v, causal=False, scale=None, doc_ids=None):
    """Cog attention for the model: (B, H, Tq, D) in q's dtype. The fused kernel where it applies, else the reference.
    doc_ids (B, Tk): per-key document ids of packed sequences (query i has id doc_ids[:, Tk - Tq + i]); a query sees
    only keys of its own document. For now they always go through the reference."""
    check_attention_inputs(q, k, v, doc_ids)
    if doc_ids is None and _use_triton(q):
        return cog_attention_triton(q, k, v, causal, scale)
    return cog_attention_reference(q, k, v, causal, scale, doc_ids)

"""
The tuned fused Cog attention kernel: forward(q, k, v, causal, scale, doc_ids, tile) and backward(...), which
cog_attention.py's chooser runs as its "tuned" backend (cog_attention(..., backend="tuned") runs it alone).

The same FlashAttention-2 algorithm as cog_kernel.py's compact kernel, with the speed tricks chosen from sm_90 compile
reports: the sign as a min.xorsign.abs clamp on rescaled weights, tensor descriptors (TMA) for every tile, a one-pass
backward with atomic dQ adds (two passes when deterministic), document masks that skip other documents' tiles, and
tile tables per head dim. Triton, its no-Triton fallback and the shared constants come from cog_kernel.py.

It runs on CUDA tensors, and on CPU tensors in Triton's interpreter (slow; for tests), which needs TRITON_INTERPRET=1
in the environment before triton is first imported (Triton reads it then).
"""

import contextlib
import functools
import math
import re

import torch

from cog_kernel import _INTERPRET, LOG2E, _jit, padded_head_dim, tl, triton

# ---------------------------------------------------------------------------------------------------------------------
# The fused kernel: FlashAttention-2 structure, as in Triton's tutorial 06-fused-attention.
#
# Forward, one program per block of BLOCK_M query rows, streaming over blocks of BLOCK_N keys. Logits are kept in
# base-2 units, s2 = (q . k) * c with c = scale * log2(e), so exp2 does the work of exp; c > 0, so
# sign(s2) = sign(q . k).
# A running max m and sum l of |s2| per row:
#     m' = max(m, rowmax |s2|),   alpha = 2^(m - m'),   p = 2^(|s2| - m')
#     l' = alpha * l + rowsum p,  acc' = alpha * acc + (sign(s2) * p) @ V
# end in o = acc / l and lse = m + log2(l) (fp32), from which the backward recomputes p = 2^(|s2| - lse).
# The scale is never a separate multiply: |q . k| * c - m' is one fused multiply-add.
#
# Signs without selects. sign(s) * p is computed as clamp(q . k, -p~, p~) = sign(q . k) * min(|q . k|, p~): one
# min.xorsign.abs instruction per fp32 score or per pair of bf16 scores (sm_86+), on weights scaled by a constant F,
#     p~ = F * p = 2^(|s2| - m' - wscale_shift),   F = 2^-wscale_shift = 2^-SIGN_BITS / c,
# which costs nothing (it shifts the exponent). The clamp gives sign(q . k) * p~ exactly whenever |q . k| >= p~, i.e.
# |s2| >= 2^-SIGN_BITS * p; an exact zero gives 0 (sign(0) = 0), a masked key (p~ = 0) gives 0, and only logits within
# 2^-32 * p of zero (below any rounding of s) get a weight in between. F cancels in o = sum w~ v / sum p~, and the
# backward divides it out of dV, dK and dQ at the end. fp16 cannot hold F * p (its exponent range is too small), so
# there p is not rescaled (wscale_shift = 0) and the logits are multiplied by 1/F instead: the same window.
#
# Backward: D_i = dO_i . o_i (a small pre-pass), then with P = softmax(|S|), W = sign(S) * P, dP = dO V^T:
#     dV = W^T dO,   dS = sign(S)^2 * P * dP - W * D = |W| * dP - W * D,   dQ = scale * dS K,   dK = scale * dS^T Q
# where the dS formula comes from:
#     W = sign(S) * P and d sign/ds = 0, so dL/dP_ij = sign(s_ij) dP_ij;
#     softmax over |S|: dL/d|s_ij| = P_ij (sign(s_ij) dP_ij - sum_k P_ik sign(s_ik) dP_ik) = P_ij (sign(s_ij) dP_ij - D_i);
#     d|s|/ds = sign(s): dS_ij = sign(s_ij)^2 P_ij dP_ij - W_ij D_i   (sign^2 = 0 at s = 0 exactly, as torch autograd),
# and sign^2 * P = |W|, so dS costs a multiply and a fused multiply-add, as softmax's P * (dP - D) does.
# One program per block of keys walks over the query blocks: five matmuls per tile (S, dP, dV, dK and dQ), dK and dV
# in registers, dQ added to an fp32 buffer with atomic adds (then scaled and cast), as FlashAttention-2 does. Atomic
# float adds land in any order, so dQ is not bit-reproducible; deterministic=True runs the dQ part as a second pass
# instead (one program per query block walks over the key blocks, recomputing S and dP: seven matmuls, no atomics).
#
# Masking: with off = Tk - Tq, query i sees key j iff j <= i + off and j < Tk. Blocks that no row of the program sees
# are skipped; blocks that every row sees run without the mask (MASK=False); only the boundary blocks pay for it.
# Rows past the end load as zeros: in the backward such a row has q . k = 0, so its weight is 0, and its dO is 0, so it
# adds nothing to dQ, dK, dV; only the forward's sum l needs the ragged key tail masked.
# Any head dim up to 256: tiles are BLOCK_D = next power of two (>= 16) wide, the columns past HEAD_DIM load as zeros.
# Dots take the input dtype (fp16/bf16 with fp32 accumulation; weights and dS are rounded to it before their dots, as
# in FlashAttention). fp32 inputs use Triton's default fp32 dot precision, which is tf32 on NVIDIA GPUs (exact fp32 in
# the interpreter).

SIGN_BITS = 32  # the clamp above is exact for every logit with |s * log2(e)| >= 2^-SIGN_BITS * p


def _version(text):  # "3.6.0+git1234" -> (3, 6)
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", text).groups())


MIN_TRITON = (3, 5)  # Triton 3.4 fails to compile the backward's tensor descriptors (torch 2.9 comes with 3.5)


def kernel_problem():
    """Why the fused kernel cannot run with this Triton (or this Triton's interpreter and NumPy), or None."""
    import numpy
    if triton is None:
        return "Triton is not installed (use cog_attention_reference)"
    if _version(triton.__version__) < MIN_TRITON:
        return (f"Triton {triton.__version__} is too old for the fused kernel, which needs "
                f"{'.'.join(map(str, MIN_TRITON))} or newer: pip install -U torch triton")
    if _INTERPRET and _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} (it turns 1-element "
                "arrays into ints, an error since NumPy 2.4): pip install 'numpy<2.4', or Triton 3.7 or newer")
    return None


if triton is not None:  # module globals that jit code reads must be constexprs
    _SIGN_SCALE = tl.constexpr(2.0**SIGN_BITS)
    # the clamp as one min.xorsign.abs PTX instruction, and |s| as abs.f32: NVIDIA sm_86 and newer (_check_gpu turns
    # it off before the first launch on an older or AMD GPU); never in the interpreter, which cannot run PTX
    XORSIGN = tl.constexpr(not _INTERPRET)


def has_xorsign(backend, arch):
    """Whether a GPU takes the inline PTX (XORSIGN): backend "cuda" or "hip", arch the compute capability as an int
    (80, 90) on CUDA. AMD GPUs run no PTX (ROCm reports a CUDA-like capability, (9, 4) on an MI300X)."""
    return backend == "cuda" and arch >= 86

# Autotuning candidates per kernel and padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M counting
# query rows and BLOCK_N key rows. Chosen from sm_90 compile reports (python bench.py --sm90): for head dims 64 and 128,
# no register spills and every Hopper wgmma at least 64 wide (narrower head dims make narrower dots); the GPU's
# autotuner picks among them by timing. At 256 the backward's dK and dV accumulators alone fill the registers: it
# spills whatever the tiles, so the fast path is head dims up to 128. The one-pass backward at 128 cannot have both:
# its (64, 128) tiles spill under some Triton versions (and softmax's with them: not the signs' doing), so it gets the
# two tiles that spill under none measured, (32, 128, 8, 2), whose dQ matmul (32 query rows) runs on mma.sync, and
# (64, 64, 8, 2), which runs more instructions per score; only timing can rank them. BENCHMARKS.md lists the figures.
TILES = {
    "fwd": {16: [(64, 64, 4, 3), (128, 64, 8, 3)], 32: [(64, 64, 4, 3), (128, 64, 8, 3)],
            64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3)],
            256: [(64, 64, 4, 2), (128, 64, 8, 2)]},
    "bwd": {16: [(64, 64, 4, 3)], 32: [(64, 64, 4, 3)], 64: [(64, 64, 4, 2), (64, 64, 4, 3)],
            128: [(32, 128, 8, 2), (64, 64, 8, 2)], 256: [(64, 64, 8, 2)]},
    "dq": {16: [(64, 64, 4, 3), (128, 64, 8, 3)], 32: [(64, 64, 4, 3), (128, 64, 8, 3)],
           64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
           128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)], 256: [(64, 64, 4, 2)]},
}
TILES["dkdv"] = TILES["bwd"]  # the two-pass backward's first kernel: the one-pass kernel without dQ
# GPUs with ~99 KB of shared memory per block (sm_86, sm_89, sm_120: RTX 3090/4090/5090, A10, L4, L40S) fit none of
# the head dim 128 tiles above; these fit there and spill no registers (chosen from sm_86 compile reports).
SMALL_TILES = {"fwd": {128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3)]},
               "bwd": {128: [(32, 64, 8, 2), (32, 64, 4, 2)]},
               "dq": {128: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)]}}
SMALL_TILES["dkdv"] = SMALL_TILES["bwd"]
FALLBACK_TILE = (32, 32, 4, 1)  # where none of the listed tiles fits in shared memory (fp32 inputs at head dim 128+)


def _autotune(kind, docs=False):
    """Autotune over TILES[kind] on a GPU (keyed on head dim, causal and lengths rounded up to powers of two, so a
    KV-cache decode does not re-tune every step); one fixed config in the interpreter. docs: the document-masked
    variant (its configs set the kernel's DOC_MASK, so each variant compiles and tunes on its own)."""
    def wrap(fn):
        if triton is None:
            return fn
        prune = {"early_config_prune": functools.partial(_prune_configs, kind=kind, fit=not _INTERPRET)}
        if _INTERPRET:  # it runs programs one by one: few, big blocks are fastest (test_kernel.py swaps in small ones)
            config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "DOC_MASK": docs})
            return triton.autotune([config], key=[], prune_configs_by=prune)(fn)
        shapes = sorted({shape for table in (TILES, SMALL_TILES) for by_dim in table[kind].values()
                         for shape in by_dim} | {FALLBACK_TILE})
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "DOC_MASK": docs}, num_warps=w, num_stages=s)
                   for m, n, w, s in shapes]
        return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "LEN_Q", "LEN_K"], prune_configs_by=prune,
                               pre_hook=_zero_dq_sum)(fn)
    return wrap


def _zero_dq_sum(nargs, reset_only=False):
    """Autotuning runs the one-pass backward once per config: each run must start from an empty dQ sum."""
    if nargs.get("ACC_DQ") is not None:
        nargs["ACC_DQ"].zero_()


def shared_memory_bytes(kind, block_m, block_n, num_stages, block_d, itemsize):
    """What a config keeps in shared memory: num_stages copies of the two tiles its loop streams, plus the tiles that
    stay (the forward's Q; the backward's K and V; the dQ pass's Q and dO) and, in the one-pass backward ("bwd"; "dkdv"
    is the two-pass backward's first kernel), the (BLOCK_M, BLOCK_N) dS tile twice on its way to the dQ dot.
    Accumulators live in registers. An estimate, close to the sm_90 compiler's figure but for the one-pass backward's
    tiles at head dim 128, where it is off either way (bench.py --sm90 prints both; BENCHMARKS.md lists them): a tile
    let through that does not fit fails its first-use check and is dropped."""
    streamed, resident = {
        "fwd": (2 * block_n, block_m),
        "bwd": (2 * block_m, 2 * block_n + 2 * block_m * block_n // block_d),
        "dkdv": (2 * block_m, 2 * block_n),
        "dq": (2 * block_n, 2 * block_m),
    }[kind]
    return (num_stages * streamed + resident) * block_d * itemsize


def candidate_tiles(kind, head_dim, itemsize, shared_memory):
    """The tiles autotuning may pick for TILES kind at this head dim, element size (bytes) and shared memory per block
    (bytes): those TILES lists whose shared memory fits; if none, those of SMALL_TILES (fp16, bf16); else FALLBACK_TILE."""
    block_d = padded_head_dim(head_dim)
    for table in (TILES, SMALL_TILES) if itemsize == 2 else (TILES,):  # (SMALL_TILES: fp16/bf16 reports only)
        fits = [t for t in table[kind].get(block_d, []) if shared_memory_bytes(kind, t[0], t[1], t[3], block_d,
                                                                                 itemsize) <= shared_memory]
        if fits:
            return fits
    return [FALLBACK_TILE]


def _prune_configs(configs, named_args, kind, fit=True, **kwargs):
    """Keep the configs of candidate_tiles for this launch (if fit; the interpreter has no shared memory to fit), and of
    those, where the chooser's first-use check has run (check_tiles), the ones that passed it."""
    args = {**named_args, **kwargs}
    q, D = args["Q"], args["HEAD_DIM"]
    keep = candidate_tiles(kind, D, q.element_size(), _shared_memory(q.device)) if fit else map(_shape, configs)
    keep = checked_tiles.get(_checked_key(kind, q, D, args.get("CAUSAL"), args.get("DOCS") is not None), list(keep))
    return [c for c in configs if _shape(c) in keep]


def _shape(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


# The tile-by-tile first-use check of the chooser (cog_attention.py). Each kernel a configuration runs is checked in
# the order it runs, with every tile autotuning may pick for it, pinned one at a time (no autotuning), on the outputs
# it computes (the forward's o; the one-pass backward's dq, dk, dv; the two-pass dk, dv, then dq). The tiles that pass
# are kept in checked_tiles, where _prune_configs finds them: autotuning never picks a tile that gave wrong numbers.
JUDGED = {"fwd": ("output",), "bwd": ("dq", "dk", "dv"), "dkdv": ("dk", "dv"), "dq": ("dq",)}
checked_tiles = {}  # _checked_key(...) -> the tiles that passed


def _checked_key(kind, q, head_dim, causal, docs):  # (by tile width: the key is the same before and after pad_rows)
    return kind, str(q.device), q.dtype, padded_head_dim(head_dim), bool(causal), docs


def _two_pass(deterministic, head_dim):
    # past head dim 128 the one-pass kernel spills more registers than the two passes do together (bench.py --sm90)
    return deterministic or head_dim > 128


def check_tiles(check, q, causal, deterministic, docs):
    """check(tiles, judged): why the outputs named in judged are wrong with the kernels pinned to tiles {kind: tile}, or
    None. While one kernel's tiles are checked, the others run their first tile that passed (or, not yet checked, their
    first candidate). Returns (whether every kernel kept a tile, the failures, as "kind tile: why")."""
    D = q.size(-1)
    kinds = ("fwd", "dkdv", "dq") if _two_pass(deterministic, D) else ("fwd", "bwd")
    candidates = {kind: candidate_tiles(kind, D, q.element_size(), _shared_memory(q.device)) if q.is_cuda else
                  [_shape(c) for c in kernels(docs)[kind].configs] for kind in kinds}
    pinned, failures = {kind: tiles[0] for kind, tiles in candidates.items()}, []
    for kind in kinds:
        key = _checked_key(kind, q, D, causal, docs)
        checked_tiles.pop(key, None)
        passed = []
        for tile in candidates[kind]:
            why = check({**pinned, kind: tile}, JUDGED[kind])
            if why:
                failures.append(f"{kind} tile {tile}: {why}")
            else:
                passed.append(tile)
        if not passed:
            return False, failures
        pinned[kind], checked_tiles[key] = passed[0], passed
        dropped = [tile for tile in candidates[kind] if tile not in passed]
        cache = kernels(docs)[kind].cache  # autotuning's choices so far: where it chose a tile just dropped, it chooses
        for choice in [key for key, config in cache.items() if _shape(config) in dropped]:  # anew (the rest stand)
            del cache[choice]
    return True, failures


@functools.lru_cache
def _shared_memory(device):
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 99 * 1024)


@_jit
def _matrix(ptr, bh, H, stride_b, stride_h, T, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """The (T, HEAD_DIM) matrix of batch bh // H, head bh % H, read and written as (BLOCK, BLOCK_D) tiles through a
    tensor descriptor (the TMA copy engine on Hopper: no per-thread addresses); rows >= T and columns >= HEAD_DIM read
    as 0 and are not written. The head's offset is 64-bit, so big tensors are fine."""
    base = ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    return tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK, BLOCK_D])


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
def _block_and_head(num_blocks, CAUSAL: tl.constexpr):
    """(block, batch-head) of this program on a 1-D grid (no 65,535 limit on B * H); causal runs the longest blocks
    (the last ones) first, so the short ones fill the tail of the launch."""
    pid = tl.program_id(0)
    block, bh = pid % num_blocks, pid // num_blocks
    if CAUSAL:
        block = num_blocks - 1 - block
    return block, bh


# The only two places where Cog attention differs from softmax attention (bench.py builds a softmax twin of these
# kernels by swapping them, to measure what the signs cost).
@_jit
def _magnitude(qk):
    """|q . k| (fp32): softmax runs over it. As a PTX abs.f32, which ptxas folds into the exp2's multiply-add as an
    operand modifier; Triton lowers tl.abs to a bitwise and, which older ptxas versions keep as one more instruction
    per score (BENCHMARKS.md)."""
    if XORSIGN:
        return tl.inline_asm_elementwise("abs.f32 $0, $1;", "=r,r", [qk], dtype=tl.float32, is_pure=True, pack=1)
    return tl.abs(qk)


@_jit
def _signed_weights(qk, p, qk_scale, FP16: tl.constexpr, OUT: tl.constexpr):
    """sign(q . k) * p as dtype OUT, with sign(0) = 0 (p = 0 for masked keys): clamp(q . k, -p, p) on rescaled p."""
    if FP16:  # p is not rescaled (F = 1): scale the logits up instead, for the same 2^-SIGN_BITS window
        w = _copysign_min(qk * (qk_scale * _SIGN_SCALE), p).to(OUT)
    elif OUT == tl.bfloat16:  # rounding first keeps signs and zeros, and bf16 clamps two scores per instruction
        w = _copysign_min(qk.to(OUT), p.to(OUT))
    else:
        w = _copysign_min(qk, p).to(OUT)
    return w


@_jit
def _copysign_min(x, p):
    """sign(x) * min(|x|, p) for p >= 0, i.e. clamp(x, -p, p): one min.xorsign.abs instruction per fp32 score or pair
    of bf16 scores (sm_86+), two min/max elsewhere (and in the interpreter, which cannot run PTX)."""
    if not XORSIGN:  # (Triton 3.5-3.8 compute bf16 min/max in fp32: cast back, or the bf16 dot gets fp32)
        w = tl.minimum(tl.maximum(x, -p), p).to(x.dtype)
    elif x.dtype == tl.bfloat16:
        w = tl.inline_asm_elementwise("min.xorsign.abs.bf16x2 $0, $1, $2;", "=r,r,r", [x, p], dtype=tl.bfloat16,
                                      is_pure=True, pack=2)
    else:
        w = tl.inline_asm_elementwise("min.xorsign.abs.f32 $0, $1, $2;", "=r,r,r", [x, p], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return w


@_jit
def _doc_of(DOCS, pos, Tk):
    """The document of each key position in pos (-1 outside [0, Tk)): the position where it starts, which names it."""
    return tl.load(DOCS + pos, mask=(pos >= 0) & (pos < Tk), other=-1).to(tl.int32)


@_jit
def _doc_span(DOCS, first, last, Tk):
    """Where the document of key position first starts, where that of last ends (exclusive), and whether they are one
    document. DOCS holds two rows of Tk: each position's document start, then its end."""
    start = tl.load(DOCS + first).to(tl.int32)
    end = tl.load(DOCS + Tk + last).to(tl.int32)
    return start, end, start == tl.load(DOCS + last).to(tl.int32)


@_jit
def _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, doc_rows, rows, lo, hi, Tk, off, qk_scale, wscale_shift,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, FP16: tl.constexpr,
               DOC_MASK: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = K.load([start_n, 0])
        v = V.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) unscaled logits
        a = _magnitude(qk)
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = _visible(rows[:, None], cols[None, :], Tk, off, CAUSAL)
            if DOC_MASK:
                visible = visible & (doc_rows[:, None] == _doc_of(DOCS, cols, Tk)[None, :])
            a = tl.where(visible, a, float("-inf"))  # after abs
        m_new = tl.maximum(m_i, tl.max(a, 1) * qk_scale)
        if MASK and DOC_MASK:  # a row may see no key yet (its document starts later): keep 2^(-inf - -inf) from NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(a * qk_scale - (m_new + wscale_shift)[:, None])  # F * 2^(|s2| - m')
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_signed_weights(qk, p, qk_scale, FP16, v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _query_block_keys(DOCS, start_m, Tq, Tk, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """With document masks, the keys of query rows [start_m, start_m + BLOCK_M): [lo, full_lo) and [back, hi) in
    masked blocks, [full_lo, full) seen by every row (only when all the rows are in one document); blocks of other
    documents are skipped."""
    full, hi = _key_blocks(start_m, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
    doc_lo, doc_hi, one_doc = _doc_span(DOCS, start_m + off, tl.minimum(start_m + BLOCK_M, Tq) - 1 + off, Tk)
    lo, hi = doc_lo // BLOCK_N * BLOCK_N, tl.minimum(hi, doc_hi)
    full_lo = tl.where(one_doc, (doc_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    full = tl.where(one_doc, tl.minimum(full, doc_hi // BLOCK_N * BLOCK_N), lo)
    return lo, full_lo, full, tl.maximum(full, full_lo), hi


@_jit
def _cog_fwd(Q, K, V, O, LSE, DOCS, qk_scale, wscale_shift,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
             stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
             H, Tq, Tk, LEN_Q, LEN_K,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DOC_MASK: tl.constexpr):
    FP16: tl.constexpr = Q.dtype.element_ty == tl.float16
    block, bh = _block_and_head(tl.cdiv(Tq, BLOCK_M), CAUSAL)
    start_m = block * BLOCK_M
    Q = _matrix(Q, bh, H, stride_qb, stride_qh, Tq, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D)
    O = _matrix(O, bh, H, stride_ob, stride_oh, Tq, stride_ot, BLOCK_M, HEAD_DIM, BLOCK_D)
    K = _matrix(K, bh, H, stride_kb, stride_kh, Tk, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D)
    V = _matrix(V, bh, H, stride_vb, stride_vh, Tk, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK_M)
    q = Q.load([start_m, 0])
    off = Tk - Tq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DOC_MASK:
        DOCS += (bh // H).to(tl.int64) * 2 * Tk
        # query i sits at key position i + off (rows past the end take the last one's: finite, and never stored)
        doc_rows = _doc_of(DOCS, tl.minimum(rows, Tq - 1) + off, Tk)
        lo, full_lo, full, back, hi = _query_block_keys(DOCS, start_m, Tq, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, doc_rows, rows, full_lo, full, Tk, off, qk_scale,
                                   wscale_shift, BLOCK_N, CAUSAL, False, FP16, True)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, doc_rows, rows, lo, full_lo, Tk, off, qk_scale,
                                   wscale_shift, BLOCK_N, CAUSAL, True, FP16, True)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, doc_rows, rows, back, hi, Tk, off, qk_scale,
                                   wscale_shift, BLOCK_N, CAUSAL, True, FP16, True)
    else:
        full, hi = _key_blocks(start_m, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
        # unmasked blocks first: every row sees key 0, so the first block gives each row a finite max (no NaN)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, rows, rows, 0, full, Tk, off, qk_scale,
                                   wscale_shift, BLOCK_N, CAUSAL, False, FP16, False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, DOCS, rows, rows, full, hi, Tk, off, qk_scale,
                                   wscale_shift, BLOCK_N, CAUSAL, True, FP16, False)
    O.store([start_m, 0], (acc / l_i[:, None]).to(O.dtype))
    # l_i is F * l, so log2(l) = log2(l_i) + wscale_shift
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m_i + wscale_shift + tl.math.log2(l_i), mask=rows < Tq)


@_jit
def _cog_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, H, Tq,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = dO_i . o_i in fp32."""
    block, bh = _block_and_head(tl.cdiv(Tq, BLOCK_M), False)
    start_m = block * BLOCK_M
    o = _matrix(O, bh, H, stride_ob, stride_oh, Tq, stride_ot, BLOCK_M, HEAD_DIM, BLOCK_D).load([start_m, 0])
    do = _matrix(DO, bh, H, stride_db, stride_dh, Tq, stride_dt, BLOCK_M, HEAD_DIM, BLOCK_D).load([start_m, 0])
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Tq)


@_jit
def _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, doc_cols, cols, lo, hi, Tq, Tk, off, qk_scale,
               wscale_shift, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, FP16: tl.constexpr, DOC_MASK: tl.constexpr):
    """Over query blocks [lo, hi): dK and dV of this key block, and (if ACC_DQ is a buffer) dQ added atomically."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = Q.load([start_m, 0])
        do = DO.load([start_m, 0])
        lse = tl.load(LSE + rows, mask=rows < Tq, other=0.0) + wscale_shift
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M): transposed, so dK and dV come out of plain dots
        aT = _magnitude(qkT)
        if MASK:
            visible = _visible(rows[None, :], cols[:, None], Tk, off, CAUSAL)
            if DOC_MASK:
                visible = visible & (_doc_of(DOCS, rows + off, Tk)[None, :] == doc_cols[:, None])
            aT = tl.where(visible, aT, float("-inf"))
        pT = tl.math.exp2(aT * qk_scale - lse[None, :])  # F * P^T
        wT = _signed_weights(qkT, pT, qk_scale, FP16, tl.float32)
        dv += tl.dot(wT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        # D is loaded here, where it is used: loaded with lse it stays live across the tile and the D=128 tiles spill
        delta = tl.load(DELTA + rows, mask=rows < Tq, other=0.0)
        dsT = tl.abs(wT) * dpT - wT * delta[None, :]  # F * dS^T
        dk += tl.dot(dsT.to(q.dtype), q)
        if ACC_DQ is not None:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k)  # (BLOCK_M, BLOCK_D)
            dq_cols = tl.arange(0, BLOCK_D)
            dq_mask = rows[:, None] < Tq
            if HEAD_DIM != BLOCK_D:
                dq_mask = dq_mask & (dq_cols[None, :] < HEAD_DIM)
            tl.atomic_add(ACC_DQ + rows[:, None] * HEAD_DIM + dq_cols[None, :], dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@_jit
def _cog_bwd(Q, K, V, DO, DK, DV, ACC_DQ, LSE, DELTA, DOCS, qk_scale, wscale_shift, grad_scale,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
             stride_db, stride_dh, stride_dt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
             H, Tq, Tk, LEN_Q, LEN_K,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DOC_MASK: tl.constexpr):
    """One program per key block: dK and dV; dQ too, added atomically to the fp32 (B, H, Tq, HEAD_DIM) buffer ACC_DQ,
    unless ACC_DQ is None (the deterministic backward, which runs _cog_bwd_dq after this)."""
    FP16: tl.constexpr = Q.dtype.element_ty == tl.float16
    block, bh = _block_and_head(tl.cdiv(Tk, BLOCK_N), False)
    start_n = block * BLOCK_N
    Q = _matrix(Q, bh, H, stride_qb, stride_qh, Tq, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D)
    DO = _matrix(DO, bh, H, stride_db, stride_dh, Tq, stride_dt, BLOCK_M, HEAD_DIM, BLOCK_D)
    k = _matrix(K, bh, H, stride_kb, stride_kh, Tk, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D).load([start_n, 0])
    v = _matrix(V, bh, H, stride_vb, stride_vh, Tk, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D).load([start_n, 0])
    LSE, DELTA = LSE + bh.to(tl.int64) * Tq, DELTA + bh.to(tl.int64) * Tq
    if ACC_DQ is not None:
        ACC_DQ += bh.to(tl.int64) * Tq * HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N)
    off = Tk - Tq
    # queries [0, lo) see none of these keys (skipped), [lo, mid) some, [mid, Tq) all (blocks start at lo, unaligned)
    lo, mid = 0, 0
    if CAUSAL:
        lo = tl.maximum(start_n - off, 0)
        mid = lo + (tl.maximum(start_n + BLOCK_N - 1 - off - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if DOC_MASK:  # and only the queries of these keys' documents: [lo, front) and [back, hi) masked, [mid, mid_hi) not
        DOCS += (bh // H).to(tl.int64) * 2 * Tk
        doc_cols = _doc_of(DOCS, cols, Tk)
        doc_lo, doc_hi, one_doc = _doc_span(DOCS, start_n, tl.minimum(start_n + BLOCK_N, Tk) - 1, Tk)
        lo, hi = tl.maximum(lo, doc_lo - off), tl.minimum(Tq, doc_hi - off)
        if CAUSAL:
            mid = lo + (tl.maximum(start_n + BLOCK_N - 1 - off - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            mid = lo
        mid_hi = tl.where(one_doc, lo + tl.maximum(hi - lo, 0) // BLOCK_M * BLOCK_M, lo)
        front = tl.minimum(mid, hi)
        dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, doc_cols, cols, mid, mid_hi, Tq, Tk, off,
                            qk_scale, wscale_shift, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False, FP16, True)
        dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, doc_cols, cols, lo, front, Tq, Tk, off,
                            qk_scale, wscale_shift, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True, FP16, True)
        dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, doc_cols, cols, tl.maximum(front, mid_hi),
                            hi, Tq, Tk, off, qk_scale, wscale_shift, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True, FP16,
                            True)
    else:
        dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, cols, cols, lo, mid, Tq, Tk, off,
                            qk_scale, wscale_shift, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True, FP16, False)
        dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, ACC_DQ, LSE, DELTA, DOCS, cols, cols, mid, Tq, Tq, Tk, off,
                            qk_scale, wscale_shift, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False, FP16, False)
    DK = _matrix(DK, bh, H, stride_dkb, stride_dkh, Tk, stride_dkt, BLOCK_N, HEAD_DIM, BLOCK_D)
    DV = _matrix(DV, bh, H, stride_dvb, stride_dvh, Tk, stride_dvt, BLOCK_N, HEAD_DIM, BLOCK_D)
    DK.store([start_n, 0], (dk * grad_scale).to(DK.dtype))  # grad_scale = scale / F
    DV.store([start_n, 0], (dv * tl.math.exp2(wscale_shift)).to(DV.dtype))  # 1 / F


@_jit
def _dq_inner(dq, q, do, lse, delta, K, V, DOCS, doc_rows, rows, lo, hi, Tk, off, qk_scale,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, FP16: tl.constexpr,
              DOC_MASK: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = K.load([start_n, 0])
        v = V.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k))
        a = _magnitude(qk)
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = _visible(rows[:, None], cols[None, :], Tk, off, CAUSAL)
            if DOC_MASK:
                visible = visible & (doc_rows[:, None] == _doc_of(DOCS, cols, Tk)[None, :])
            a = tl.where(visible, a, float("-inf"))
        p = tl.math.exp2(a * qk_scale - lse[:, None])  # F * P
        w = _signed_weights(qk, p, qk_scale, FP16, tl.float32)
        dp = tl.dot(do, tl.trans(v))
        ds = tl.abs(w) * dp - w * delta[:, None]  # F * dS
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@_jit
def _cog_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, DOCS, qk_scale, wscale_shift, grad_scale,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                stride_db, stride_dh, stride_dt, stride_dqb, stride_dqh, stride_dqt,
                H, Tq, Tk, LEN_Q, LEN_K,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DOC_MASK: tl.constexpr):
    """The deterministic backward's dQ pass: one program per query block walks over the key blocks."""
    FP16: tl.constexpr = Q.dtype.element_ty == tl.float16
    block, bh = _block_and_head(tl.cdiv(Tq, BLOCK_M), CAUSAL)
    start_m = block * BLOCK_M
    K = _matrix(K, bh, H, stride_kb, stride_kh, Tk, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D)
    V = _matrix(V, bh, H, stride_vb, stride_vh, Tk, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D)
    q = _matrix(Q, bh, H, stride_qb, stride_qh, Tq, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D).load([start_m, 0])
    do = _matrix(DO, bh, H, stride_db, stride_dh, Tq, stride_dt, BLOCK_M, HEAD_DIM, BLOCK_D).load([start_m, 0])
    rows = start_m + tl.arange(0, BLOCK_M)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0) + wscale_shift
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    off = Tk - Tq
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DOC_MASK:
        DOCS += (bh // H).to(tl.int64) * 2 * Tk
        doc_rows = _doc_of(DOCS, tl.minimum(rows, Tq - 1) + off, Tk)
        lo, full_lo, full, back, hi = _query_block_keys(DOCS, start_m, Tq, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, DOCS, doc_rows, rows, full_lo, full, Tk, off, qk_scale,
                       BLOCK_N, CAUSAL, False, FP16, True)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, DOCS, doc_rows, rows, lo, full_lo, Tk, off, qk_scale,
                       BLOCK_N, CAUSAL, True, FP16, True)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, DOCS, doc_rows, rows, back, hi, Tk, off, qk_scale,
                       BLOCK_N, CAUSAL, True, FP16, True)
    else:
        full, hi = _key_blocks(start_m, Tk, off, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, DOCS, rows, rows, 0, full, Tk, off, qk_scale,
                       BLOCK_N, CAUSAL, False, FP16, False)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, DOCS, rows, rows, full, hi, Tk, off, qk_scale,
                       BLOCK_N, CAUSAL, True, FP16, False)
    DQ = _matrix(DQ, bh, H, stride_dqb, stride_dqh, Tq, stride_dqt, BLOCK_M, HEAD_DIM, BLOCK_D)
    DQ.store([start_m, 0], (dq * grad_scale).to(DQ.dtype))


# One jit kernel, several autotuners: each variant keeps its own tuning (and shared-memory needs) apart. The two-pass
# backward's first kernel is _cog_bwd without the dQ buffer; the document-masked ones have DOC_MASK in their configs.
_fwd = _autotune("fwd")(_cog_fwd)
_fwd_docs = _autotune("fwd", docs=True)(_cog_fwd)
_bwd_one_pass = _autotune("bwd")(_cog_bwd)
_bwd_one_pass_docs = _autotune("bwd", docs=True)(_cog_bwd)
_bwd_dkdv = _autotune("dkdv")(_cog_bwd)
_bwd_dkdv_docs = _autotune("dkdv", docs=True)(_cog_bwd)
_dq_pass = _autotune("dq")(_cog_bwd_dq)
_dq_pass_docs = _autotune("dq", docs=True)(_cog_bwd_dq)


def kernels(docs=False):
    """The autotuned kernels of one variant, by TILES kind."""
    if docs:
        return dict(fwd=_fwd_docs, bwd=_bwd_one_pass_docs, dkdv=_bwd_dkdv_docs, dq=_dq_pass_docs)
    return dict(fwd=_fwd, bwd=_bwd_one_pass, dkdv=_bwd_dkdv, dq=_dq_pass)


# --- launchers: forward and backward (at the end) are what cog_attention.py's chooser calls


def _strides(*tensors):  # the (b, h, t) strides of each tensor; the head dim must have unit stride
    return [s for t in tensors for s in t.stride()[:3]]


def _tma_ready(t):
    """A copy of t where the tensor descriptors could not read it: TMA needs a 16-byte aligned start and 16-byte
    multiples for the batch, head and row strides (the head dim itself is padded by pad_rows)."""
    size = t.element_size()
    aligned = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        stride * size % 16 == 0 for stride, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _on_device(t):  # Triton launches on the current CUDA device: make it t's
    if not t.is_cuda:
        return contextlib.nullcontext()
    _check_gpu(t.device)
    return torch.cuda.device(t.device)


@functools.lru_cache
def _check_gpu(device):
    """Before the first launch: tensor descriptors made inside a kernel need a little global scratch memory (from
    torch's allocator), and GPUs older than sm_86, and AMD's, lack min.xorsign.abs. One process, one GPU architecture: Triton
    refuses to launch a kernel compiled under another value of XORSIGN."""
    global XORSIGN
    # (on the current device, which _on_device makes the tensors')
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    major, minor = torch.cuda.get_device_capability(device)
    if not has_xorsign("hip" if torch.version.hip else "cuda", 10 * major + minor):
        XORSIGN = tl.constexpr(False)


def _lengths(Tq, Tk):  # the autotuning key's lengths
    return triton.next_power_of_2(Tq), triton.next_power_of_2(Tk)


def _blocks(T, BLOCK, B, H):  # a 1-D grid: every block of every batch-head
    return (triton.cdiv(T, BLOCK) * B * H,)


def _weight_shift(dtype, scale):
    """log2(1/F) for the rescaled weights F * p (see the kernel's comment): 2^-SIGN_BITS / c, kept where F * p and
    F * dS stay far from fp32/bf16 underflow; 0 for fp16, which has no room (it uses exact selects instead)."""
    if dtype == torch.float16:
        return 0.0
    return min(max(SIGN_BITS + math.log2(scale * LOG2E), 0.0), 64.0)


def document_table(doc_ids):
    """(B, 2, Tk) int32 for the kernels: where each key's document starts (which also names the document), and where
    it ends (exclusive). doc_ids: (B, Tk), non-decreasing along each row."""
    ids = doc_ids.contiguous()
    starts, ends = torch.searchsorted(ids, ids), torch.searchsorted(ids, ids, right=True)
    return torch.stack([starts, ends], dim=1).to(torch.int32).contiguous()


def _launch(tuned, kind, tiles, grid, *args, **meta):
    """tuned[kind][grid](*args, **meta): autotuned, or with a tile for kind in tiles, pinned to that tile (the chooser's
    first-use check)."""
    kernel = tuned[kind]
    if kind in (tiles or {}):
        m, n, warps, stages = tiles[kind]
        meta.update(BLOCK_M=m, BLOCK_N=n, DOC_MASK=kernel.configs[0].kwargs["DOC_MASK"], num_warps=warps,
                    num_stages=stages)
        kernel = kernel.fn
    kernel[grid](*args, **meta)


def attention_forward(q, k, v, causal, scale, docs=None, tuned=None, tiles=None):
    """o and lse (base 2) of Cog attention through the forward kernel; docs: a document_table; tuned: the kernels()
    to use (bench.py passes a softmax twin's); tiles: {kind: tile} to pin (see _launch)."""
    tuned = tuned or kernels(docs is not None)
    (B, H, Tq, D), Tk = q.shape, k.size(2)
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    o = q.new_empty(q.shape)  # (B, H, Tq, D)
    lse = q.new_empty((B, H, Tq), dtype=torch.float32)  # log2-sum-exp2 of |s| * log2(e), per query row
    if o.numel() > 0:
        with _on_device(q):
            _launch(tuned, "fwd", tiles, lambda META: _blocks(Tq, META["BLOCK_M"], B, H),
                    q, k, v, o, lse, docs, scale * LOG2E, _weight_shift(q.dtype, scale), *_strides(q, k, v, o), H, Tq,
                    Tk, *_lengths(Tq, Tk), HEAD_DIM=D, BLOCK_D=padded_head_dim(D), CAUSAL=causal)
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal, scale, deterministic, docs=None, tuned=None, tiles=None):
    """dq, dk, dv through the backward kernels: one pass with atomic dQ adds, or two passes if deterministic."""
    tuned = tuned or kernels(docs is not None)
    (B, H, Tq, D), Tk = q.shape, k.size(2)
    do, q, k, v, o = (_tma_ready(t) for t in (do, q, k, v, o))
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0:
        return q.new_empty(q.shape), dk.zero_(), dv.zero_()
    wscale_shift = _weight_shift(q.dtype, scale)
    grad_scale = scale * 2.0 ** wscale_shift  # dS came out F times too small
    delta = torch.empty_like(lse)  # (B, H, Tq)
    two_pass = _two_pass(deterministic, D)
    dq_sum = None if two_pass else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=D, BLOCK_D=padded_head_dim(D), CAUSAL=causal)
    with _on_device(q):
        _cog_bwd_delta[_blocks(Tq, 64, B, H)](o, do, delta, *_strides(o, do), H, Tq, HEAD_DIM=D,
                                              BLOCK_D=meta["BLOCK_D"], BLOCK_M=64)
        _launch(tuned, "dkdv" if two_pass else "bwd", tiles, lambda META: _blocks(Tk, META["BLOCK_N"], B, H),
                q, k, v, do, dk, dv, dq_sum, lse, delta, docs, scale * LOG2E, wscale_shift, grad_scale,
                *_strides(q, k, v, do, dk, dv), H, Tq, Tk, *_lengths(Tq, Tk), **meta)
        if two_pass:
            dq = q.new_empty(q.shape)
            _launch(tuned, "dq", tiles, lambda META: _blocks(Tq, META["BLOCK_M"], B, H),
                    q, k, v, do, dq, lse, delta, docs, scale * LOG2E, wscale_shift, grad_scale,
                    *_strides(q, k, v, do, dq), H, Tq, Tk, *_lengths(Tq, Tk), **meta)
        else:
            dq = (dq_sum * grad_scale).to(q.dtype)
    return dq, dk, dv


def forward(q, k, v, causal, scale, doc_ids, tile):
    """o and lse, for the chooser (cog_attention.py): its forward signature (tile: the {kind: tile} to pin, or None to
    autotune), scale > 0."""
    docs = None if doc_ids is None else document_table(doc_ids)
    o, lse = attention_forward(*(pad_rows(t) for t in (q, k, v)), causal, scale, docs, tiles=tile)
    return o[..., :q.size(-1)], lse


def backward(do, q, k, v, o, lse, causal, scale, deterministic, doc_ids, tile):
    """dq, dk, dv, for the chooser (cog_attention.py): its backward signature."""
    docs = None if doc_ids is None else document_table(doc_ids)
    grads = attention_backward(*(pad_rows(t) for t in (do, q, k, v, o)), lse, causal, scale, deterministic, docs,
                               tiles=tile)
    return tuple(g[..., :q.size(-1)] for g in grads)


def pad_rows(t):
    """The tensor descriptors need rows of a 16-byte multiple: pad with zero columns, which add nothing to q . k
    (nor to o, dq, dk, dv: callers cut them off)."""
    pad = -t.size(-1) % (16 // t.element_size())
    return torch.nn.functional.pad(t, (0, pad)) if pad else t

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

import math
import os

import torch


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
    if torch.compiler.is_compiling() or Tk < 2:  # a data-dependent check would break torch.compile's graph
        return
    ordered = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all()
    message = "cog attention: doc_ids must be non-decreasing along the sequence (packed documents)"
    if doc_ids.is_cuda:  # checked on the GPU without waiting for it (reading the answer would stall every layer)
        torch._assert_async(ordered, message)
    elif not ordered:
        raise ValueError(message + ", but they decrease somewhere")


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


def cog_attention_triton(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None):
    """The tuned fused kernel (cog_kernel_tuned.py)."""
    from cog_kernel_tuned import cog_attention_triton as tuned
    return tuned(q, k, v, causal, scale, deterministic, doc_ids)


def _use_triton(q):
    """CUDA tensors; CPU tensors in Triton's interpreter while TRITON_INTERPRET=1 (read at each call, too)."""
    import cog_kernel_tuned as tuned
    if tuned.triton is None or q.size(-1) > tuned.MAX_HEAD_DIM:
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    interpret = tuned._INTERPRET and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and \
        not tuned.kernel_problem()  # the interpreter is for tests: where it cannot run, the reference does
    return interpret and q.dtype in (torch.float16, torch.float32)  # the interpreter's bf16 dots are wrong


def cog_attention(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None):
    """Cog attention for the model: (B, H, Tq, D) in q's dtype. The fused kernel where it applies, else the reference.
    deterministic: see cog_attention_triton (the reference is always deterministic).
    doc_ids (B, Tk): per-key document ids of packed sequences (query i has id doc_ids[:, Tk - Tq + i]); a query sees
    only keys of its own document; the kernel skips the blocks of other documents."""
    check_attention_inputs(q, k, v)  # enough to dispatch on; either path checks doc_ids (a pass over them) itself
    if _use_triton(q):
        return cog_attention_triton(q, k, v, causal, scale, deterministic, doc_ids)
    return cog_attention_reference(q, k, v, causal, scale, doc_ids)

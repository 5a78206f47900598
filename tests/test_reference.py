"""
The reference Cog attention (cog_kernel.cog_attention_reference, the definition) against an independent computation,
its gradients, its input checks, and document masks.
"""

import math

import numpy as np
import pytest
import torch

from cog_attention import cog_attention
from cog_kernel import causal_mask, cog_attention_reference, cog_attention_weights
from model import softmax_attn

torch.set_num_threads(min(2, torch.get_num_threads()))


def independent_cog(q, k, v, causal=False, scale=None):
    """Cog attention row by row in float64 numpy, written from the formula without sharing code with cog_kernel."""
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, Tq, D))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                visible = Tk if not causal else i + (Tk - Tq) + 1
                s = np.array([q[b, h, i] @ k[b, h, j] * scale for j in range(visible)])
                p = np.exp(np.abs(s) - np.abs(s).max())
                w = np.sign(s) * p / p.sum()
                out[b, h, i] = w @ v[b, h, :visible]
    return torch.from_numpy(out)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -----------------------------------------------------------------------------
# the reference Cog attention

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (5, 5), (3, 7), (1, 6)])
def test_reference_matches_independent_computation(causal, Tq, Tk):
    q, k, v = randn(2, 3, Tq, 8, seed=1), randn(2, 3, Tk, 8, seed=2), randn(2, 3, Tk, 8, seed=3)
    out = cog_attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out, independent_cog(q, k, v, causal), rtol=1e-10, atol=1e-12)
    out = cog_attention_reference(q, k, v, causal=causal, scale=0.7)
    torch.testing.assert_close(out, independent_cog(q, k, v, causal, scale=0.7), rtol=1e-10, atol=1e-12)


def test_weights_by_hand_signs_and_zero():
    # one query, three keys with logits +2, -1 and exactly 0 (head dim 1, scale 1)
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64).view(1, 1, 3, 1)
    w = cog_attention_weights(q, k, scale=1.0)[0, 0, 0]
    z = math.e ** 2 + math.e + 1  # the zero logit still counts in the denominator (exp(0) = 1) ...
    torch.testing.assert_close(w, torch.tensor([math.e ** 2 / z, -math.e / z, 0.0], dtype=torch.float64))  # ... but gets weight 0
    v = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(1, 1, 3, 1)
    out = cog_attention_reference(q, k, v, scale=1.0)
    assert out.item() == pytest.approx((math.e ** 2 - 10 * math.e) / z)  # the negative weight subtracts v_1


def test_rows_are_l1_normalised_and_signed():
    q, k = randn(2, 2, 9, 16, seed=4), randn(2, 2, 9, 16, seed=5)
    for causal in (False, True):
        w = cog_attention_weights(q, k, causal=causal)
        torch.testing.assert_close(w.abs().sum(-1), torch.ones(2, 2, 9, dtype=torch.float64))
        assert (w < 0).any() and (w > 0).any()
        s = q @ k.transpose(-2, -1)
        visible = causal_mask(9, 9) if causal else torch.ones(9, 9, dtype=torch.bool)
        assert torch.equal(torch.sign(w)[..., visible], torch.sign(s)[..., visible])  # a weight has its logit's sign
        assert (w[..., ~visible] == 0).all()


def test_mask_is_applied_after_abs():
    # the first query may see only key 0; the masked keys have huge NEGATIVE logits. Masking before abs would turn
    # them into -inf -> +inf and give them all the weight; masking after abs gives them weight exactly 0.
    q = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    k = torch.tensor([0.5, -50.0, -80.0], dtype=torch.float64).view(1, 1, 3, 1)
    w = cog_attention_weights(q, k, causal=True, scale=1.0)[0, 0]
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert w[1, 1] < -0.999 and w[1, 2] == 0  # row 1: key 1 dominates, negatively


def test_causal_is_aligned_to_the_end():
    q, k, v = randn(1, 2, 7, 8, seed=6), randn(1, 2, 7, 8, seed=7), randn(1, 2, 7, 8, seed=8)
    full = cog_attention_reference(q, k, v, causal=True)
    for Tq in (1, 3, 7):  # the last Tq queries against all keys = the last Tq rows of the square case
        torch.testing.assert_close(cog_attention_reference(q[:, :, -Tq:], k, v, causal=True), full[:, :, -Tq:])
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_large_logits_stay_finite():
    q, k, v = randn(1, 2, 6, 8, seed=9) * 1e4, randn(1, 2, 6, 8, seed=10) * 1e4, randn(1, 2, 6, 8, seed=11)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = cog_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        assert out.dtype == dtype and torch.isfinite(out).all()
    # with huge logits each row puts all its weight on the key of largest |s|, with that logit's sign
    s = q @ k.transpose(-2, -1)
    top = s.abs().argmax(-1, keepdim=True)
    expected = torch.sign(s.gather(-1, top)) * v.unsqueeze(2).expand(-1, -1, 6, -1, -1).gather(
        3, top.unsqueeze(-1).expand(-1, -1, -1, -1, 8)).squeeze(3)
    torch.testing.assert_close(cog_attention_reference(q, k, v), expected)


@pytest.mark.parametrize("causal,Tq", [(False, 5), (True, 5), (True, 2)])
def test_reference_gradcheck(causal, Tq):
    q = randn(1, 2, Tq, 4, seed=12).requires_grad_()
    k, v = randn(1, 2, 5, 4, seed=13).requires_grad_(), randn(1, 2, 5, 4, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention_reference(q, k, v, causal=causal), (q, k, v))


@pytest.mark.parametrize("make_inputs,message", [
    (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), "must be 4-D"),
    (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)), "head dims differ"),
    (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)), "batch and head sizes"),
    (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)), "k and v must have the same shape"),
    (lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), "Tq <= Tk"),
    (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)), "share a dtype"),
    (lambda: (torch.ones(1, 2, 4, 8, dtype=torch.long),) * 3, "floating-point"),
    (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8, device="meta"), torch.randn(1, 2, 4, 8)), "one device"),
    (lambda: (torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), "no keys"),
])
def test_bad_attention_inputs_name_the_problem(make_inputs, message):
    for attention in (cog_attention_reference, cog_attention):
        with pytest.raises(ValueError, match=message):
            attention(*make_inputs())


def test_softmax_attention_end_aligned():
    q, k, v = randn(1, 2, 3, 8, seed=15), randn(1, 2, 7, 8, seed=16), randn(1, 2, 7, 8, seed=17)
    for causal in (False, True):
        s = q @ k.transpose(-2, -1) / math.sqrt(8)
        if causal:
            s = s.masked_fill(~causal_mask(3, 7), float("-inf"))
        torch.testing.assert_close(softmax_attn(q, k, v, causal), torch.softmax(s, -1) @ v)


# -----------------------------------------------------------------------------
# document masks: packed sequences, a query sees only the keys of its own document

DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 7, 7, 7, 7, 7, 7]])


def segments(ids):
    """(start, end) of each run of equal ids in a 1-D tensor."""
    cuts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("causal", [False, True])
def test_doc_ids_attend_within_each_document(causal):
    q, k, v = randn(2, 3, 11, 8, seed=30), randn(2, 3, 11, 8, seed=31), randn(2, 3, 11, 8, seed=32)
    out = cog_attention_reference(q, k, v, causal=causal, doc_ids=DOC_IDS)
    for b in range(2):
        for s, e in segments(DOC_IDS[b]):  # each document alone gives the same rows
            alone = cog_attention_reference(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], causal=causal)
            torch.testing.assert_close(out[b:b + 1, :, s:e], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, cog_attention_reference(q, k, v, causal=causal))  # the mask does something
    torch.testing.assert_close(cog_attention(q, k, v, causal=causal, doc_ids=DOC_IDS), out, rtol=0, atol=0)
    w = cog_attention_weights(q, k, causal=causal, doc_ids=DOC_IDS)
    torch.testing.assert_close(w.abs().sum(-1), torch.ones(2, 3, 11, dtype=torch.float64))  # still L1-normalised
    # the last Tq queries against all keys: the last Tq rows (query i has the id of key Tk - Tq + i)
    for Tq in (1, 4):
        part = cog_attention_reference(q[:, :, -Tq:], k, v, causal=causal, doc_ids=DOC_IDS)
        torch.testing.assert_close(part, out[:, :, -Tq:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("doc_ids,message", [
    (lambda: [[0] * 6], "must be a torch.Tensor"),
    (lambda: torch.zeros(1, 6), "integer tensor"),
    (lambda: torch.zeros(1, 6, dtype=torch.bool), "integer tensor"),
    (lambda: torch.zeros(1, 5, dtype=torch.long), r"shape \(B, Tk\) = \(1, 6\)"),
    (lambda: torch.zeros(6, dtype=torch.long), r"shape \(B, Tk\)"),
    (lambda: torch.zeros(1, 6, dtype=torch.long, device="meta"), "on q's device"),
    (lambda: torch.tensor([[0, 0, 1, 1, 0, 2]]), "non-decreasing"),
])
def test_bad_doc_ids_name_the_problem(doc_ids, message):
    q = torch.randn(1, 2, 6, 8)
    for attention in (cog_attention_reference, cog_attention):
        with pytest.raises(ValueError, match=message):
            attention(q, q, q, causal=True, doc_ids=doc_ids())


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_with_doc_ids(causal):
    q, k, v = randn(2, 2, 4, 8, seed=33), randn(2, 2, 11, 8, seed=34), randn(2, 2, 11, 8, seed=35)
    s = q @ k.transpose(-2, -1) / math.sqrt(8)
    visible = (DOC_IDS[:, -4:, None] == DOC_IDS[:, None, :])[:, None] & (causal_mask(4, 11) if causal else True)
    want = torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v
    torch.testing.assert_close(softmax_attn(q, k, v, causal, DOC_IDS), want)

"""
Tests of the fused Cog attention kernels (the tuned tier, cog_attention(backend="tuned"), and the compact tier,
cog_attention(backend="compact")) against the reference, and of cog_attention's backend chooser:
`python -m pytest tests/test_kernel.py`.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (small shapes, fp32 and fp16; its bf16 dots are
wrong). The GPU tests (bf16/fp16 at realistic shapes, torch.compile) run only where CUDA is available.
Every comparison is against the float64 reference computed FROM THE SAME ROUNDED inputs: in fp16/bf16 a logit near 0
can change sign under rounding, which moves the output by about p * |v| (see docs/paper.md, "The gradient").
"""

import contextlib
import math
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (by cog_kernel here), so it must come before that import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cog_attention as chooser  # noqa: E402
import cog_kernel  # noqa: E402
import cog_kernel_tuned  # noqa: E402
from cog_attention import cog_attention  # noqa: E402
from cog_kernel import cog_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
cpu = pytest.mark.skipif(CUDA, reason="interpreter tests: run where there is no GPU")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def kernel_runs_here():
    """Fail loudly (instead of with an obscure Triton error in every test) if the kernel cannot run on this machine."""
    if cog_kernel_tuned.triton is None:
        pytest.skip("Triton is not installed")
    problem = cog_kernel_tuned.kernel_problem()
    if problem:
        pytest.fail(problem)
    if not CUDA and not cog_kernel_tuned._INTERPRET:
        pytest.fail("Triton's interpreter is off: TRITON_INTERPRET=1 must be in the environment before anything imports "
                    "triton (cog_kernel, model). Put `if not torch.cuda.is_available(): "
                    "os.environ.setdefault('TRITON_INTERPRET', '1')` at the top of the test file imported first "
                    "(or in conftest.py), or run with TRITON_INTERPRET=1.")


@contextlib.contextmanager
def blocks(block_m, block_n):
    """Run the kernels with one fixed block shape (the interpreter's default 64 x 64 would cover small T in one block)."""
    tuners = [k for variant in (False, True) for k in cog_kernel_tuned.kernels(variant).values()]
    saved = [tuner.configs for tuner in tuners]
    try:
        for tuner in tuners:
            tuner.configs = [cog_kernel_tuned.triton.Config({**tuner.configs[0].kwargs, "BLOCK_M": block_m,
                                                       "BLOCK_N": block_n})]
        yield
    finally:
        for tuner, configs in zip(tuners, saved):
            tuner.configs = configs


@pytest.fixture(autouse=True)
def small_blocks():
    """In the interpreter, test with small blocks of unequal shape: several blocks per row, diagonals straddled unevenly."""
    if CUDA:
        yield
    else:
        with blocks(16, 32):
            yield


def make_inputs(B, H, Tq, Tk, D, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for T in (Tq, Tk, Tk, Tq))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn for upstream gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():  # whatever an earlier test left switched off
        o = fn(q, k, v, **kw)
        o.backward(do)
    return o, q.grad, k.grad, v.grad


def reference64(q, k, v, do, **kw):
    """The float64 reference from the same rounded inputs."""
    return run(cog_attention_reference, *(t.double() for t in (q, k, v, do)), **kw)


def max_err(x, ref):
    """Largest error relative to the largest reference entry (floored at 1, about the inputs' scale)."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def tuned(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None):
    return cog_attention(q, k, v, causal, scale, deterministic, doc_ids, backend="tuned")


def compact(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None):
    return cog_attention(q, k, v, causal, scale, deterministic, doc_ids, backend="compact")


TIERS = {"tuned": tuned, "compact": compact}
tiers = pytest.mark.parametrize("tier", list(TIERS))


def check(q, k, v, do, tol, deterministic=None, tier="tuned", **kw):
    got = run(TIERS[tier], q, k, v, do, deterministic=deterministic, **kw)
    want = reference64(q, k, v, do, **kw)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape, name
        err = max_err(x, ref)
        assert err < tol, f"{name}: error {err:.2e} >= {tol:.0e}"


# --- CPU, Triton interpreter ------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-4, torch.float16: 4e-3}
CASES = [  # B, H, Tq, Tk, D, dtype, scale
    (1, 2, 1, 1, 16, torch.float32, None),  # T = 1
    (2, 2, 37, 37, 32, torch.float32, None),  # odd T, not a multiple of any block
    (1, 2, 24, 61, 16, torch.float32, None),  # Tq < Tk (causal aligned to the end)
    (2, 1, 1, 45, 32, torch.float16, None),  # a KV-cache step
    (1, 2, 20, 45, 64, torch.float16, None),
    (1, 1, 33, 33, 128, torch.float32, None),
    (1, 2, 64, 64, 16, torch.float16, None),  # a multiple of the blocks
    (1, 2, 29, 29, 32, torch.float32, 0.3),  # explicit scale
    (1, 1, 40, 50, 32, torch.float32, 8.0),  # logits up to ~100: needs the running max of |s|
    (1, 2, 21, 21, 24, torch.float32, None),  # head dims that are not powers of two: padded inside the kernel
    (1, 1, 19, 26, 80, torch.float16, None),
    (2, 1, 17, 17, 96, torch.float32, None),
    (1, 1, 1, 9, 160, torch.float16, None),
    (1, 1, 13, 13, 256, torch.float32, None),
    (1, 1, 11, 11, 20, torch.float16, None),  # 40-byte rows: padded to 16-byte multiples for the tensor descriptors
    (1, 2, 18, 18, 8, torch.float32, None),  # below the smallest dot
    (1, 2, 23, 23, 32, torch.float32, -0.4),  # a negative scale flips every sign
]


@cpu
@tiers
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,H,Tq,Tk,D,dtype,scale", CASES)
def test_matches_reference(B, H, Tq, Tk, D, dtype, scale, causal, tier):
    q, k, v, do = make_inputs(B, H, Tq, Tk, D, dtype)
    check(q, k, v, do, TOL[dtype], causal=causal, scale=scale, tier=tier)


@cpu
@tiers
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 16), (64, 64)])
def test_other_block_shapes(block_m, block_n, tier, fresh_chooser, monkeypatch):
    """The other tests use BLOCK_M < BLOCK_N; the loop bounds must hold for the other shapes too. (A fresh chooser:
    it keeps the tiles it checked.)"""
    tile = (block_m, block_n, 1, 1)
    monkeypatch.setattr(cog_kernel, "INTERPRETER_TILES", {kind: [tile] for kind in ("fwd", "dkdv", "dq", "delta")})
    with blocks(block_m, block_n):
        for Tq, Tk in ((37, 37), (21, 70), (1, 33)):
            for causal in (False, True):
                check(*make_inputs(1, 2, Tq, Tk, 16, torch.float32), TOL[torch.float32], causal=causal, tier=tier)


@cpu
@tiers
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_noncontiguous_inputs(causal, tier):
    B, H, T, D = 2, 3, 19, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) tensor
    kv = torch.randn(B, H, T, 2 * D, generator=g)
    k, v = kv[..., :D], kv[..., D:]  # slices: row stride 2D
    q2 = torch.randn(B, H, D, T, generator=g).transpose(-2, -1)  # head dim not unit-stride: copied
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, q2, do))
    check(q, k, v, do, TOL[torch.float32], causal=causal, tier=tier)
    check(q2, k, v, do, TOL[torch.float32], causal=causal, tier=tier)


@cpu
@tiers
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_large_logits_of_one_sign(sign, tier):
    """Rows whose logits are all large and of one sign: the running max must be taken over |s|, not s."""
    q, k, v, do = make_inputs(1, 2, 19, 40, 32, torch.float32)
    u = torch.ones(32) / math.sqrt(32)
    q, k = sign * 4 * u + 0.3 * q, 4 * u + 0.3 * k  # q . k ~ sign * 16; with scale 10, |s| ~ 160
    check(q, k, v, do, TOL[torch.float32], causal=True, scale=10.0, tier=tier)


@cpu
@tiers
def test_exact_zero_logits(tier):
    """sign(0) = 0: a key with logit exactly 0 counts in the denominator, has weight 0 and gets gradient 0 through s."""
    q, k, v, do = make_inputs(1, 1, 8, 8, 16, torch.float32)
    q, k = q.round(), k.round()  # small integers: exact logits
    k[..., 3, :] = 0.0  # key 3 has logit 0 for every query
    q[..., 5, :] = 0.0  # query 5 has logit 0 for every key
    check(q, k, v, do, TOL[torch.float32], tier=tier)
    check(q, k, v, do, TOL[torch.float32], causal=True, tier=tier)


@cpu
@tiers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_logits_keep_their_sign(dtype, tier):
    """Logits far below 1 but far above the 2^-32 window of the branch-free sign get the full weight sign(s) * p, as in
    the reference (they would get a fraction of it if the clamp did not work on rescaled weights)."""
    q, k, v, do = make_inputs(1, 1, 12, 12, 16, dtype)
    q = (q * 1e-3).to(dtype)  # |s| ~ 1e-3, so every |s| < p: only the rescaling makes clamp(s, -p, p) = sign(s) * p
    k = (k * 1e-3).to(dtype)
    check(q, k, v, do, TOL[dtype], tier=tier)
    check(q, k, v, do, TOL[dtype], causal=True, tier=tier)


@cpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_deterministic_backward(causal, fresh_chooser, monkeypatch):
    """deterministic=True runs the two-pass backward (the dQ pass, no atomic adds): the same gradients as the one-pass
    backward and the reference; torch.use_deterministic_algorithms switches it on by default."""
    passes = []
    monkeypatch.setattr(cog_kernel_tuned, "_dq_pass", spy_on(cog_kernel_tuned._dq_pass, passes))
    q, k, v, do = make_inputs(2, 1, 27, 35, 32, torch.float32)
    one_pass = run(tuned, q, k, v, do, causal=causal)  # (its first-use check too)
    assert passes == []
    check(q, k, v, do, TOL[torch.float32], causal=causal, deterministic=True)  # the first use also runs the check
    launched = len(passes)
    two_pass = run(tuned, q, k, v, do, causal=causal, deterministic=True)
    assert launched > 2 and len(passes) == launched + 1
    for x, y in zip(one_pass[1:], two_pass[1:]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        run(tuned, q, k, v, do, causal=causal)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(passes) == launched + 2


def spy_on(kernel, calls):
    """A stand-in for an autotuned kernel that records each launch, autotuned or pinned to one tile (through its jit
    function .fn, as the first-use check does), and runs the real one."""
    class Spy:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            calls.append(grid)
            return self.real[grid]

        def __getattr__(self, name):  # configs, cache
            return getattr(self.real, name)
    spy = Spy(kernel)
    spy.fn = Spy(kernel.fn)
    return spy


@cpu
def test_misaligned_inputs_are_copied_for_the_descriptors():
    """Tensor descriptors need 16-byte aligned starts and strides; a view that starts 4 bytes in is copied first."""
    base = torch.randn(1, 2, 19, 33)
    q, k, v = base[..., 1:], base.flip(2)[..., 1:].contiguous(), base[..., :32]  # q starts 4 bytes in
    assert q.data_ptr() % 16 != 0
    do = torch.randn(1, 2, 19, 32)
    check(q, k, v, do, TOL[torch.float32], causal=True)


@cpu
@tiers
def test_many_heads_and_the_last_blocks_first(tier):
    """B * H is a 1-D grid's leading factor (no 65,535 limit on an axis); causal launches the last query blocks
    first. Many small heads check that every (block, head) is covered once."""
    check(*make_inputs(5, 7, 40, 40, 16, torch.float32), TOL[torch.float32], causal=True, tier=tier)


@cpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_twin_is_softmax(causal):
    """bench.py's twin (the kernels with Cog's two helpers swapped) is plain softmax attention: the Cog/twin ratios it
    reports compare Cog with softmax through the same code."""
    import bench
    q, k, v, do = make_inputs(1, 2, 29, 29, 32, torch.float32)
    got = run(lambda q, k, v, causal: bench.softmax_attention_twin(q, k, v, causal), q, k, v, do, causal=causal)
    sdpa = lambda q, k, v, causal: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa
    want = run(sdpa, *(t.double() for t in (q, k, v, do)), causal=causal)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert max_err(x, ref) < 1e-4, name


def packed_doc_ids(B, T, lengths, seed=0):
    """(B, T) document ids of packed sequences: row 0 cut into the given document lengths, the others at random."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))]
    for _ in range(B - 1):
        starts = torch.zeros(T, dtype=torch.bool)
        starts[torch.randint(1, T, (3,), generator=g)] = True
        rows.append(torch.cumsum(starts, 0) + 7)  # ids needn't start at 0 or be consecutive
    return torch.stack(rows).to(DEVICE)


@cpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Tq,Tk,lengths,dtype", [
    (50, 50, [7, 20, 3, 20], torch.float32),  # documents that cross tile edges (the tests' tiles are 16 x 32)
    (64, 64, [32, 1, 31], torch.float16),  # a boundary on a tile edge, a document of one token
    (13, 45, [20, 12, 13], torch.float32),  # Tq < Tk: the queries are the last 13 positions
    (40, 40, [40], torch.float32),  # one document: the same as no mask
])
def test_document_mask_matches_reference(Tq, Tk, lengths, dtype, causal, deterministic):
    """With doc_ids, a query sees only its own document's keys: both kernels (the tuned one skips the other documents'
    blocks and masks the rest; the compact one masks) against the reference, forward and all three gradients."""
    q, k, v, do = make_inputs(2, 2, Tq, Tk, 16, dtype)
    doc_ids = packed_doc_ids(2, Tk, lengths)
    for tier in TIERS if deterministic else ["tuned"]:  # the compact kernel is always deterministic
        check(q, k, v, do, TOL[dtype], causal=causal, deterministic=deterministic, doc_ids=doc_ids, tier=tier)


@cpu
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poisoned", [0, 1], ids=["first-NaN", "second-NaN"])
def test_document_mask_skips_other_documents(poisoned, causal, deterministic, fresh_chooser):
    """Blocks wholly in other documents are skipped, not just masked: one of two 64-token documents has NaN keys,
    values and queries, and with 64 x 64 tiles nothing of it may reach the other document's output or gradients (a
    masked tile still multiplies its values: NaN would get through)."""
    q, k, v, do = make_inputs(1, 2, 128, 128, 16, torch.float32)
    bad, good = slice(64 * poisoned, 64 * poisoned + 64), slice(64 - 64 * poisoned, 128 - 64 * poisoned)
    for t in (q, k, v):
        t[:, :, bad] = float("nan")
    doc_ids = torch.repeat_interleave(torch.arange(2), 64)[None]
    with blocks(64, 64):
        got = run(tuned, q, k, v, do, causal=causal, deterministic=deterministic, doc_ids=doc_ids)
    want = reference64(*(t[:, :, good] for t in (q, k, v, do)), causal=causal)  # the other document alone
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert max_err(x[:, :, good], ref) < TOL[torch.float32], name


@cpu
def test_torch_compile_cpu():
    """The chooser's custom ops trace with fake tensors and autograd: fullgraph compile (aot_eager on CPU) of the tuned
    tier, asked for by name, matches eager."""
    q, k, v, do = make_inputs(1, 2, 20, 20, 16, torch.float32)
    f = lambda q, k, v: cog_attention(q * 0.5, k, v, causal=True, backend="tuned") * 2.0  # noqa: E731
    eager = run(f, q, k, v, do)
    compiled = run(torch.compile(f, backend="aot_eager", fullgraph=True), q, k, v, do)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)


# --- errors and dispatch (any machine) --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", chooser.BACKENDS)
def test_models_give_the_same_numbers_through_every_backend(backend, monkeypatch):
    """Cogformer (also with document masks) and UViC give the same outputs, parameter gradients and KV-cache
    generations through each backend (chosen by COG_BACKEND, as a user would) as through the reference itself."""
    import model as model_module

    def run(make_model, inputs, loss_of):
        torch.manual_seed(0)
        net = make_model().to(DEVICE)
        out = loss_of(net, *inputs)
        net.zero_grad()
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    lm_config = model_module.CogformerConfig(block_size=40, vocab_size=50, n_layer=3, n_head=2, n_embd=32, ffn_hidden=40)
    uvic_config = model_module.UViCConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2)
    idx = torch.randint(0, 50, (2, 37), device=DEVICE)  # 37: not a multiple of any block size
    x, t = torch.randn(2, 3, 8, 8, device=DEVICE), torch.tensor([3.0, 700.0], device=DEVICE)
    doc_ids = model_module.document_ids(torch.randint(0, 3, (2, 37), device=DEVICE), start_token=0)
    cases = [(lambda: model_module.Cogformer(lm_config), (idx,), lambda m, idx: m(idx)[0]),
             (lambda: model_module.Cogformer(lm_config), (idx,), lambda m, idx: m(idx, doc_ids=doc_ids)[0]),
             (lambda: model_module.UViC(uvic_config), (x, t), lambda m, x, t: m(x, t))]
    calls = []
    spy_on_forwards(monkeypatch, calls)
    monkeypatch.setenv("COG_BACKEND", backend)
    with_kernel = [run(*case) for case in cases]
    torch.manual_seed(1)
    generated_with_kernel = model_module.Cogformer(lm_config).to(DEVICE).generate(idx[:, :5], 8, temperature=0)
    assert set(calls) == {backend} - {"reference"}  # every call went through the backend asked for
    monkeypatch.setattr(model_module, "cog_attention", cog_attention_reference)
    with_reference = [run(*case) for case in cases]
    torch.manual_seed(1)
    generated_with_reference = model_module.Cogformer(lm_config).to(DEVICE).generate(idx[:, :5], 8, temperature=0)
    tol = dict(rtol=2e-2, atol=2e-3) if CUDA else dict(rtol=1e-4, atol=1e-5)  # tf32 dots on the GPU
    for (out_k, grads_k), (out_r, grads_r) in zip(with_kernel, with_reference):
        torch.testing.assert_close(out_k, out_r, **tol)
        for name in grads_r:
            torch.testing.assert_close(grads_k[name], grads_r[name], **tol, msg=name)
    assert torch.equal(generated_with_kernel, generated_with_reference)


def test_errors_name_the_problem():
    q, k, v, _ = make_inputs(1, 2, 4, 4, 16, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'tuned' cannot run here: .*head dims up to 256, not 300"):
        tuned(*make_inputs(1, 1, 2, 2, 300, torch.float32)[:3])
    with pytest.raises(RuntimeError, match="backend 'tuned' cannot run here: .*not torch.float64"):
        tuned(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="dtype"):
        tuned(q, k.half(), v)
    with pytest.raises(ValueError, match="one device"):
        tuned(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="same shape"):
        tuned(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="head dims differ"):
        tuned(q[..., :8], k, v)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        tuned(torch.cat([q, q], 2), k, v)
    with pytest.raises(ValueError, match="4-D"):
        tuned(q[0], k, v)


def test_prune_keeps_the_listed_tiles_that_fit(fresh_chooser, monkeypatch):  # (no tiles checked yet)
    """Autotuning only tries the tiles TILES lists for the head dim, and only those whose shared memory fits: the
    224 KB (128, 128) forward at head dim 128 fits an H100/H200 (227 KB) and is kept; where none fits, FALLBACK_TILE."""
    Config = cog_kernel_tuned.triton.Config
    shapes = {t for by_dim in cog_kernel_tuned.TILES["fwd"].values() for t in by_dim} | {cog_kernel_tuned.FALLBACK_TILE}
    configs = [Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in sorted(shapes)]
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(cog_kernel_tuned, "_shared_memory", lambda device: 227 * 1024)
    kept = [shape(c) for c in cog_kernel_tuned._prune_configs(configs, {"Q": q}, kind="fwd", HEAD_DIM=128)]
    assert sorted(kept) == sorted(cog_kernel_tuned.TILES["fwd"][128]) and (128, 128, 8, 3) in kept
    kept = [shape(c) for c in cog_kernel_tuned._prune_configs(configs, {"Q": q[..., :80]}, kind="fwd", HEAD_DIM=80)]
    assert sorted(kept) == sorted(cog_kernel_tuned.TILES["fwd"][128])  # 80 runs in 128-wide tiles
    monkeypatch.setattr(cog_kernel_tuned, "_shared_memory", lambda device: 161 * 1024)  # e.g. a smaller GPU
    kept = [shape(c) for c in cog_kernel_tuned._prune_configs(configs, {"Q": q}, kind="fwd", HEAD_DIM=128)]
    fit = [t for t in cog_kernel_tuned.TILES["fwd"][128] if cog_kernel_tuned.shared_memory_bytes("fwd", *t[:2], t[3], 128, 2)
           <= 161 * 1024]
    assert sorted(kept) == sorted(fit) and 0 < len(fit) < len(cog_kernel_tuned.TILES["fwd"][128])
    monkeypatch.setattr(cog_kernel_tuned, "_shared_memory", lambda device: 227 * 1024)
    kept = [shape(c) for c in cog_kernel_tuned._prune_configs(configs, {"Q": q.float()}, kind="fwd", HEAD_DIM=128)]
    assert kept == [cog_kernel_tuned.FALLBACK_TILE]  # fp32 at head dim 128: no listed tile fits, the small one runs


def test_autotuning_restarts_the_dq_sum():
    """Autotuning launches the one-pass backward once per config: each launch must add into an empty dQ sum."""
    acc = torch.ones(3)
    cog_kernel_tuned._zero_dq_sum({"ACC_DQ": acc})
    assert acc.abs().sum() == 0
    cog_kernel_tuned._zero_dq_sum({"ACC_DQ": None}, reset_only=True)  # the deterministic backward passes no buffer


@cpu
def test_bf16_refused_in_interpreter():
    with pytest.raises(RuntimeError, match="backend 'tuned' cannot run here: .*bfloat16"):
        tuned(*make_inputs(1, 1, 4, 4, 16, torch.bfloat16)[:3])


# --- the chooser (any machine: CPU tensors in the interpreter, or CUDA) ------------------------------------------------


@pytest.fixture
def fresh_chooser(monkeypatch):
    """A chooser that has checked nothing yet: each configuration's first use checks (and warns) again."""
    monkeypatch.setattr(chooser, "_verdicts", {})
    monkeypatch.setattr(cog_kernel_tuned, "checked_tiles", {})


def raising(*args):
    raise RuntimeError("out of resources: shared memory, Required: 262144, Hardware limit: 101376")


def wrong_forward(name):
    real = chooser._FORWARD[name]

    def forward(*args):
        o, lse = real(*args)
        return o * 1.5, lse
    return forward


def spy_on_forwards(monkeypatch, calls):
    for name in ("tuned", "compact"):
        real = chooser._FORWARD[name]
        monkeypatch.setitem(chooser._FORWARD, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))


def test_chooser_skips_a_failing_and_a_wrong_backend(fresh_chooser, monkeypatch):
    """A tier that raises and a tier that returns wrong numbers are each skipped with one warning that names the
    configuration and the error (and, once only the reference is left, its memory); the run goes on with the
    reference's numbers, and the next call of that configuration warns no more."""
    monkeypatch.setitem(chooser._FORWARD, "tuned", raising)
    monkeypatch.setitem(chooser._FORWARD, "compact", wrong_forward("compact"))
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    with pytest.warns(RuntimeWarning) as record:
        got = run(cog_attention, q, k, v, do, causal=True)
    messages = [str(w.message) for w in record if w.category is RuntimeWarning]  # (not an interpreter's own warnings)
    assert len(messages) == 2, messages
    assert f"skipping the tuned backend for {q.device} float32 head dim 16 causal: fwd tile (" in messages[0]
    assert "RuntimeError: out of resources" in messages[0]
    assert "skipping the compact backend" in messages[1] and "wrong numbers: output is off by" in messages[1]
    assert "B*H*Tq*Tk*4 bytes per weight matrix" in messages[1] and "(B=1, H=2, Tq=19, Tk=23)" in messages[1]
    want = run(cog_attention_reference, q, k, v, do, causal=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(cog_attention, q, k, v, do, causal=True)
    with pytest.warns(RuntimeWarning) as record:
        run(cog_attention, q, k, v, do)  # another configuration: checked and warned of on its own
    assert [str(w.message).split(":")[1] for w in record if w.category is RuntimeWarning] == [
        " skipping the tuned backend for cpu float32 head dim 16", " skipping the compact backend for cpu float32 head dim 16"]


def test_backend_asked_for_by_name_raises(fresh_chooser, monkeypatch):
    monkeypatch.setitem(chooser._FORWARD, "tuned", raising)
    monkeypatch.setitem(chooser._FORWARD, "compact", wrong_forward("compact"))
    q, k, v, _ = make_inputs(1, 2, 9, 9, 16, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'tuned' failed for .* head dim 16: fwd tile .*RuntimeError: out of resources"):
        cog_attention(q, k, v, backend="tuned")
    monkeypatch.setenv("COG_BACKEND", "compact")
    with pytest.raises(RuntimeError, match="backend 'compact' failed .*wrong numbers") as error:
        cog_attention(q, k, v)
    assert "\n" not in str(error.value)
    with pytest.raises(RuntimeError, match="backend 'compact' cannot run here: .*not torch.float64"):
        cog_attention(q.double(), k.double(), v.double())
    monkeypatch.setenv("COG_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be auto, tuned, compact or reference .*got 'fast'"):
        cog_attention(q, k, v)
    monkeypatch.setenv("COG_BACKEND", "reference")  # asked for: neither broken tier is tried, nothing warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cog_attention(q, k, v), cog_attention_reference(q, k, v))


def test_a_backend_that_fails_later_is_skipped_from_then_on(fresh_chooser, monkeypatch):
    """A tier that passed its first-use check but fails later (e.g. out of resources at a bigger shape) is skipped
    with a warning, in the backward as in the forward; the gradients come from the reference's."""
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    run(cog_attention, q, k, v, do)
    monkeypatch.setitem(chooser._BACKWARD, "tuned", raising)
    with pytest.warns(RuntimeWarning, match="skipping the tuned backend .*out of resources"):
        got = run(cog_attention, q, k, v, do)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, reference64(q, k, v, do)):
        assert max_err(x, ref) < TOL[torch.float32], name
    calls = []
    spy_on_forwards(monkeypatch, calls)
    run(cog_attention, q, k, v, do)
    assert calls == ["compact", "compact"]  # its first-use check, then the call


def test_a_backend_asked_for_by_name_raises_in_the_backward(fresh_chooser, monkeypatch):
    """Asked for by name (argument or COG_BACKEND), a backend whose backward fails raises, as in the forward, instead
    of handing back the reference's gradients; so does one skipped (or forgotten) between its forward and backward.
    Under auto the same failure is skipped with a warning, and the gradients are the reference's."""
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    for name in ("tuned", "compact"):
        run(cog_attention, q, k, v, do, backend=name)  # passes its first-use check
        monkeypatch.setitem(chooser._BACKWARD, name, raising)
        with pytest.raises(RuntimeError, match=f"backend '{name}' failed for .*: RuntimeError: out of resources"):
            run(cog_attention, q, k, v, do, backend=name)
        monkeypatch.setenv("COG_BACKEND", name)
        with pytest.raises(RuntimeError, match=f"backend '{name}' failed for .*: RuntimeError: out of resources"):
            run(cog_attention, q, k, v, do)
        monkeypatch.delenv("COG_BACKEND")
    with pytest.warns(RuntimeWarning, match="skipping the tuned backend .*out of resources"):
        got = run(cog_attention, q, k, v, do)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, reference64(q, k, v, do)):
        assert max_err(x, ref) < TOL[torch.float32], name
    key = ("compact", chooser._config(q, False, None, False))
    passed = chooser._verdicts[key]
    for verdict, why in (((False, "RuntimeError: out of resources"), "out of resources"), (None, "verdict is gone")):
        o = cog_attention(*(t.detach().requires_grad_() for t in (q, k, v)), backend="compact")
        if verdict is None:  # forgotten
            del chooser._verdicts[key]
        else:  # an auto call gave up on it
            chooser._verdicts[key] = verdict
        with pytest.raises(RuntimeError, match=f"backend 'compact' failed for .*{why}"):
            o.backward(do)
        chooser._verdicts[key] = passed

@cpu
def test_a_tile_that_fails_is_dropped(fresh_chooser, monkeypatch):
    """The compact tier checks its tiles in order: one that fails is dropped with a warning, the next one runs."""
    tiles = [(16, 16, 1, 1), (32, 16, 1, 1)]
    monkeypatch.setattr(cog_kernel, "INTERPRETER_TILES", {kind: tiles for kind in ("fwd", "dkdv", "dq", "delta")})
    real = cog_kernel.compact_forward

    def forward(q, k, v, causal, scale, doc_ids, tile):
        o, lse = real(q, k, v, causal, scale, doc_ids, tile)
        return (o.flip(-1) if tile["fwd"] == tiles[0] else o), lse  # the first tile's numbers are wrong
    monkeypatch.setitem(chooser._FORWARD, "compact", forward)
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match=r"compact backend, .*: dropped tile \(16, 16\): RuntimeError: wrong numbers"):
        check(q, k, v, do, TOL[torch.float32], tier="compact")
    assert chooser._verdicts[("compact", chooser._config(q, False, None, False))] == (True, {
        kind: tiles[1] for kind in ("fwd", "dkdv", "dq", "delta")})


@cpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["one_pass", "two_pass"])
def test_the_tuned_tier_drops_a_bad_tile_and_stays(fresh_chooser, monkeypatch, deterministic):
    """The tuned tier's first-use check runs every tile its autotuner may pick, kernel by kernel: a tile that gives wrong
    numbers is dropped with a warning, the tier stays in use with the others, and autotuning picks only from those."""
    good, bad = (16, 32, 1, 1), (32, 16, 1, 1)
    Config = cog_kernel_tuned.triton.Config
    kind = "dq" if deterministic else "fwd"
    tuner = cog_kernel_tuned.kernels()[kind]
    monkeypatch.setattr(tuner, "configs", [Config({"BLOCK_M": m, "BLOCK_N": n, "DOC_MASK": False}, num_warps=w,
                                                  num_stages=s) for m, n, w, s in (good, bad)])
    launched = []
    real = tuner.fn.run

    def run_kernel(*args, **kw):  # the bad tile computes dQ, or the forward, wrongly
        tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"])
        launched.append(tile)
        real(*args, **kw)
        if tile == bad:
            args[4 if deterministic else 3].mul_(-1)  # DQ or O
    monkeypatch.setattr(tuner.fn, "run", run_kernel)
    # (Triton 3.6's autotuner times even a single config that is left after pruning, which the interpreter cannot)
    monkeypatch.setitem(vars(tuner), "do_bench", lambda kernel_call, quantiles: [0.0] * len(quantiles))
    chose = {tile: Config({"BLOCK_M": tile[0], "BLOCK_N": tile[1], "DOC_MASK": False}, num_warps=tile[2],
                          num_stages=tile[3]) for tile in (good, bad)}
    monkeypatch.setattr(tuner, "cache", {("earlier", "good"): chose[good], ("earlier", "bad"): chose[bad]})
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match=rf"tuned backend, .*: dropped {kind} tile \(32, 16, 1, 1\): RuntimeError: wrong"):
        got = run(cog_attention, q, k, v, do, causal=True, deterministic=deterministic)
    assert set(launched) == {good, bad}  # the check ran both
    assert ("earlier", "good") in tuner.cache and ("earlier", "bad") not in tuner.cache  # only the bad choice goes
    key = cog_kernel_tuned._checked_key(kind, q, 16, True, False)
    assert cog_kernel_tuned.checked_tiles[key] == [good]
    assert chooser._verdicts[("tuned", chooser._config(q, True, None, deterministic))][0]  # the tier stays
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, reference64(q, k, v, do, causal=True)):
        assert max_err(x, ref) < TOL[torch.float32], name
    launched.clear()
    run(cog_attention, q, k, v, do, causal=True, deterministic=deterministic)
    assert launched == [good]  # autotuning picks only from the tiles that passed


def test_too_old_triton_falls_back_on_every_device(fresh_chooser, monkeypatch):
    """Triton before 3.5 cannot compile the tuned kernel: auto names it and goes on with the next tier (on a GPU as on
    the CPU); asked for by name, the tuned tier raises."""
    monkeypatch.setattr(cog_kernel_tuned.triton, "__version__", "3.4.0")
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match="skipping the tuned backend .*Triton 3.4.0 is too old"):
        got = run(cog_attention, q, k, v, do, causal=True)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, reference64(q, k, v, do, causal=True)):
        assert max_err(x, ref) < TOL[torch.float32], name
    with pytest.raises(RuntimeError, match="backend 'tuned' failed .*too old"):
        cog_attention(q, k, v, backend="tuned")


def test_decode_steps_of_few_sequences_take_the_reference(fresh_chooser, monkeypatch):
    calls = []
    spy_on_forwards(monkeypatch, calls)
    q, k, v, _ = make_inputs(2, 2, 1, 30, 16, torch.float32)
    torch.testing.assert_close(cog_attention(q, k, v, causal=True), cog_attention_reference(q, k, v, causal=True))
    assert calls == []
    monkeypatch.setattr(chooser, "DECODE_REFERENCE_MAX_HEADS", 3)  # B * H = 4 decode rows: the fused tier
    cog_attention(q, k, v, causal=True)
    assert calls[-1] == "tuned"
    calls.clear()
    cog_attention(q, k, v, causal=True, backend="compact")  # asked for by name: whatever the shape
    assert calls == ["compact", "compact"]  # its check, then the call


def test_deterministic_reaches_the_backend(fresh_chooser, monkeypatch):
    seen = []
    real = chooser._BACKWARD["tuned"]
    monkeypatch.setitem(chooser._BACKWARD, "tuned", lambda *a: seen.append(a[8]) or real(*a))
    q, k, v, do = make_inputs(1, 2, 19, 23, 16, torch.float32)
    run(cog_attention, q, k, v, do)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        run(cog_attention, q, k, v, do)
    finally:
        torch.use_deterministic_algorithms(previous)
    # each first use: the check (the one-pass backward's tile; the two-pass dK/dV tile, then dQ tile), then the call
    assert seen == [False, False, True, True, True]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_backward_is_autograd_of_the_reference(causal):
    """The chooser's reference backward (the kernels' formulas on the materialised weights) is the definition's
    gradient, with exact zero logits and document masks."""
    q, k, v, do = make_inputs(2, 2, 11, 15, 8, torch.float64, device="cpu")
    q[0, 0, 3], k[1, 1, 5] = 0.0, 0.0
    doc_ids = packed_doc_ids(2, 15, [4, 6, 5]).cpu()
    for ids in (None, doc_ids):
        want = run(cog_attention_reference, q, k, v, do, causal=causal, scale=0.7, doc_ids=ids)[1:]
        got = cog_kernel.cog_attention_reference_backward(do, q, k, v, causal=causal, scale=0.7, doc_ids=ids)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


@cpu
def test_torch_compile_chooses_at_run_time(fresh_chooser, monkeypatch):
    """fullgraph compile through cog_attention gives the eager output and gradients; the choice is made inside the
    custom op as the graph runs, so a tier that fails after compilation is skipped with a warning, no recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend
    q, k, v, do = make_inputs(1, 2, 20, 20, 16, torch.float32)
    f = lambda q, k, v: cog_attention(q * 0.5, k, v, causal=True) * 2.0  # noqa: E731
    eager = run(f, q, k, v, do)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_f = torch.compile(f, backend=counter, fullgraph=True)
    for x, y in zip(eager, run(compiled_f, q, k, v, do)):
        torch.testing.assert_close(x, y)
    monkeypatch.setitem(chooser._FORWARD, "tuned", raising)
    with pytest.warns(RuntimeWarning, match="skipping the tuned backend .*out of resources"):
        again = run(compiled_f, q, k, v, do)
    for x, y in zip(eager, again):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


# --- GPU ------------------------------------------------------------------------------------------------------------

GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-2}  # relative L2 error; fp32 uses tf32 dots


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Tq,Tk", [(2, 3, 1000, 1000), (1, 2, 4096, 4096), (1, 2, 777, 2048), (4, 4, 1, 3001),
                                       (1, 1, 16384, 16384)])
def test_gpu_matches_reference(B, H, Tq, Tk, D, dtype, causal):
    gpu_check(*make_inputs(B, H, Tq, Tk, D, dtype), causal=causal)


def gpu_check(q, k, v, do, **kw):
    got = run(tuned, q, k, v, do, **kw)
    want = reference64(q, k, v, do, causal=kw.get("causal", False), doc_ids=kw.get("doc_ids"))
    assert got[0].dtype == q.dtype
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        err = rel_l2(x, ref)
        assert err < GPU_TOL[q.dtype], f"{name}: relative L2 error {err:.2e} >= {GPU_TOL[q.dtype]:.0e}"
    return got


@gpu
@pytest.mark.parametrize("D", [24, 80, 96, 160, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_any_head_dim(D, dtype):
    gpu_check(*make_inputs(2, 2, 1000, 1000, D, dtype), causal=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_deterministic_backward_is_bitwise_reproducible(dtype):
    q, k, v, do = make_inputs(2, 4, 2048, 2048, 128, dtype)
    first = gpu_check(q, k, v, do, causal=True, deterministic=True)
    second = run(tuned, q, k, v, do, causal=True, deterministic=True)
    for name, x, y in zip(("o", "dq", "dk", "dv"), first, second):
        assert torch.equal(x, y), name
    gpu_check(q, k, v, do, causal=True, deterministic=False)  # the atomic one-pass backward


@gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_document_mask(dtype, causal, deterministic):
    q, k, v, do = make_inputs(2, 4, 2048, 2048, 128, dtype)
    gpu_check(q, k, v, do, causal=causal, deterministic=deterministic,
              doc_ids=packed_doc_ids(2, 2048, [700, 1, 300, 1047]))


@gpu
def test_gpu_many_heads_and_tiny_logits():
    """B * H = 70,000 programs' worth of heads (past CUDA's 65,535 limit on a grid's second axis), and logits ~1e-4
    that keep their signs."""
    q, k, v, do = make_inputs(700, 100, 16, 16, 16, torch.bfloat16)
    gpu_check(q, k, v, do, causal=True)
    q, k, v, do = make_inputs(1, 4, 500, 500, 64, torch.bfloat16)
    gpu_check((q * 0.01).bfloat16(), (k * 0.01).bfloat16(), v, do)


@gpu
@pytest.mark.parametrize("D", [16, 32, 128, 256])  # fp32 at 128 and 256: only FALLBACK_TILE fits shared memory
def test_gpu_fp32_and_small_head_dims(D):
    for dtype in (torch.float32, torch.float16):
        q, k, v, do = make_inputs(2, 2, 300, 513, D, dtype)
        got, want = run(tuned, q, k, v, do, causal=True), reference64(q, k, v, do, causal=True)
        for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
            assert rel_l2(x, ref) < GPU_TOL[dtype], name


@gpu
def test_gpu_noncontiguous():
    B, T, H, D = 2, 1000, 4, 64
    x = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=-1))  # as the model makes them
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    got, want = run(tuned, q, k, v, do, causal=True), reference64(q, k, v, do, causal=True)
    for name, x_, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel_l2(x_, ref) < GPU_TOL[torch.bfloat16], name


@gpu
def test_gpu_torch_compile():
    class Block(torch.nn.Module):
        def __init__(self, D=64, H=4):
            super().__init__()
            self.H, self.qkv = H, torch.nn.Linear(D * H, 3 * D * H)

        def forward(self, x):  # (B, T, C)
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
            return cog_attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, C)

    torch.manual_seed(0)
    model = Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for m in (model, torch.compile(model, fullgraph=False)):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.enable_grad():
            y = m(xi)
            y.float().square().mean().backward()
        results.append((y, xi.grad, model.qkv.weight.grad))
    for name, a, b in zip(("y", "dx", "dW"), *results):
        assert rel_l2(a, b.double()) < 1e-2, name

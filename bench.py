"""
Attention benchmarks: the fused Cog kernels against PyTorch's softmax attention (flash backend), FlexAttention (Cog
as two compiled flex_attention calls, softmax as one), a softmax twin of our own kernels, and the naive Cog reference.

On a GPU, everything below in one command that keeps to 8 minutes, as a report (docs/kernel.md describes it; without
a GPU it makes a dry run of the same steps at tiny sizes):

    python bench.py --report=report.md               # report.md, report.json, report.log

On a GPU, forward and forward+backward at a fixed number of tokens per batch (B * T):

    python bench.py                                  # the full table (T = 1024 ... 16384, head dims 64 and 128)
    python bench.py --seqlens=1024,4096 --head_dims=64 --modes=fwd_bwd --masks=causal    # a quick run
    python bench.py --deterministic                  # Cog with the two-pass (bit-reproducible) backward
    python bench.py --doc_len=512 --masks=causal      # also Cog with document masks (packed documents of ~512)

Without a GPU, what the H100/H200 would run: every kernel and tile that autotuning can pick, compiled for sm_90 by
Triton's own compiler and ptxas (registers, spills, shared memory, wgmma widths, mma.sync fallbacks, and the SASS
instruction count of each loop body), for the Cog kernels and their softmax twins side by side:

    python bench.py --sm90                           # bf16, head dims 64 and 128
    python bench.py --sm90 --dtype=fp16 --head_dims=32,256
    python bench.py --sm90 --docs                    # the document-masked kernels

The softmax twin is cog_kernel_tuned.py's kernels with its two Cog-specific helpers swapped for softmax's (the logits
themselves instead of |s|; the weights p instead of sign(s) * p): same code, same tiles, same autotuning. The twin is
plain softmax attention (test_kernel.py checks it against PyTorch's), so Cog / twin is what the signs cost, and
twin / SDPA is what our Triton kernels cost against FlashAttention.

End to end, the trainers' own training steps (model, AdamW, autocast, loss scaling, EMA) on random data, Cog against
softmax in one run, interleaved in rounds so that drift hits both alike:

    python bench.py --model=lm --compile             # Cogformer vs Transformer: the paper's 12 x 768, context 2048
    python bench.py --model=diffusion --compile      # U-ViC vs U-ViT: U-ViT-S/2 on 32 x 32 images, batch 128
    python bench.py --model=diffusion --preset=coco --compile    # text-to-image: 77 text tokens, 4 x 32 x 32 latents
    python bench.py --model=lm --preset=demo --vocab_size=256    # any trainer preset; this one runs on a CPU too
    python bench.py --model=lm --compile --n_layer=24            # any other --key=value goes to the trainer's config

Each model is built and warmed up in turn; its "peak MiB" is max_memory_allocated over its warm-up steps, less what
the other model holds: its own weights, gradients, optimizer state and activations. "estimate MiB" is the trainers'
memory estimate (memory.estimate_memory) for one process.

TFLOP/s count FLOPs as for softmax attention: 4 * B * H * Tq * Tk * D for the forward (its two matmuls), halved when
causal, and 3.5 times that for forward + backward. "MiB" is the peak memory allocated during one call beyond the inputs
(torch.cuda.max_memory_allocated). The reference materialises (B, H, T, T) weights; where that runs out of memory the
table says OOM.
"""

import argparse
import contextlib
import faulthandler
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def cuda_in_a_child():
    """torch.cuda.is_available(), asked in a forked process: asked here, it would start CUDA's driver in this process,
    and CUDA then fails in the report's step processes, which are forked from this one."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if torch.cuda.is_available() else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# --report asks now, before Triton is imported below: without a GPU it makes a dry run, in Triton's interpreter
REPORT_GPU = cuda_in_a_child() if __name__ == "__main__" and any(a.startswith("--report") for a in sys.argv) else None
if REPORT_GPU is False:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when Triton is first imported)

import cog_kernel
import cog_kernel_tuned
from cog_attention import DECODE_REFERENCE_MAX_HEADS, cog_attention
from cog_kernel import cog_attention_reference, padded_head_dim, tl
from cog_kernel_tuned import TILES, shared_memory_bytes
from model import CogformerConfig

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flash_only = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
except ImportError:
    flash_only = contextlib.nullcontext
try:  # torch >= 2.9 asks for flex_attention's log-sum-exp this way (return_lse is deprecated there)
    from torch.nn.attention.flex_attention import AuxRequest
    FLEX_LSE = dict(return_aux=AuxRequest(lse=True))
except ImportError:
    FLEX_LSE = dict(return_lse=True)
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# the jit function of each TILES kind
KERNELS = {"fwd": "_cog_fwd", "bwd": "_cog_bwd", "dkdv": "_cog_bwd", "dq": "_cog_bwd_dq"}

# -----------------------------------------------------------------------------
# the softmax twin


def _logits(qk):
    return qk  # softmax runs over s itself


def _weights(qk, p, qk_scale, FP16: tl.constexpr, OUT: tl.constexpr):
    return p.to(OUT)  # no signs


def softmax_twin():
    """cog_kernel_tuned's kernels rebuilt over a copy of its globals in which _magnitude and _signed_weights are softmax's:
    a namespace with the twin's autotuned kernels (tuned, by TILES kind) and its forward and backward functions."""
    if cog_kernel.triton is None:
        raise RuntimeError("the softmax twin needs Triton")
    scope = dict(vars(cog_kernel_tuned))
    scope["_magnitude"], scope["_signed_weights"] = cog_kernel_tuned._jit(_logits), cog_kernel_tuned._jit(_weights)
    for name, obj in vars(cog_kernel_tuned).items():
        fn = getattr(jit_function(obj), "fn", None)  # the Python function of a jit function, autotuned or not
        if name in ("_magnitude", "_signed_weights") or not isinstance(fn, types.FunctionType) or \
                fn.__module__ != cog_kernel_tuned.__name__ or fn.__name__ != name:  # (_cog_bwd's autotuners: kept out)
            continue
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__annotations__, copy.__doc__ = fn.__annotations__, fn.__doc__  # the tl.constexpr marks live there
        scope[name] = cog_kernel_tuned._jit(copy)
    twin = types.SimpleNamespace(tuned={kind: cog_kernel_tuned._autotune(kind)(scope[name])
                                        for kind, name in KERNELS.items()})
    twin.forward = lambda q, k, v, causal, scale: cog_kernel_tuned.attention_forward(q, k, v, causal, scale, tuned=twin.tuned)
    twin.backward = lambda *args: cog_kernel_tuned.attention_backward(*args, tuned=twin.tuned)
    twin.scope = scope  # the plain jit functions, for the compile report
    return twin


def softmax_attention_twin(q, k, v, causal=False, scale=None, twin=None, deterministic=False):
    """Softmax attention (B, H, Tq, D) through the twin kernels, with autograd: what bench.py times as 'twin'."""
    twin = twin or softmax_twin()
    scale = q.size(-1) ** -0.5 if scale is None else scale

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse = twin.forward(q, k, v, causal, scale)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            return twin.backward(do, q, k, v, o, lse, causal, scale, deterministic)

    return Twin.apply(q, k, v)


# -----------------------------------------------------------------------------
# timings: on a GPU (the report's dry run takes the same path on the CPU, at tiny sizes)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sdpa_softmax(q, k, v, causal=False):
    with flash_only():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@functools.lru_cache(maxsize=16)
def causal_block_mask(Tq, Tk, device):
    """FlexAttention's block mask of the causal mask, made once per shape: query i sees key j <= i + Tk - Tq."""
    return create_block_mask(lambda b, h, i, j: j <= i + (Tk - Tq), None, None, Tq, Tk, device=device)


def flex_cog_pair(q, k, v, block_mask):
    """Cog attention as two FlexAttention calls, one over the positive logits and one over the negative ones (the others
    -inf), each a softmax over |s|, combined through their log-sum-exps Z = exp(lse): o = (Z+ O+ - Z- O-) / (Z+ + Z-).
    An exact zero logit counts as positive (Cog gives it weight 0; the kernels do). attention_functions compiles this
    whole function, as a user would: one graph with both calls and the combination."""
    positive = lambda score, b, h, i, j: torch.where(score >= 0, score, float("-inf"))  # noqa: E731
    negative = lambda score, b, h, i, j: torch.where(score < 0, -score, float("-inf"))  # noqa: E731
    o_pos, aux_pos = flex_attention(q, k, v, score_mod=positive, block_mask=block_mask, **FLEX_LSE)
    o_neg, aux_neg = flex_attention(q, k, v, score_mod=negative, block_mask=block_mask, **FLEX_LSE)
    lse_pos = aux_pos.lse if "return_aux" in FLEX_LSE else aux_pos
    lse_neg = aux_neg.lse if "return_aux" in FLEX_LSE else aux_neg
    # a row with no positive (or no negative) logit has lse = -inf there: its weight exp(lse - m) is 0
    m = torch.maximum(lse_pos, lse_neg)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see no key at all: o = 0
    z_pos, z_neg = torch.exp(lse_pos - m).unsqueeze(-1), torch.exp(lse_neg - m).unsqueeze(-1)
    numerator = torch.where(z_pos > 0, z_pos * o_pos, 0.0) - torch.where(z_neg > 0, z_neg * o_neg, 0.0)
    return (numerator / (z_pos + z_neg).clamp_min(torch.finfo(z_pos.dtype).tiny)).to(q.dtype)


def flex_softmax_call(q, k, v, block_mask):
    """Softmax attention through FlexAttention (no score_mod): the yardstick for flex_cog_pair."""
    return flex_attention(q, k, v, block_mask=block_mask)


def flex_cog_attention(q, k, v, causal=False, pair=flex_cog_pair):
    """Cog attention (B, H, Tq, D) through FlexAttention: flex_cog_pair, or pair (its torch.compile'd self), with the
    causal block mask made outside it."""
    return pair(q, k, v, causal_block_mask(q.size(2), k.size(2), str(q.device)) if causal else None)


def compile_flex(fn, device):
    """fn torch.compile'd on a GPU, where FlexAttention runs fast only compiled; as it is on the CPU (the dry run).
    One graph per shape, mask and mode is more than Dynamo's default 8 recompiles of a function, after which it would
    quietly run FlexAttention uncompiled (materialising the scores): the limit is raised."""
    if device != "cuda":
        return fn
    import torch._dynamo
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # (its older name)
    setattr(config, limit, max(getattr(config, limit), 256))
    return torch.compile(fn, dynamic=False)


def int_list(s):
    return [int(x) for x in s.split(",")]


def head_dims(s):
    dims = int_list(s)
    bad = [d for d in dims if not 1 <= d <= cog_kernel.MAX_HEAD_DIM]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: head dims run from 1 to {cog_kernel.MAX_HEAD_DIM}")
    return dims


def at_least(minimum):
    def parse(s):
        value = int(s)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value
    return parse


def str_list(choices):
    def parse(s):
        items = s.split(",")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}, choose from {','.join(choices)}")
        return items
    return parse


IMPLS = ["cog", "compact", "flex", "twin", "sdpa", "flex_softmax", "reference", "cog_docs"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # (an abbreviation would swallow a trainer's --key=value)
    p.add_argument("--report", metavar="FILE.md", help="the GPU report: every step below in one run (about 8 "
                   "minutes on an H100), written to FILE.md and FILE.json; without a GPU, a dry run at tiny sizes")
    p.add_argument("--sm90", action="store_true", help="compile reports for sm_90 (no GPU needed) instead of timings")
    p.add_argument("--portability", action="store_true", help="compile every kernel of both fused tiers for every "
                   "target, dtype, head dim and tile (no GPU needed) instead of timings")
    p.add_argument("--targets", type=str_list(list(TARGETS)), default=list(TARGETS), help="--portability: "
                   + ",".join(TARGETS))
    p.add_argument("--kernels", type=str_list(list(TUNED_KERNELS)), default=list(TUNED_KERNELS),
                   help="--portability: " + ",".join(TUNED_KERNELS) + " (the compact tier has no bwd)")
    p.add_argument("--tiers", type=str_list(["tuned", "compact"]), default=["tuned", "compact"],
                   help="--portability: tuned,compact")
    p.add_argument("--dtypes", type=str_list(list(ITEMSIZE)), default=list(ITEMSIZE), help="--portability: "
                   + ",".join(ITEMSIZE))
    p.add_argument("--workers", type=at_least(0), default=0, help="--portability: compile processes (0: one per CPU)")
    p.add_argument("--seqlens", type=int_list, default=[1024, 2048, 4096, 8192, 16384], help="comma-separated T")
    p.add_argument("--head_dims", type=head_dims, default=None, help="comma-separated D, 1 to 256 "
                   "(default 64,128; --portability: 64,128,72)")
    p.add_argument("--modes", type=str_list(["fwd", "fwd_bwd"]), default=["fwd", "fwd_bwd"], help="fwd,fwd_bwd")
    p.add_argument("--masks", type=str_list(["full", "causal"]), default=["full", "causal"], help="full,causal")
    p.add_argument("--impls", type=str_list(IMPLS), default=IMPLS[:7], help=",".join(IMPLS)
                   + " (cog: the tuned kernel; flex: Cog through FlexAttention)")
    p.add_argument("--decode_lens", type=lambda x: [] if x in ("", "0") else int_list(x),
                   default=[1024, 4096, 16384, 32768], help="decode rows (Tq = 1) after the table: comma-separated Tk "
                   "(0: none)")
    p.add_argument("--decode_batches", type=int_list, default=[1, 8], help="decode rows: comma-separated B")
    p.add_argument("--tokens", type=int, default=16384, help="B * T (B = tokens // T, at least 1)")
    p.add_argument("--width", type=int, default=2048, help="H * D (H = width // D)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--deterministic", action="store_true", help="time the two-pass backward of cog (and twin); "
                   "--model: as the trainers' --deterministic")
    p.add_argument("--docs", action="store_true", help="--sm90: report the document-masked kernels")
    p.add_argument("--doc_len", type=int, default=0, help="also time cog_docs: Cog with document masks, packed "
                   "documents of random lengths averaging this many tokens")
    p.add_argument("--model", choices=["lm", "diffusion"], help="time training steps of a whole model instead; any "
                   "other --key=value goes to the trainer's TrainConfig (e.g. --n_layer=6)")
    p.add_argument("--preset", default="paper", help="--model: the trainer's preset")
    p.add_argument("--batch_size", type=at_least(0), default=0, help="--model: micro-batch (0: the preset's)")
    p.add_argument("--vocab_size", type=at_least(1), default=CogformerConfig.vocab_size, help="--model=lm: "
                   "CogformerConfig's, GPT-2's tokens padded (the demo corpus: 256 bytes)")
    p.add_argument("--compile", action="store_true", help="--model: torch.compile the models")
    p.add_argument("--steps", type=at_least(1), default=60, help="--model: timed steps per model (after "
                   "--warmup_steps)")
    p.add_argument("--warmup_steps", type=at_least(0), default=10, help="--model: untimed steps first (compile, "
                   "autotune)")
    p.add_argument("--warmup", type=int, default=25, help="warmup time in ms for triton.testing.do_bench")
    p.add_argument("--rep", type=int, default=100, help="measurement time in ms for triton.testing.do_bench")
    args, args.trainer_args = p.parse_known_args(argv)
    if args.trainer_args and not (args.model or args.report):
        p.error(f"unrecognized arguments: {' '.join(args.trainer_args)} (trainer options go with --model or --report)")
    if args.report is not None:  # a name that cannot be written: said now, not after minutes of GPU time
        folder = os.path.dirname(os.path.abspath(args.report))
        if not os.path.basename(args.report) or os.path.splitext(args.report)[1] in (".json", ".log"):
            p.error(f"--report={args.report}: give the Markdown file to write, e.g. --report=report.md")
        if not os.path.isdir(folder):
            p.error(f"--report={args.report}: there is no folder {folder}")
    if args.report:  # each trainer gets the keys of its own config: refuse a key neither has, before the GPU time
        unknown = [a for a in args.trainer_args if not any(a[2:].partition("=")[0] in trainer_keys(model)
                                                           for model in ("lm", "diffusion"))]
        if unknown:
            p.error(f"unrecognized arguments: {' '.join(unknown)} (neither trainer's TrainConfig has them)")
    return args


def trainer_keys(model):
    """The --key names of a trainer's TrainConfig ("lm" or "diffusion")."""
    import dataclasses
    return {f.name for f in dataclasses.fields(trainer_module(model).TrainConfig)}


def trainer_module(model):
    import train_diffusion
    import train_lm
    return train_lm if model == "lm" else train_diffusion


def packed_documents(B, T, mean_len, device, seed=0):
    """(B, T) document ids: documents of random lengths (exponentially distributed, mean mean_len) packed end to end."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 1.0 / mean_len
    return torch.cumsum(starts, dim=1).to(device)


def attention_functions(args, device="cuda"):
    """{impl: fn(q, k, v, causal)}, the implementations the tables and the report time (IMPLS); those that take
    document masks (cog, compact, reference) also take doc_ids=. FlexAttention's are compiled on a GPU
    (compile_flex)."""
    twin = softmax_twin()
    docs = {}  # (B, T) -> doc ids, made once per shape

    def cog_docs(q, k, v, causal):
        shape = (q.size(0), q.size(2))
        if shape not in docs:
            docs[shape] = packed_documents(*shape, args.doc_len, q.device)
        ids = docs[shape]
        return cog_attention(q, k, v, causal=causal, deterministic=args.deterministic, doc_ids=ids, backend="tuned")

    flex_cog, flex_softmax = compile_flex(flex_cog_pair, device), compile_flex(flex_softmax_call, device)
    return {
        "cog_docs": cog_docs,
        "compact": lambda q, k, v, causal, doc_ids=None: cog_attention(q, k, v, causal=causal, doc_ids=doc_ids,
                                                                       backend="compact"),
        "flex": lambda q, k, v, causal: flex_cog_attention(q, k, v, causal, pair=flex_cog),
        "flex_softmax": lambda q, k, v, causal: flex_cog_attention(q, k, v, causal, pair=flex_softmax),
        "cog": lambda q, k, v, causal, doc_ids=None: cog_attention(q, k, v, causal=causal, doc_ids=doc_ids,
                                                                   deterministic=args.deterministic, backend="tuned"),
        "twin": lambda q, k, v, causal: softmax_attention_twin(q, k, v, causal, twin=twin,
                                                               deterministic=args.deterministic),
        "sdpa": sdpa_softmax,
        "reference": lambda q, k, v, causal, doc_ids=None: cog_attention_reference(q, k, v, causal=causal,
                                                                                   doc_ids=doc_ids),
    }


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def attention_call(fn, mode, causal, B, H, Tq, Tk, D, dtype, device):
    """A function of no arguments that calls fn on random inputs (q (B, H, Tq, D); k, v (B, H, Tk, D)): the forward, and
    for mode fwd_bwd the gradients of q, k and v too."""
    q, do = (torch.randn(B, H, Tq, D, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Tk, D, device=device, dtype=dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(mode == "fwd_bwd")

    def call():
        o = fn(q, k, v, causal)
        if mode == "fwd_bwd":
            torch.autograd.grad(o, (q, k, v), do)

    return call


def time_ms(call, args, device):
    """Milliseconds per call: Triton's do_bench on a GPU (CUDA events); on the CPU (the dry run), one call's wall
    time."""
    if device != "cuda":
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(call, warmup=args.warmup, rep=args.rep)


def peak_mib(call, device):
    """The peak memory allocated during one call beyond what was allocated before it, in MiB (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn, mode, causal, B, H, T, D, dtype, args, Tq=None, device="cuda"):
    """One call with T keys and Tq queries (T if None), timed: {ms, mib, first_s}, first_s the seconds of the first call
    (compiling, autotuning and the chooser's first-use check included); or {error}, "OOM" where it ran out of memory."""
    call = None
    try:
        call = attention_call(fn, mode, causal, B, H, Tq or T, T, D, dtype, device)
        t0 = time.perf_counter()
        call()
        synchronize(device)
        first_s = time.perf_counter() - t0
        return dict(ms=time_ms(call, args, device), mib=peak_mib(call, device), first_s=first_s)
    except OOM:
        return dict(error="OOM")
    except Exception as error:  # noqa: BLE001 (an implementation that fails is a result: the table says so)
        return dict(error=one_line(error))
    finally:
        del call  # (its inputs)
        if device == "cuda":
            torch.cuda.empty_cache()


def attention_flops(mode, causal, B, H, T, D):
    """FLOPs as counted for softmax attention: 4 * B * H * T * T * D for the forward (its two matmuls), halved when
    causal, and 3.5 times that for forward + backward."""
    return 4 * B * H * T * T * D * (0.5 if causal else 1.0) * (3.5 if mode == "fwd_bwd" else 1.0)


def kernel_shapes(args):
    """The kernel table's rows, (mode, mask, D, T, B, H), at B * T = args.tokens and H * D = args.width."""
    return [(mode, mask, D, T, max(1, args.tokens // T), max(1, args.width // D))
            for mode in args.modes for mask in args.masks for D in args.head_dims for T in args.seqlens]


def kernel_row(shape, fns, impls, dtype, args, device, failed):
    """One row of the kernel table: each implementation measured at shape (kernel_shapes), with its TFLOP/s and its
    speed against SDPA's (vs_sdpa: SDPA's time / its time). failed {(impl, mode, mask, D): error} holds the failures of
    earlier rows: an implementation that ran out of memory (or failed) at a shorter T is not tried again."""
    mode, mask, D, T, B, H = shape
    flops = attention_flops(mode, mask == "causal", B, H, T, D)
    cells = {}
    for impl in impls:
        key = (impl, mode, mask, D)
        cell = dict(error=failed[key]) if key in failed else \
            measure(fns[impl], mode, mask == "causal", B, H, T, D, dtype, args, device=device)
        if "error" in cell:
            failed[key] = cell["error"]
        else:
            cell["tflops"] = flops / (cell["ms"] * 1e-3) / 1e12
        cells[impl] = cell
    if "ms" in cells.get("sdpa", {}):
        for cell in cells.values():
            if "ms" in cell:
                cell["vs_sdpa"] = cells["sdpa"]["ms"] / cell["ms"]
    return dict(mode=mode, mask=mask, D=D, T=T, B=B, H=H, cells=cells)


def cell_errors(rows):
    """For below a table: each distinct (impl, error) of its cells, but running out of memory (the cells say OOM)."""
    return sorted({(impl, cell["error"]) for row in rows for impl, cell in row["cells"].items()
                   if cell.get("error", "OOM") != "OOM"})


def timings(args):
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU for timings (none found); nothing was measured. "
                 "`python bench.py --sm90` reports what sm_90 would run without one, "
                 "`python bench.py --report=report.md` makes a dry run of the GPU report.")
    dtype = DTYPES[args.dtype]
    fns = attention_functions(args)
    import triton
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          f"B*T = {args.tokens}, H*D = {args.width}, deterministic backward: {args.deterministic}\n")
    ratios = [("cog/sdpa", "cog", "sdpa"), ("cog/twin", "cog", "twin"), ("cog_docs/cog", "cog_docs", "cog")]
    ratios = [r for r in ratios if r[1] in args.impls and r[2] in args.impls]
    print("| mode | mask | D | T | B x H | " + " | ".join(f"{i} TFLOP/s" for i in args.impls) + " | "
          + " | ".join(name for name, _, _ in ratios) + " | " + " | ".join(f"{i} MiB" for i in args.impls) + " |")
    print("|---" * (5 + 2 * len(args.impls) + len(ratios)) + "|")
    rows, failed = [], {}
    for shape in kernel_shapes(args):
        row = kernel_row(shape, fns, args.impls, dtype, args, "cuda", failed)
        rows.append(row)
        cells = row["cells"]
        speed = [f"{c['tflops']:.1f}" if "tflops" in c else short_error(c) for c in cells.values()]
        mem = [f"{c['mib']:.0f}" if "mib" in c else short_error(c) for c in cells.values()]
        ratio = [f"{cells[b]['ms'] / cells[a]['ms']:.2f}" if "ms" in cells[a] and "ms" in cells[b] else "-"
                 for _, a, b in ratios]  # a speed ratio: time of b / time of a
        print(f"| {row['mode']} | {row['mask']} | {row['D']} | {row['T']} | {row['B']} x {row['H']} | "
              + " | ".join(speed + ratio + mem) + " |", flush=True)
    for impl, error in cell_errors(rows):
        print(f"{impl}: {error}")
    if args.decode_lens:
        decode_timings(args, fns, dtype)


def short_error(cell):  # a table cell's word for a failed measurement (cell_errors says what failed)
    return "OOM" if cell["error"] == "OOM" else "error"


DECODE_IMPLS = ("cog", "compact", "flex", "reference", "sdpa")


def decode_shapes(args, head_dims=None):
    """The decode rows, (D, Tk, B, H): one query against Tk cached keys, at H * D = args.width (head dims: those of
    args, or these)."""
    return [(D, Tk, B, max(1, args.width // D)) for D in head_dims or args.head_dims for Tk in args.decode_lens
            for B in args.decode_batches]


def decode_row(shape, fns, impls, dtype, args, device):
    """Decode steps as generate takes them: one query (Tq = 1) against Tk cached keys (it sees them all: no mask),
    forward only. GB/s counts the keys and values read, 2 * B * H * Tk * D elements: what bounds a decode step."""
    D, Tk, B, H = shape
    cells = {}
    for impl in impls:
        cell = cells[impl] = measure(fns[impl], "fwd", False, B, H, Tk, D, dtype, args, Tq=1, device=device)
        if "ms" in cell:
            cell["gbs"] = 2 * B * H * Tk * D * dtype.itemsize / (cell["ms"] * 1e-3) / 1e9
    return dict(D=D, Tk=Tk, B=B, H=H, cells=cells)


def decode_timings(args, fns, dtype):
    impls = [i for i in args.impls if i in DECODE_IMPLS]
    print(f"\n# decode: Tq = 1, forward, H*D = {args.width}; microseconds per call (GB/s of keys and values)\n")
    print("| D | Tk | B x H | " + " | ".join(f"{i} us (GB/s)" for i in impls) + " |")
    print("|---" * (3 + len(impls)) + "|")
    rows = []
    for shape in decode_shapes(args):
        row = decode_row(shape, fns, impls, dtype, args, "cuda")
        rows.append(row)
        cells = [f"{c['ms'] * 1e3:.0f} ({c['gbs']:.0f})" if "ms" in c else short_error(c)
                 for c in row["cells"].values()]
        print(f"| {row['D']} | {row['Tk']} | {row['B']} x {row['H']} | " + " | ".join(cells) + " |", flush=True)
    for impl, error in cell_errors(rows):
        print(f"{impl}: {error}")
    print("\n" + decode_rule(rows)[1])


# the implementations cog_attention chooses among, by their names in the chooser
CHOOSER_BACKENDS = {"cog": "tuned", "compact": "compact", "reference": "reference"}


def decode_rule(rows):
    """What decode rows say about the chooser's decode rule (the reference for Tq = 1 when B * H <=
    DECODE_REFERENCE_MAX_HEADS): (the largest bound that fits them, or None where none does, a sentence)."""
    winners = {}  # B * H -> [(Tk, the fastest backend the chooser could take)]
    for row in rows:
        times = {name: row["cells"][impl]["ms"] for impl, name in CHOOSER_BACKENDS.items()
                 if "ms" in row["cells"].get(impl, {})}
        if "reference" in times and len(times) > 1:
            winners.setdefault(row["B"] * row["H"], []).append((row["Tk"], min(times, key=times.get)))
    now = f"(now DECODE_REFERENCE_MAX_HEADS = {DECODE_REFERENCE_MAX_HEADS})"
    if not winners:
        return None, f"Decode rule: no row timed both the reference and a fused kernel, so none follows {now}."
    seen = ", ".join(f"B*H = {heads}: " + ", ".join(f"{name} at Tk {Tk}" for Tk, name in sorted(won))
                     for heads, won in sorted(winners.items()))
    reference = [heads for heads, won in winners.items() if all(name == "reference" for _, name in won)]
    fused = [heads for heads, won in winners.items() if all(name != "reference" for _, name in won)]
    if len(reference) + len(fused) < len(winners) or (reference and fused and max(reference) > min(fused)):
        return None, (f"Decode rule: no bound on B*H alone fits these rows {now}; the fastest of the chooser's "
                      f"backends: {seen}.")
    low = max(reference, default=0)
    high = min((heads for heads in fused if heads > low), default=None)
    fits = f"any bound from {low} to {high - 1} fits" if high else f"any bound from {low} up fits"
    where = f"the reference is fastest at B*H <= {low} and a fused kernel above" if reference else \
        "a fused kernel is fastest at every B*H"
    return low, (f"Decode rule: {where}, at every Tk measured: DECODE_REFERENCE_MAX_HEADS = {low} ({fits}; B*H "
                 f"between the rows measured is untested) {now}. Fastest: {seen}.")


# -----------------------------------------------------------------------------
# end-to-end training steps: Cogformer vs Transformer, U-ViC vs U-ViT


def training_step(args, attn, device):
    """The trainer's model for --model and --preset with attention attn, and its training step on random data as the
    trainer takes it: a namespace of step (a function, which returns the loss), model, config, work per step (tokens
    or images) and FLOPs per step (None where not counted)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cli import parse_config
    from diffusion import diffusion_loss, ema_update, get_schedule
    from distributed import shard_model
    from memory import blocks_of, estimate_memory, plan_of
    from model import Cogformer, UViC, UViCConfig
    from training import autocast_context, configure_adamw, make_grad_scaler, optimizer_step, pick_fields, resolve_dtype

    trainer = trainer_module(args.model)
    config = parse_config(trainer.TrainConfig, trainer.PRESETS, [f"--preset={args.preset}", f"--attn={attn}",
                                                                 *trainer_args(args)])
    config.batch_size = args.batch_size or config.batch_size
    config.dtype = dtype = resolve_dtype(config.dtype, device)
    ddp, world_size = torch.distributed.is_initialized(), getattr(args, "world_size", 1)
    fsdp = config.fsdp and ddp
    torch.manual_seed(0)
    if args.model == "lm":
        model_config = pick_fields(config, CogformerConfig)
        model_config.vocab_size = args.vocab_size
        model = Cogformer(model_config)
        tokens = torch.randint(model_config.vocab_size, (config.batch_size, model_config.block_size + 1), device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        work, flops = x.numel(), model.flops_per_token() * x.numel()
    else:
        model_config = pick_fields(config, UViCConfig)
        model = UViC(model_config)
        ema = UViC(model_config).to(device).requires_grad_(False)
        size = model_config.img_size
        x0 = torch.rand(config.batch_size, model_config.in_chans, size, size, device=device) * 2 - 1
        context = None if not model_config.num_clip_token else \
            torch.randn(config.batch_size, model_config.num_clip_token, model_config.clip_dim, device=device)
        generator, schedule = torch.Generator(device).manual_seed(0), get_schedule(config.noise_schedule)
        work, flops = config.batch_size, None
    # as the trainers place it: under torchrun with --fsdp each block compiled and sharded, else compiled whole and DDP
    estimate = estimate_memory(model, plan_of(model, config, world_size, fsdp)).total
    model.activation_checkpointing = config.activation_checkpointing
    if fsdp:
        for block in blocks_of(model) if args.compile else []:
            block.compile()
        model = compiled = shard_model(model, blocks_of(model), device, dtype)
    else:
        model = model.to(device)
        compiled = torch.compile(model) if args.compile else model
        if ddp:
            compiled = DDP(compiled, device_ids=[device] if device.startswith("cuda") else None)
    optimizer = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                device.split(":")[0])
    scaler, ctx = make_grad_scaler(device, dtype), autocast_context(device, dtype)

    def step():  # returns the loss, unsynchronised
        with ctx:
            if args.model == "lm":
                loss = compiled(x, y)[1]
            else:
                loss = diffusion_loss(compiled, x0, generator, config.prediction, schedule, context)
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, config.grad_clip)
        if args.model == "diffusion":
            ema_update(ema, model, config.ema_decay)
        return loss.detach()

    return types.SimpleNamespace(step=step, model=model, config=config, work=work * world_size, flops=flops,
                                 estimate=estimate, mode="FSDP" if fsdp else "DDP" if ddp else "")


def trainer_args(args):
    """The --key=value arguments bench.py does not know, for the trainer's TrainConfig: all of them with --model (the
    trainer's parser names a key it does not have), those of this trainer's config with --report."""
    extra = getattr(args, "trainer_args", [])
    if not getattr(args, "report", None):
        return extra
    keys = trainer_keys(args.model)
    return [arg for arg in extra if arg[2:].partition("=")[0] in keys]


def time_models(args, device):
    """Cog's model and softmax's (--model, --preset) training, as training_step takes it: each built and warmed up in
    turn (compiling, autotuning), then both timed in alternating rounds so that drift hits both alike. Returns the
    run's facts and a row per model: the median round's ms per step, tokens or images per second, MFU, peak memory
    (max_memory_allocated while it warms up, less what the model before it holds) and the memory estimate."""
    from training import peak_flops, use_deterministic_algorithms

    use_deterministic_algorithms(args.deterministic)  # as the trainers' --deterministic
    runs, warmup_s, peak = {}, {}, {}
    for attn in ("cog", "softmax"):
        held = torch.cuda.memory_allocated() if device.startswith("cuda") else 0  # the model before it: weights, optimizer
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run = runs[attn] = training_step(args, attn, device)
        for _ in range(args.warmup_steps):
            run.step()
        synchronize(device)
        warmup_s[attn] = time.perf_counter() - t0
        peak[attn] = (torch.cuda.max_memory_allocated() - held) / 2**20 if device.startswith("cuda") else None
    rounds, per_round = {attn: [] for attn in runs}, max(1, args.steps // 5)
    for _ in range(-(-args.steps // per_round)):
        for attn, run in runs.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                run.step()
            synchronize(device)
            rounds[attn].append((time.perf_counter() - t0) / per_round)
    flops_peak, rows = peak_flops(device), []
    for attn, run in runs.items():
        median = sorted(rounds[attn])[len(rounds[attn]) // 2]
        rows.append(dict(attn=attn, ms=median * 1e3, min_ms=min(rounds[attn]) * 1e3, max_ms=max(rounds[attn]) * 1e3,
                         per_s=run.work / median,
                         mfu=run.flops / median / flops_peak if run.flops and flops_peak else None,
                         peak_mib=peak[attn], estimate_mib=memory_estimate_mib(run),
                         first_s=max(0.0, warmup_s[attn] - args.warmup_steps * median)))  # compiling, autotuning
    config = runs["cog"].config
    return dict(model=args.model, preset=args.preset, batch=config.batch_size, dtype=config.dtype,
                compile=args.compile, deterministic=args.deterministic, warmup_steps=args.warmup_steps,
                steps=args.steps, per_round=per_round, unit="tokens" if args.model == "lm" else "images",
                where=torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)",
                rows=rows, speed=rows[1]["ms"] / rows[0]["ms"], mode=runs["cog"].mode)


def memory_estimate_mib(run):
    """The trainers' memory estimate per GPU (memory.estimate_memory) for this model and run, in MiB."""
    return run.estimate / 2**20


def model_timings(args):
    """--model: time_models, printed. Under torchrun every process trains (with --fsdp sharded, else under DDP), and the
    first prints the figures: per second for all processes together, memory per GPU."""
    from distributed import setup_distributed
    _, rank, args.world_size, device = setup_distributed("cuda" if torch.cuda.is_available() else "cpu")
    r = time_models(args, device)
    if rank > 0:
        return
    if r["mode"]:
        print(f"# {args.world_size} processes, {r['mode']}")
    print(f"# {r['where']}, torch {torch.__version__}, --model={r['model']} --preset={r['preset']}, "
          f"batch {r['batch']}, dtype {r['dtype']}, compile {r['compile']}, deterministic {r['deterministic']}: "
          f"{r['warmup_steps']} warm-up "
          f"steps, then {r['steps']} timed steps each, in rounds of {r['per_round']} alternating cog and softmax\n")
    print(f"| attn | ms/step (median round) | rounds min-max ms | {r['unit']}/s | MFU | peak MiB | estimate MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['attn']} | {row['ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | {row['per_s']:,.0f} | "
              f"{percent(row['mfu'])} | {mib(row['peak_mib'])} | {mib(row['estimate_mib'])} |")
    print(f"\ncog/softmax speed: {r['speed']:.3f} (softmax's time per step / cog's)")


def percent(x):
    return "-" if x is None else f"{x * 100:.1f}%"


def mib(x):  # MiB, or "-" where not measured (the CPU), or the text of an error
    return "-" if x is None else x if isinstance(x, str) else f"{x:,.0f}"


# -----------------------------------------------------------------------------
# the GPU report: python bench.py --report=FILE.md
#
# One command for a GPU lent for a few minutes. Its steps (REPORT_STEPS) run in order, each in a process of its own
# forked from this one, so that a crash, a CUDA error (which poisons the process's CUDA context) or an overrun ends
# that step alone. A step saves its results as it goes (save), starts no new work near its time limit (out_of_time)
# and is killed at it; FILE.md, and the same figures in FILE.json, are rewritten after every step and every few
# seconds, so a kill leaves what was done. Without a GPU the same steps run at tiny sizes on the CPU in Triton's
# interpreter: the dry run, which the test suite runs, so that the GPU meets nothing a CPU could have caught.

REPORT_SIZES = {
    "cuda": dict(
        dtype="bf16", train_shape=(4, 12, 2048, 64),  # (B, H, T, D): the paper's LM, 4 sequences
        check_batch=(2, 4), checks=[  # (dtype, causal, head dim, Tq, Tk, document masks), lengths off the tiles
            ("bf16", True, 64, 1000, 1000, False), ("bf16", False, 128, 1000, 1000, False),
            ("fp16", False, 64, 600, 1000, False), ("fp16", True, 128, 600, 1000, False),  # Tq < Tk
            ("bf16", True, 72, 1000, 1000, False),  # an odd head dim (padded to 128 inside)
            ("bf16", True, 64, 1000, 1000, True)],  # packed documents
        seqlens=[1024, 4096, 16384], head_dims=[64, 128], tokens=16384, width=2048,  # B * T and H * D
        decode_lens=[1024, 4096, 16384, 32768], decode_batches=[1, 8], decode_dims=[64],  # B*H 32 and 256
        warmup=10, rep=40,  # do_bench's milliseconds: a few dozen calls of the shortest kernels
        presets=dict(lm="paper", diffusion="paper"), batch_size=0, vocab_size=CogformerConfig.vocab_size,
        compile=True, warmup_steps=3, steps=20, warm_workers=12),
    # the dry run: the same steps at sizes the interpreter runs in seconds; fp32 for bf16 (the interpreter computes
    # bf16 dots wrongly), the demo models uncompiled, CPU wall-clock times
    "cpu": dict(
        dtype="fp32", train_shape=(1, 2, 32, 16), check_batch=(1, 2),
        checks=[("fp32", True, 24, 20, 40, False), ("fp16", False, 16, 40, 40, True)],
        seqlens=[32], head_dims=[16], tokens=32, width=32, decode_lens=[32], decode_batches=[1, 2], decode_dims=[16],
        warmup=1, rep=1, presets=dict(lm="demo", diffusion="demo"), batch_size=2, vocab_size=256,
        compile=False, warmup_steps=1, steps=2, warm_workers=2),
}
KERNEL_IMPLS = ["cog", "compact", "flex", "sdpa", "flex_softmax", "reference"]  # the kernel table's columns
DECODE_REPORT_IMPLS = ["cog", "compact", "reference", "sdpa"]  # the chooser's backends, and SDPA as the yardstick
CHECK_IMPLS = ["cog", "compact", "flex", "reference"]  # the backends the correctness step checks
WARM_IMPLS = ["cog", "compact", "flex", "flex_softmax"]  # those with something to compile (SDPA and the reference: no)
LABELS = {"cog": "tuned", "flex": "flex Cog", "flex_softmax": "flex softmax", "sdpa": "SDPA flash"}
REFRESH_S = 10  # how often the report is rewritten while a step runs

_step = dict(path=None, deadline=math.inf, meta={})  # in a step's process: its file, its soft deadline, what it records


def report_args(args, device):
    """The command line's args with the report's sizes for device (REPORT_SIZES) and the report's table layout: the
    training shapes first, so that a step cut short keeps what matters most."""
    return argparse.Namespace(**{**vars(args), **REPORT_SIZES[device], "device": device, "modes": ["fwd_bwd", "fwd"],
                                 "masks": ["causal", "full"], "deterministic": False, "doc_len": 0})


def save(results):
    """The running step's results so far, to the file the report reads: a step killed later keeps them."""
    if _step["path"]:
        write_json(_step["path"], dict(_step["meta"], results=results))


def out_of_time():
    """Whether the running step should start no more work: it is near its time limit."""
    return time.perf_counter() > _step["deadline"]


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(plain(data), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)  # whole or not at all, for a reader at any moment


def plain(x):
    """x as JSON holds it: NaN and infinities (an error can be NaN) as text, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


# --- what a step's process records besides its results: its warnings, and Triton's compiles

def record_warnings(seen):
    """Each distinct warning (the chooser's, of a backend skipped or a tile dropped, among them) into the list seen, as
    well as to stderr (the log)."""
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {str(message).strip().splitlines()[0] if str(message).strip() else ''}"[:300]
        if text not in seen and len(seen) < 30:
            seen.append(text)
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = record


def record_compiles(counts):
    """Count Triton's compiles in this process (and their seconds), and the kernels it loaded from its cache instead,
    through triton.knobs.compilation.listener (Triton 3.6 and newer). The interpreter compiles nothing."""
    knobs = getattr(cog_kernel.triton, "knobs", None)
    if knobs is None or not hasattr(knobs.compilation, "listener"):
        return

    def listen(*, times, cache_hit, **rest):
        if cache_hit:
            counts["cached"] += 1
        else:
            counts["compiled"] += 1
            counts["compile_s"] += times.total / 1e6  # (microseconds)

    knobs.compilation.listener = listen


def step_process(name, run, args, path, log, limit):
    """The body of a step's process: run(args, results), its status, error, warnings and Triton's compiles saved to
    path as it goes. Its stderr (warnings, tracebacks, CUDA's messages, a crash's stack) goes to the log."""
    os.setsid()  # a process group of its own: a kill at the time limit takes whatever it started too
    os.dup2(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT), 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # (whatever sys.stderr was, e.g. pytest's capture)
    faulthandler.enable()
    print(f"\n=== {time.strftime('%H:%M:%S')} step {name} ===", file=sys.stderr, flush=True)
    if args.device != "cuda":
        torch.set_num_threads(1)  # the dry run's tiny work: spinning threads on a busy CPU slow it many times over
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # (the dry run's way)
    meta = _step["meta"] = dict(warnings=[], triton=dict(compiled=0, compile_s=0.0, cached=0))
    _step.update(path=path, deadline=time.perf_counter() + limit - min(15.0, max(1.0, limit / 10)))  # to finish a row
    record_warnings(meta["warnings"])
    record_compiles(meta["triton"])
    results = {}
    try:
        run(args, results)
        meta["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 (whatever it is, the report says so and goes on)
        traceback.print_exc()
        meta.update(status="failed", error=one_line(error))
    save(results)
    sys.stderr.flush()


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # (not yet a group of its own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def read_progress(step, path):
    """What the step's process saved so far into step (the report's dict for it)."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        with open(path) as f:
            step.update(json.load(f))


def run_step(step, run, args, path, log, refresh):
    """Run one step in a forked process under its time limit: its results, status (ok, failed, timed out, crashed),
    error and seconds into step (the report's dict for it); refresh() every REFRESH_S seconds while it runs."""
    t0 = last = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the step's process, which never returns from here
        try:
            step_process(step["name"], run, args, path, log, step["limit_s"])
        finally:
            os._exit(0)
    step["status"], code = "running", None
    try:
        while code is None:
            time.sleep(0.1)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.perf_counter() - t0 > step["limit_s"]:
                kill_group(pid)
                os.waitpid(pid, 0)
                code = "timed out"
            elif time.perf_counter() - last > REFRESH_S:
                last = time.perf_counter()
                read_progress(step, path)
                step["seconds"] = last - t0
                refresh()
    finally:
        if code is None:  # Ctrl-C: the step goes with the report
            kill_group(pid)
            os.waitpid(pid, 0)
    step["seconds"] = time.perf_counter() - t0
    read_progress(step, path)
    if code == "timed out":
        step.update(status="timed out", error=f"killed at its time limit, {step['limit_s']} s (what it had saved is "
                                              "kept)")
    elif step["status"] == "running":  # it ended without saying how
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        step.update(status="crashed", error=f"its process {how}")


def report(args):
    """--report=FILE.md: REPORT_STEPS in order, each in a process of its own under its time limit; FILE.md and
    FILE.json rewritten after each; the steps' stderr, tracebacks among it, in FILE.log."""
    paths = report_paths(args.report)
    args = report_args(args, "cuda" if (cuda_in_a_child() if REPORT_GPU is None else REPORT_GPU) else "cpu")
    doc = dict(command=" ".join(["python bench.py", f"--report={args.report}", *args.trainer_args]),
               started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), dry_run=args.device != "cuda", seconds=0.0,
               json=os.path.basename(paths["json"]), log=os.path.basename(paths["log"]),
               steps=[dict(name=name, title=title, limit_s=limit, status="not run")
                      for name, title, _, _, limit in REPORT_STEPS])
    open(paths["log"], "w").close()
    t0 = time.perf_counter()
    progress = tempfile.mkdtemp(prefix="bench-report-")
    try:
        for i, (step, (name, title, run, _, limit)) in enumerate(zip(doc["steps"], REPORT_STEPS), 1):
            print(f"[{i}/{len(REPORT_STEPS)}] {title} (at most {limit} s)", flush=True)
            try:
                run_step(step, run, args, os.path.join(progress, name + ".json"), paths["log"],
                         lambda: write_report(doc, paths, t0))
            except KeyboardInterrupt:
                step["status"] = "interrupted"
                raise
            finally:
                write_report(doc, paths, t0)
            print(f"      {step['status']} in {step['seconds']:.0f} s" + (f": {step['error']}" if step.get("error")
                                                                          else ""), flush=True)
    finally:
        shutil.rmtree(progress, ignore_errors=True)
    print(f"report: {paths['md']}, the same figures in {paths['json']}, the steps' stderr in {paths['log']}")


def report_paths(path):
    """FILE.md, FILE.json and FILE.log for --report=FILE.md; where one of them is there already, those of FILE-2.md,
    FILE-3.md, ...: a new report never replaces an earlier one."""
    root, ext = os.path.splitext(path)
    base, n = root, 1
    while any(os.path.exists(base + e) for e in (ext, ".json", ".log")):
        n += 1
        base = f"{root}-{n}"
    return dict(md=base + ext, json=base + ".json", log=base + ".log")


def write_report(doc, paths, t0):
    doc["seconds"] = time.perf_counter() - t0
    write_json(paths["json"], doc)
    with open(paths["md"] + ".tmp", "w") as f:
        f.write(render_report(doc))
    os.replace(paths["md"] + ".tmp", paths["md"])


def render_report(doc):
    """The Markdown report of doc, the dict FILE.json holds: a summary of the steps, then each step's section."""
    env = doc["steps"][0].get("results") or {}
    lines = [f"# nanoCog on {env.get('gpu') or ('the CPU: a dry run' if doc['dry_run'] else 'a GPU')}", "",
             f"`{doc['command']}`, started {doc['started']}, {doc['seconds']:.0f} s. The same figures: "
             f"`{doc['json']}`; the steps' stderr (tracebacks, warnings): `{doc['log']}`."]
    if doc["dry_run"]:
        lines += ["", "**Dry run.** No GPU here: the steps ran end to end on the CPU at tiny sizes (Triton's "
                  "interpreter, fp32 in place of bf16, the demo models uncompiled, wall-clock timings), to check the "
                  "command itself. No figure below measures a GPU."]
    lines += ["", "| step | result | seconds (limit) | first calls, s | Triton: kernels compiled (s), loaded |",
              "|---|---|---|---|---|"]
    for i, step in enumerate(doc["steps"], 1):
        first, triton_ = (step.get("results") or {}).get("first_call_s"), step.get("triton")
        compiles = f"{triton_['compiled']} ({triton_['compile_s']:.1f}), {triton_['cached']}" if triton_ else "-"
        lines.append(f"| {i}. {step['title']} | {step['status']} | {step.get('seconds', 0):.0f} ({step['limit_s']}) | "
                     f"{'-' if first is None else f'{first:.1f}'} | {compiles} |")
    lines += ["", "*First calls*: the seconds the step's first call of each thing took beyond a later call's: "
              "compiling, autotuning, the chooser's first-use checks, loading from the caches."]
    for i, (step, (_, _, _, render, _)) in enumerate(zip(doc["steps"], REPORT_STEPS), 1):
        lines += ["", f"## {i}. {step['title']}", ""]
        if step.get("error"):
            lines += [f"**{step['status']}**: {step['error']} (stderr and traceback: `{doc['log']}`)", ""]
        if step["status"] == "not run":
            lines.append("Not run yet.")
            continue
        try:
            lines += render(step.get("results") or {})
        except Exception as error:  # noqa: BLE001 (a report with a hole beats no report)
            lines.append(f"(could not show these results: {one_line(error)}; `{doc['json']}` has them)")
        if step.get("warnings"):
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in step["warnings"]]
    return "\n".join(lines) + "\n"


def label(impl):
    return LABELS.get(impl, impl)


def duration(x):
    return "-" if x is None else f"{x:.2f} s" if x < 10 else f"{x:.0f} s"


# --- 1. the environment

def report_environment(args, results):
    """The GPU and the versions; which backend cog_attention picks for a training shape, and what its first use costs
    there: the first forward + backward (first-use check, compiling, autotuning), the check alone once compiled, and a
    later call."""
    import triton
    import cog_attention as chooser

    results.update(device=args.device, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   python=platform.python_version(), caches=cache_entries(),
                   decode_max_heads=DECODE_REFERENCE_MAX_HEADS)
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        smem = getattr(p, "shared_memory_per_block_optin", 0)
        results.update(gpu=p.name, memory_gib=p.total_memory / 2**30, sm_count=p.multi_processor_count,
                       capability=f"sm_{p.major}{p.minor}", shared_kb=smem / 1024,
                       tiles={f"{kind} D {D}": cog_kernel_tuned.candidate_tiles(kind, D, 2, smem)
                              for kind in ("fwd", "bwd", "dkdv", "dq") for D in args.head_dims})
    else:
        results.update(gpu=None, cpu=platform.machine(), threads=torch.get_num_threads())
    B, H, T, D = args.train_shape
    dtype = DTYPES[args.dtype]
    results["shape"] = dict(B=B, H=H, T=T, D=D, dtype=args.dtype, causal=True)
    save(results)
    q, k, v, do = (torch.randn(B, H, T, D, device=args.device, dtype=dtype, requires_grad=i < 3) for i in range(4))
    t0 = time.perf_counter()
    o = cog_attention(q, k, v, causal=True)  # the choice, its checks, compiling and autotuning the forward
    synchronize(args.device)
    results["first_forward_s"] = time.perf_counter() - t0
    config = chooser._config(q, True, None, False)  # what the chooser's verdicts are keyed on
    verdicts = {name: chooser._verdicts.get((name, config)) for name in chooser.BACKENDS}
    results["verdicts"] = {name: "not tried" if v is None else "passed" if v[0] else v[1]
                           for name, v in verdicts.items()}
    results["backend"] = next(name for name in chooser._order(q, None) if (verdicts[name] or (False,))[0])
    save(results)
    t0 = time.perf_counter()
    torch.autograd.grad(o, (q, k, v), do)  # compiling and autotuning the backward
    synchronize(args.device)
    results["first_call_s"] = results["first_forward_s"] + time.perf_counter() - t0
    call = attention_call(lambda q, k, v, causal: cog_attention(q, k, v, causal=causal), "fwd_bwd", True, B, H, T, T,
                          D, dtype, args.device)
    results["later_ms"] = time_ms(call, args, args.device)
    save(results)
    t0 = time.perf_counter()  # the check again, its kernels compiled now (it clears the autotuner's choices: last)
    chooser._verify(results["backend"], config, q, True, D ** -0.5, False, None)
    synchronize(args.device)
    results["check_s"] = time.perf_counter() - t0


def cache_entries():
    """How many entries Triton's and Inductor's caches on disk hold (cold: none): {cache: count}."""
    dirs = dict(triton=os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache")))
    with contextlib.suppress(Exception):
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        dirs["inductor"] = cache_dir()
    return {name: len(os.listdir(d)) if os.path.isdir(d) else 0 for name, d in dirs.items()}


def render_environment(r):
    if r.get("gpu"):
        lines = [f"- GPU: **{r['gpu']}**, {r['memory_gib']:.1f} GiB, {r['sm_count']} SMs, {r['capability']}, "
                 f"{r['shared_kb']:.0f} KB of shared memory per block"]
    else:
        lines = [f"- No GPU: the CPU ({r.get('cpu')}), {r.get('threads')} threads"]
    lines.append(f"- torch {r.get('torch')}, Triton {r.get('triton')}, CUDA {r.get('cuda')}, Python {r.get('python')}")
    caches = r.get("caches") or {}
    lines.append("- Caches at the start (entries): " + ", ".join(f"{k} {v}" for k, v in caches.items())
                 + (" (cold)" if not any(caches.values()) else ""))
    s = r.get("shape")
    if s:
        lines.append(f"- `cog_attention` at a training shape, B={s['B']} H={s['H']} T={s['T']} D={s['D']} {s['dtype']} "
                     f"causal, forward + backward: picks **{r.get('backend', '?')}** ("
                     + "; ".join(f"{k}: {v}" for k, v in (r.get("verdicts") or {}).items()) + ")")
        lines.append(f"- Its first call: {duration(r.get('first_call_s'))}, of which the forward "
                     f"{duration(r.get('first_forward_s'))} (first-use check, compiling, autotuning); the check alone, "
                     "compiled: "
                     f"{duration(r.get('check_s'))}; a later call: "
                     + (f"{r['later_ms']:.2f} ms" if "later_ms" in r else "-"))
    for kind_d, tiles in (r.get("tiles") or {}).items():
        lines.append(f"- Autotuning candidates, {kind_d} (BLOCK_M, BLOCK_N, warps, stages): "
                     + ", ".join(str(tuple(t)) for t in tiles))
    lines.append(f"- The chooser's decode rule: the reference for Tq = 1 when B*H <= {r.get('decode_max_heads')}")
    return lines


# --- 2. compiling ahead

def warm_jobs(args):
    """The first calls of the steps after this one, as jobs for warm_job, the longest (the models) first:
    (kind, what)."""
    jobs = [("model", (model, attn)) for model in ("lm", "diffusion") for attn in ("cog", "softmax")]
    jobs += [("check", (tuple(check), impl)) for check in args.checks for impl in CHECK_IMPLS if impl in WARM_IMPLS]
    jobs += [("call", (impl, mode, mask == "causal", B, H, T, T, D))
             for mode, mask, D, T, B, H in kernel_shapes(args) for impl in WARM_IMPLS]
    jobs += [("call", (impl, "fwd", False, B, H, 1, Tk, D)) for D, Tk, B, H in decode_shapes(args, args.decode_dims)
             for impl in WARM_IMPLS if impl in DECODE_REPORT_IMPLS]
    return jobs


_worker_functions = {}  # attention_functions, made once per worker process


def warm_job(task):
    """Run one job of warm_jobs once, untimed (in a worker process): (kind, what, seconds, error or None, Triton's
    compile counts)."""
    args, (kind, what) = task
    counts = _step["meta"]["triton"]
    before, error, t0 = dict(counts), None, time.perf_counter()
    try:
        if not _worker_functions:
            _worker_functions.update(attention_functions(args, args.device))
        if kind == "model":
            with dry_models(args):
                training_step(model_args(args, what[0]), what[1], args.device).step()
        elif kind == "check":
            check_config(what[0], [what[1]], _worker_functions, args)
        else:
            impl, mode, causal, B, H, Tq, Tk, D = what
            attention_call(_worker_functions[impl], mode, causal, B, H, Tq, Tk, D, DTYPES[args.dtype], args.device)()
        synchronize(args.device)
    except Exception as e:  # noqa: BLE001 (a job that fails leaves its step to compile itself: it is only said)
        error = one_line(e)
    gc.collect()  # (a worker runs many jobs: a model's memory goes before the next one)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return kind, what, time.perf_counter() - t0, error, {k: counts[k] - before[k] for k in counts}


def warm_worker_start(device):
    if device == "cuda":  # a few compile processes of Inductor's per worker, not one per core each
        import torch._inductor.config
        torch._inductor.config.compile_threads = 2


def report_warmup(args, results):
    """Compile ahead: run every first call of the steps after this one (warm_jobs) once, in parallel worker processes,
    so that the steps load their kernels and graphs from Triton's and Inductor's caches on disk instead of compiling
    them one by one (autotuning, a timing, is left to the steps: the GPU is shared here). The dry run runs one job of
    each kind: the pool and the jobs' code, not every shape again."""
    jobs = warm_jobs(args)
    if args.device != "cuda":
        jobs = [next(job for job in jobs if job[0] == kind) for kind in ("model", "check", "call")]
    workers = min(len(jobs), args.warm_workers, os.cpu_count() or 1)
    results.update(jobs=len(jobs), workers=workers, done=0, failed=[], job_s=0.0)
    t0 = time.perf_counter()
    pool = multiprocessing.get_context("fork").Pool(workers, warm_worker_start, (args.device,))
    try:
        done = pool.imap_unordered(warm_job, [(args, job) for job in jobs])
        while results["done"] < len(jobs) and not out_of_time():  # (what is left at the limit, the steps compile)
            try:
                kind, what, job_s, error, counts = done.next(timeout=1)
            except multiprocessing.TimeoutError:
                continue
            results["done"] += 1
            results["job_s"] += job_s
            for key, value in counts.items():
                _step["meta"]["triton"][key] += value
            if error:
                results["failed"].append(f"{kind} {what}: {error}")
            results["first_call_s"] = time.perf_counter() - t0
            save(results)
    finally:
        pool.terminate()


def render_warmup(r):
    lines = [f"{r.get('done', 0)} of {r.get('jobs', '?')} jobs done in {r.get('workers', '?')} processes "
             f"({r.get('job_s', 0):.0f} s of work): each kernel, FlexAttention graph and model the later steps time, "
             "run once so that they load it from the caches instead of compiling it; the jobs not done by the time "
             "limit, the steps compile themselves. What was left shows in their first-calls column above."]
    if r.get("failed"):
        lines += ["", f"{len(r['failed'])} failed (the step that times it compiles it itself):", ""]
        lines += [f"- {text}" for text in r["failed"][:20]]
    return lines


# --- 3. correctness

def rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_config(check, impls, fns, args):
    """One configuration of the correctness step, check = (dtype, causal, D, Tq, Tk, documents): each implementation's
    output and gradients of q, k, v against the float64 reference of the same rounded inputs (relative L2 errors, within
    the chooser's tolerance for the dtype), as one row each."""
    from cog_attention import VERIFY_TOL
    from cog_kernel import cog_attention_reference_backward

    dtype_name, causal, D, Tq, Tk, docs = check
    dtype, (B, H) = DTYPES[dtype_name], args.check_batch
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(args.device, dtype) for T in (Tq, Tk, Tk, Tq))
    doc_ids = packed_documents(B, Tk, max(4, Tk // 5), args.device) if docs else None
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    want = (cog_attention_reference(q64, k64, v64, causal, doc_ids=doc_ids),
            *cog_attention_reference_backward(do64, q64, k64, v64, causal, doc_ids=doc_ids))
    rows = []
    for impl in impls:
        row = dict(dtype=dtype_name, causal=causal, D=D, Tq=Tq, Tk=Tk, docs=docs, impl=impl, tol=VERIFY_TOL[dtype])
        rows.append(row)
        if docs and impl.startswith("flex"):
            row.update(ok=None, error="n/a: the FlexAttention peer takes no document masks")
            continue
        grads = not (impl.startswith("flex") and args.device != "cuda")  # (FlexAttention has no backward on a CPU)
        try:
            q_, k_, v_ = (t.detach().requires_grad_(grads) for t in (q, k, v))
            t0 = time.perf_counter()
            o = fns[impl](q_, k_, v_, causal, **(dict(doc_ids=doc_ids) if docs else {}))
            got = (o, *torch.autograd.grad(o, (q_, k_, v_), do)) if grads else (o,)
            synchronize(args.device)
            row["seconds"] = time.perf_counter() - t0
            row["errors"] = {name: rel_l2(x, ref) for name, x, ref in zip(("output", "dq", "dk", "dv"), got, want)}
            row["ok"] = all(err < row["tol"] for err in row["errors"].values())  # (a NaN fails)
        except Exception as error:  # noqa: BLE001 (a failing backend is a result)
            row.update(ok=False, error=one_line(error))
    return rows


def report_correctness(args, results):
    """Each backend (tuned, compact, Cog through FlexAttention, the reference) against the float64 reference at the
    configurations of args.checks: bf16 and fp16, causal or not, head dims 64, 128 and an odd one, Tq < Tk, packed
    documents; the output and all three gradients."""
    fns = attention_functions(args, args.device)
    results.update(rows=[], not_run=[], first_call_s=0.0)
    for check in args.checks:
        if out_of_time():
            results["not_run"].append(list(check))
            continue
        rows = check_config(check, CHECK_IMPLS, fns, args)
        results["rows"] += rows
        results["first_call_s"] += sum(row.get("seconds", 0.0) for row in rows)
        save(results)


def render_correctness(r):
    rows = r.get("rows") or []
    judged = [row for row in rows if row.get("ok") is not None]
    lines = [f"{sum(1 for row in judged if row['ok'])} of {len(judged)} pass: relative L2 error against the float64 "
             "reference of the same rounded inputs, within the chooser's tolerance for the dtype "
             "(`cog_attention.VERIFY_TOL`).", "",
             "| dtype | causal | D | Tq | Tk | docs | backend | output | dq | dk | dv | tolerance | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        errors = row.get("errors") or {}
        cells = [f"{errors[name]:.1e}" if isinstance(errors.get(name), float) else str(errors.get(name, "-"))
                 for name in ("output", "dq", "dk", "dv")]
        if row.get("ok") is None:  # not judged: not applicable
            result = row.get("error", "-")
        else:
            result = "pass" if row["ok"] else "**FAIL**" + (f": {row['error']}" if row.get("error") else "")
        lines.append(f"| {row['dtype']} | {int(row['causal'])} | {row['D']} | {row['Tq']} | {row['Tk']} | "
                     f"{int(row['docs'])} | {label(row['impl'])} | " + " | ".join(cells)
                     + f" | {row['tol']:.0e} | {result.replace('|', '/')} |")
    if r.get("not_run"):
        lines += ["", f"Not run (out of time): {r['not_run']}"]
    return lines


# --- 4. kernel speed

def report_kernels(args, results):
    """The kernel table (kernel_row): T 1k, 4k, 16k; head dims 64 and 128; causal or not; forward + backward, then
    forward; each implementation's TFLOP/s, its speed against SDPA's, its peak memory; and the tiles autotuning
    chose."""
    fns = attention_functions(args, args.device)
    results.update(dtype=args.dtype, tokens=args.tokens, width=args.width, impls=KERNEL_IMPLS, rows=[], not_run=[],
                   first_call_s=0.0)
    failed = {}
    for shape in kernel_shapes(args):
        if out_of_time():
            results["not_run"].append(list(shape))
            continue
        row = kernel_row(shape, fns, KERNEL_IMPLS, DTYPES[args.dtype], args, args.device, failed)
        results["rows"].append(row)
        results["first_call_s"] += first_calls(row)
        results["autotuned"] = autotune_picks(results.get("autotuned", []))
        save(results)


def first_calls(row):
    """The seconds a row's first calls took beyond a later call's."""
    return sum(max(0.0, c["first_s"] - c["ms"] / 1e3) for c in row["cells"].values() if "first_s" in c)


def autotune_picks(picks):
    """picks, and the tile (BLOCK_M, BLOCK_N, warps, stages) autotuning chose for each tuned kernel at each key since:
    a list of {kernel, key, tile}. (Kept as they come: the chooser's check of a new configuration empties the
    autotuners' choices.)"""
    known = {(p["kernel"], tuple(p["key"])): p for p in picks}
    for kind, kernel in cog_kernel_tuned.kernels().items():
        for key, config in getattr(kernel, "cache", {}).items():  # key: HEAD_DIM, CAUSAL, LEN_Q, LEN_K, dtypes...
            key = tuple(str(x) for x in key[:4])
            known[(kind, key)] = dict(kernel=kind, key=list(key), tile=list(cog_kernel_tuned._shape(config)))
    return list(known.values())


def render_kernels(r):
    impls = r.get("impls") or KERNEL_IMPLS
    lines = [f"{r.get('dtype')}, B*T = {r.get('tokens')} tokens, H*D = {r.get('width')}. TFLOP/s as for softmax "
             "attention (4*B*H*T*T*D forward, halved when causal, x3.5 with the backward), and in brackets the speed "
             "against SDPA's (SDPA's time / this one's); MiB: the peak memory of one call beyond its inputs.", "",
             "| mode | mask | D | T | B x H | " + " | ".join(f"{label(i)} TFLOP/s (x SDPA)" for i in impls) + " | "
             + " | ".join(f"{label(i)} MiB" for i in impls) + " |", "|---" * (5 + 2 * len(impls)) + "|"]
    rows = r.get("rows") or []
    for row in rows:
        cells = [row["cells"].get(i, {}) for i in impls]
        speed = [(f"{c['tflops']:.1f}" + (f" ({c['vs_sdpa']:.2f})" if "vs_sdpa" in c else "")) if "tflops" in c
                 else short_error(c) if c else "-" for c in cells]
        memory = [mib(c["mib"]) if "mib" in c else short_error(c) if c else "-" for c in cells]
        lines.append(f"| {row['mode']} | {row['mask']} | {row['D']} | {row['T']} | {row['B']} x {row['H']} | "
                     + " | ".join(speed + memory) + " |")
    lines += render_errors(rows)
    if r.get("not_run"):
        lines += ["", "Not run (out of time): " + ", ".join(str(tuple(s[:4])) for s in r["not_run"])]
    picks = r.get("autotuned") or []
    lines += ["", "Tiles autotuning chose (BLOCK_M, BLOCK_N, warps, stages), by kernel and key "
              "(head dim, causal, Tq and Tk rounded up to powers of two):" if picks else
              "Autotuning chose no tile (one candidate each, or none ran).", ""]
    lines += [f"- {p['kernel']} {', '.join(p['key'])}: {tuple(p['tile'])}" for p in picks]
    return lines


def render_errors(rows):
    errors = cell_errors(rows)
    return (["", "Errors:", ""] + [f"- {label(impl)}: {error}" for impl, error in errors]) if errors else []


# --- 5. decode

def report_decode(args, results):
    """Decode steps (decode_row: Tq = 1 against Tk cached keys, B 1 and 8) through each backend the chooser has and
    SDPA (FlexAttention is in the kernel table: here it would compile a graph per row), and the rule for the chooser
    that the numbers imply (decode_rule)."""
    fns = attention_functions(args, args.device)
    impls = DECODE_REPORT_IMPLS
    results.update(dtype=args.dtype, width=args.width, impls=impls, rows=[], not_run=[], first_call_s=0.0)
    for shape in decode_shapes(args, args.decode_dims):
        if out_of_time():
            results["not_run"].append(list(shape))
            continue
        row = decode_row(shape, fns, impls, DTYPES[args.dtype], args, args.device)
        results["rows"].append(row)
        results["first_call_s"] += first_calls(row)
        results["bound"], results["rule"] = decode_rule(results["rows"])
        save(results)


def render_decode(r):
    impls = r.get("impls") or DECODE_REPORT_IMPLS
    lines = [f"{r.get('dtype')}, H*D = {r.get('width')}, one query against Tk cached keys, forward: microseconds per "
             "call (GB/s of keys and values read).", "",
             "| D | Tk | B x H | " + " | ".join(f"{label(i)} us (GB/s)" for i in impls) + " |",
             "|---" * (3 + len(impls)) + "|"]
    rows = r.get("rows") or []
    for row in rows:
        cells = [row["cells"].get(i, {}) for i in impls]
        lines.append(f"| {row['D']} | {row['Tk']} | {row['B']} x {row['H']} | " + " | ".join(
            f"{c['ms'] * 1e3:.0f} ({c['gbs']:.0f})" if "ms" in c else short_error(c) if c else "-" for c in cells)
            + " |")
    lines += render_errors(rows)
    if r.get("not_run"):
        lines += ["", f"Not run (out of time): {r['not_run']}"]
    lines += ["", f"**{r.get('rule', 'Decode rule: no rows.')}**"]
    return lines


# --- 6. models

@contextlib.contextmanager
def dry_models(args):
    """The dry run's models take the reference (COG_BACKEND): in Triton's interpreter their kernels take minutes."""
    saved = os.environ.get("COG_BACKEND")
    if args.device != "cuda":
        os.environ["COG_BACKEND"] = "reference"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COG_BACKEND", None)
        else:
            os.environ["COG_BACKEND"] = saved


def model_args(args, model):
    """The args of time_models and training_step for one of the report's models."""
    return argparse.Namespace(**{**vars(args), "model": model, "preset": args.presets[model]})


def report_models(args, results):
    """Cogformer vs Transformer at the paper's size and U-ViC vs U-ViT (U-ViT-S/2), compiled (time_models): the
    trainers' training steps, tokens or images per second, MFU, peak memory beside the memory estimate."""
    results.update(models=[], not_run=[], first_call_s=0.0)
    for model in ("lm", "diffusion"):
        if out_of_time():
            results["not_run"].append(model)
            continue
        with dry_models(args):
            run = time_models(model_args(args, model), args.device)
        results["models"].append(run)
        results["first_call_s"] += sum(row["first_s"] for row in run["rows"])
        save(results)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def render_models(r):
    lines = []
    for run in r.get("models") or []:
        title = "Cogformer vs Transformer" if run["model"] == "lm" else "U-ViC vs U-ViT"
        lines += [f"**{title}**: preset {run['preset']}, batch {run['batch']}, {run['dtype']}, compiled: "
                  f"{run['compile']}; {run['warmup_steps']} warm-up steps, then {run['steps']} timed steps each in "
                  f"rounds of {run['per_round']}, cog and softmax alternating ({run['where']}).", "",
                  f"| attn | ms/step (median round) | rounds min-max ms | {run['unit']}/s | MFU | peak MiB "
                  "(max_memory_allocated) | estimate MiB (memory.estimate_memory) |", "|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            lines.append(f"| {row['attn']} | {row['ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                         f"{row['per_s']:,.0f} | {percent(row['mfu'])} | {mib(row['peak_mib'])} | "
                         f"{mib(row['estimate_mib'])} |")
        lines += ["", f"cog/softmax speed: {run['speed']:.3f} (softmax's time per step / cog's).", ""]
    if r.get("not_run"):
        lines += ["", f"Not run (out of time): {', '.join(r['not_run'])}"]
    return lines


REPORT_STEPS = [  # (name, title, step, renderer, time limit in seconds on one GPU): the report, in order; 8 minutes
    ("environment", "Environment", report_environment, render_environment, 45),
    ("warmup", "Compile ahead", report_warmup, render_warmup, 75),
    ("correctness", "Correctness", report_correctness, render_correctness, 45),
    ("kernels", "Kernel speed", report_kernels, render_kernels, 150),
    ("decode", "Decode", report_decode, render_decode, 30),
    ("models", "Models", report_models, render_models, 135),
]


# -----------------------------------------------------------------------------
# sm_90 compile reports (no GPU)


def kernel_signature(jit, constants, dtype):
    """Triton's signature of one of our jit kernels, from its parameter names: tensors in dtype, fp32 statistics and
    scales, int32 document tables and sizes; constexprs (and pointers passed as None) as constants."""
    signature = {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr or constants.get(name, 0) is None:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA", "ACC_DQ"):
            signature[name] = "*fp32"
        elif name == "DOCS":
            signature[name] = "*i32"
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            signature[name] = "*" + dtype
        elif "scale" in name or "shift" in name:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(jit, constants, num_warps, num_stages, dtype, target):
    """triton.compile for target, a GPUTarget; num_stages None: the backend's default. Pointers and integer arguments
    are declared 16-divisible (contiguous tensors, lengths that are multiples of 16)."""
    import triton
    from triton.compiler import ASTSource

    signature = kernel_signature(jit, constants, dtype)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(jit.params)
             if signature[p.name] not in ("constexpr", "fp32")}
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(ASTSource(jit, signature, constexprs=constants, attrs=attrs), target=target, options=options)


def nvidia_tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_report(ptx, arch):
    """ptxas -v of PTX for sm_<arch>: (registers, spill bytes, its log)."""
    ptxas = next(path for path in (nvidia_tool(name) for name in ("ptxas-blackwell", "ptxas"))
                 if os.path.exists(path))  # Triton 3.9 writes PTX that only its Blackwell-era ptxas reads
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", os.path.join(d, "k.ptx"), "-o", os.devnull],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info))
    return int(regs.group(1)) if regs else None, spills, info


def compile_sm90(jit, constants, num_warps, num_stages, dtype):
    """Compile a jit function for sm_90a: (registers, spill bytes, shared KB, wgmma N widths, mma.sync count,
    serialized wgmma?, SASS instruction count of each loop body)."""
    from triton.backends.compiler import GPUTarget

    kernel = compile_kernel(jit, constants, num_warps, num_stages, dtype, GPUTarget("cuda", 90, 32))
    regs, spills, info = ptxas_report(kernel.asm["ptx"], "sm_90a")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True).stdout
    widths = sorted({int(n) for n in re.findall(r"instrShape = \[\d+, (\d+), \d+\]", kernel.asm["ttgir"])})
    return dict(regs=regs, spills=spills, shared_kb=kernel.metadata.shared / 1024,
                wgmma_n=widths, mma_sync=sass.count("HMMA"), serialized="C7515" in info, loops=loop_sizes(sass))


def loop_sizes(sass):
    """SASS instruction count of each loop: the span of each predicated backward branch. The unpredicated ones are
    returns from out-of-line slow paths, and 2-instruction loops are the TMA barrier's retry spins: both left out."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    sizes = []
    for addr, text in lines:
        m = re.match(r"@!?P\d+\s+BRA .*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            size = sum(1 for a, _ in lines if int(m.group(1), 16) <= a <= addr)
            if size > 4:
                sizes.append(size)
    return sizes


def steady_loop(kind, loops, docs=False):
    """The loop over blocks every row sees (no mask): the first, but the backward's last without document masks."""
    return loops[-1] if kind in ("bwd", "dkdv") and not docs else loops[0]


def sm90_report(args):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--sm90 compiles real kernels: run it without TRITON_INTERPRET=1")
    dtype = args.dtype
    itemsize = 2 if dtype in ("bf16", "fp16") else 4
    twin = softmax_twin()
    limit = 227 * 1024  # H100/H200 shared memory per block
    variant = ", document-masked kernels" if args.docs else ""
    print(f"# sm_90a compile report, {dtype}{variant}: every (kernel, head dim, causal, tile) that autotuning can pick")
    print("# tile = BLOCK_M,BLOCK_N,warps,stages; loops = SASS instructions per loop body (Cog | softmax twin); "
          "ratio = Cog / twin on the unmasked loop\n")
    print("| kernel | D | causal | tile | regs | spill B | smem KB (est.) | wgmma N | mma.sync | serialized | "
          "Cog loops | twin loops | ratio |")
    print("|---" * 13 + "|")
    labels = {"fwd": "_cog_fwd", "bwd": "_cog_bwd (one pass)", "dkdv": "_cog_bwd (two-pass dK, dV)",
              "dq": "_cog_bwd_dq"}
    for kind, label in labels.items():
        for D in args.head_dims:
            block_d = padded_head_dim(D)
            for causal in (False, True):
                for m, n, w, s in TILES[kind][block_d]:
                    est = shared_memory_bytes(kind, m, n, s, block_d, itemsize)
                    if est > limit:
                        continue
                    constants = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, BLOCK_M=m, BLOCK_N=n,
                                     DOC_MASK=args.docs)
                    if not args.docs:
                        constants["DOCS"] = None
                    if kind == "dkdv":
                        constants["ACC_DQ"] = None
                    cog = compile_sm90(jit_function(getattr(cog_kernel_tuned, KERNELS[kind])), constants, w, s, dtype)
                    plain = compile_sm90(twin.scope[KERNELS[kind]], constants, w, s, dtype)
                    ratio = steady_loop(kind, cog["loops"], args.docs) / steady_loop(kind, plain["loops"], args.docs)
                    print(f"| {label} | {D} | {int(causal)} | {m},{n},{w},{s} | {cog['regs']} | {cog['spills']} | "
                          f"{cog['shared_kb']:.0f} ({est / 1024:.0f}) | {','.join(map(str, cog['wgmma_n']))} | "
                          f"{cog['mma_sync']} | {'yes' if cog['serialized'] else 'no'} | "
                          f"{cog['loops']} | {plain['loops']} | {ratio:.3f} |", flush=True)


# -----------------------------------------------------------------------------
# the portability matrix: every kernel of both fused tiers, compiled for every target (no GPU)

# name: (Triton backend, architecture, shared memory per block in bytes), for the GPUs people train on
TARGETS = {
    "sm80": ("cuda", 80, 163 * 1024),  # A100
    "sm86": ("cuda", 86, 99 * 1024),  # RTX 3090, A10, A40
    "sm89": ("cuda", 89, 99 * 1024),  # RTX 4090, L4, L40S
    "sm90": ("cuda", 90, 227 * 1024),  # H100, H200
    "sm100": ("cuda", 100, 227 * 1024),  # B200
    "sm120": ("cuda", 120, 99 * 1024),  # RTX 5090
    "gfx942": ("hip", "gfx942", 64 * 1024),  # MI300X
}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
TUNED_KERNELS = {**KERNELS, "delta": "_cog_bwd_delta"}
DELTA_TILE = (64, None, 4, None)  # the tuned delta pre-pass: BLOCK_M = 64, default warps and stages


def tier_kernels(tier):
    """{kind: jit function} of a fused tier."""
    if tier == "tuned":
        return {kind: jit_function(getattr(cog_kernel_tuned, name)) for kind, name in TUNED_KERNELS.items()}
    return cog_kernel.compact_kernels()


def tier_tiles(tier, kind, D, dtype, shared_memory):
    """The tiles (BLOCK_M, BLOCK_N, warps, stages) the tier may run kind with on a GPU of this shared memory."""
    if tier == "compact":
        return cog_kernel.COMPACT_TILES[kind]
    if kind == "delta":
        return [DELTA_TILE]
    return cog_kernel_tuned.candidate_tiles(kind, D, ITEMSIZE[dtype], shared_memory)


def portability_jobs(args):
    """Every (target, tier, kind, dtype, D, causal, docs, tile) to compile; the delta pre-passes have no masks."""
    jobs = []
    for target in args.targets:
        for tier in args.tiers:
            kernels = tier_kernels(tier)
            for kind in kernels:
                if kind not in args.kernels:
                    continue
                masks = [(False, False)] if kind == "delta" else [(c, d) for c in (False, True) for d in (False, True)]
                for dtype in args.dtypes:
                    for D in args.head_dims:
                        for tile in tier_tiles(tier, kind, D, dtype, TARGETS[target][2]):
                            jobs += [(target, tier, kind, dtype, D, causal, docs, tile) for causal, docs in masks]
    return jobs


def compile_job(job):
    """Compile one job: a dict of the job and ok, regs, spills (ptxas's, or the AMD assembly's VGPR spills) or the
    error's first line."""
    from triton.backends.compiler import GPUTarget

    target, tier, kind, dtype, D, causal, docs, (m, n, warps, stages) = job
    backend, arch, _ = TARGETS[target]
    # the GPU's own choice of inline PTX (cog_kernel_tuned._check_gpu makes it at run time)
    cog_kernel_tuned.XORSIGN = tl.constexpr(cog_kernel_tuned.has_xorsign(backend, arch))
    constants = dict(HEAD_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_M=m)
    if kind != "delta":
        constants.update(BLOCK_N=n, CAUSAL=causal, DOC_MASK=docs)
        if not docs:
            constants["DOCS"] = None
        if tier == "tuned" and kind == "dkdv":
            constants["ACC_DQ"] = None
    result = dict(job=job, ok=False, regs=None, spills=None, error="")
    try:
        kernel = compile_kernel(tier_kernels(tier)[kind], constants, warps, stages, dtype,
                                GPUTarget(backend, arch, 32 if backend == "cuda" else 64))
        if backend == "cuda":
            ptx_arch = re.search(r"\.target\s+(\w+)", kernel.asm["ptx"]).group(1)
            result["regs"], result["spills"], _ = ptxas_report(kernel.asm["ptx"], ptx_arch)
        else:
            amdgcn = kernel.asm["amdgcn"]
            vgprs = re.search(r"\.vgpr_count:\s+(\d+)", amdgcn)
            result["regs"] = int(vgprs.group(1)) if vgprs else None
            result["spills"] = sum(int(x) for x in re.findall(r"\.[sv]gpr_spill_count:\s+(\d+)", amdgcn))
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 (a compile error is a result here, whatever its type)
        while e.__cause__ is not None:  # Triton's CompilationError shows the source line; its cause says why
            e = e.__cause__
        lines = [line.strip() for line in str(e).splitlines() if line.strip().strip("^")]
        result["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:200]
    return result


def _quiet_worker():  # Ctrl-C goes to the parent, which ends the pool
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def portability(args):
    """Compile every job in parallel worker processes; print the table and a summary; exit 1 if anything failed."""
    import triton

    from logs import progress

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--portability compiles real kernels: run it without TRITON_INTERPRET=1")
    jobs = portability_jobs(args)
    if not jobs:
        sys.exit("--portability: nothing to compile for these --targets, --kernels, --dtypes and --head_dims")
    workers = args.workers or os.cpu_count()
    t0 = time.perf_counter()
    print(f"compiling {len(jobs)} kernel variants in {workers} processes", file=sys.stderr, flush=True)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_quiet_worker)
    try:
        results = list(progress(pool.imap(compile_job, jobs, chunksize=4), total=len(jobs), desc="compiling"))
        pool.close()
    finally:  # on Ctrl-C too: no compile outlives the run
        pool.terminate()
    seconds = time.perf_counter() - t0
    print(f"# Triton {triton.__version__}, torch {torch.__version__}: {len(jobs)} compiles, {workers} workers, "
          f"{seconds:.0f} s; tile = BLOCK_M,BLOCK_N,warps,stages (- = unused or the backend's default); "
          f"regs = registers per thread (VGPRs on AMD)\n")
    print("| target | tier | kernel | dtype | D | causal | docs | tile | result | regs | spill B |")
    print("|---" * 11 + "|")
    for r in results:
        target, tier, kind, dtype, D, causal, docs, tile = r["job"]
        tile_text = ",".join("-" if x is None else str(x) for x in tile)
        print(f"| {target} | {tier} | {kind} | {dtype} | {D} | {int(causal)} | {int(docs)} | {tile_text} | "
              f"{'compiles' if r['ok'] else r['error'].replace('|', '/')} | {r['regs'] if r['regs'] is not None else '-'} | "
              f"{r['spills'] if r['spills'] is not None else '-'} |")
    failed = [r for r in results if not r["ok"]]
    spilled = [r for r in results if r["spills"]]
    print(f"\n{len(results) - len(failed)} of {len(results)} compile, {len(failed)} fail, {len(spilled)} spill "
          f"registers ({', '.join(args.targets)}; {', '.join(args.dtypes)}; head dims "
          f"{', '.join(map(str, args.head_dims))})")
    if failed:
        sys.exit(1)


def jit_function(kernel):  # an autotuned kernel's jit function
    return kernel.fn if type(kernel).__name__ == "Autotuner" else kernel


def main(argv=None):
    args = parse_args(argv)
    if args.head_dims is None:  # the portability matrix also compiles an odd head dim (padded to 128)
        args.head_dims = [64, 128, 72] if args.portability else [64, 128]
    if args.doc_len and "cog_docs" not in args.impls:
        args.impls.append("cog_docs")
    if args.report:
        report(args)
    elif args.model:
        model_timings(args)
    elif args.portability:
        portability(args)
    else:
        sm90_report(args) if args.sm90 else timings(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # one line, not a traceback; the rows printed so far are complete
        print("\nbench.py: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)

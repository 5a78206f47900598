"""
Attention benchmark on a GPU: the fused Cog kernel against PyTorch's softmax attention (flash backend) and the naive
Cog reference, forward and forward+backward, at a fixed number of tokens per batch (B * T).

    python bench.py                                  # the full table (T = 512 ... 16384, head dims 64 and 128)
    python bench.py --seqlens=1024,4096 --head_dims=64 --modes=fwd_bwd --masks=causal    # a quick run

TFLOP/s count FLOPs as for softmax attention: 4 * B * H * Tq * Tk * D for the forward (its two matmuls), halved when
causal, and 3.5 times that for forward + backward. "MiB" is the peak memory allocated during one call beyond the inputs
(torch.cuda.max_memory_allocated). The reference materialises (B, H, T, T) weights; where that runs out of memory the
table says OOM.
"""

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from cog_kernel import cog_attention_reference, cog_attention_triton

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flash_only = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
except ImportError:
    flash_only = contextlib.nullcontext
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def sdpa_softmax(q, k, v, causal=False):
    with flash_only():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


IMPLS = {"cog": cog_attention_triton, "sdpa": sdpa_softmax, "reference": cog_attention_reference}


def int_list(s):
    return [int(x) for x in s.split(",")]


def str_list(choices):
    def parse(s):
        items = s.split(",")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}, choose from {','.join(choices)}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int_list, default=[512, 1024, 2048, 4096, 8192, 16384], help="comma-separated T")
    p.add_argument("--head_dims", type=int_list, default=[64, 128], help="comma-separated D")
    p.add_argument("--modes", type=str_list(["fwd", "fwd_bwd"]), default=["fwd", "fwd_bwd"], help="fwd,fwd_bwd")
    p.add_argument("--masks", type=str_list(["full", "causal"]), default=["full", "causal"], help="full,causal")
    p.add_argument("--impls", type=str_list(list(IMPLS)), default=list(IMPLS), help="cog,sdpa,reference")
    p.add_argument("--tokens", type=int, default=16384, help="B * T (B = tokens // T, at least 1)")
    p.add_argument("--width", type=int, default=2048, help="H * D (H = width // D)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="warmup time in ms for triton.testing.do_bench")
    p.add_argument("--rep", type=int, default=100, help="measurement time in ms for triton.testing.do_bench")
    return p.parse_args(argv)


def measure(impl, mode, causal, B, H, T, D, dtype, args):
    """(milliseconds, MiB) of one call, or None where it ran out of memory."""
    import triton.testing

    fn = IMPLS[impl]
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
    q.requires_grad_(mode == "fwd_bwd")
    k.requires_grad_(mode == "fwd_bwd")
    v.requires_grad_(mode == "fwd_bwd")

    def call():
        o = fn(q, k, v, causal=causal)
        if mode == "fwd_bwd":
            torch.autograd.grad(o, (q, k, v), do)

    try:
        ms = triton.testing.do_bench(call, warmup=args.warmup, rep=args.rep)  # the first call autotunes the kernel
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20
    except OOM:
        return None
    finally:
        del q, k, v, do
        torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (none found); nothing was measured")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, B*T = {args.tokens}, "
          f"H*D = {args.width}\n")
    print("| mode | mask | D | T | B x H | " + " | ".join(f"{i} TFLOP/s" for i in args.impls) + " | "
          + " | ".join(f"{i} MiB" for i in args.impls) + " |")
    print("|---" * (5 + 2 * len(args.impls)) + "|")
    out_of_memory = set()  # (impl, mode, mask, D): once it ran out of memory, longer T will too
    for mode in args.modes:
        for mask in args.masks:
            for D in args.head_dims:
                for T in args.seqlens:
                    B, H = max(1, args.tokens // T), max(1, args.width // D)
                    flops = 4 * B * H * T * T * D * (0.5 if mask == "causal" else 1.0) * (3.5 if mode == "fwd_bwd" else 1.0)
                    speed, mem = [], []
                    for impl in args.impls:
                        r = None if (impl, mode, mask, D) in out_of_memory else \
                            measure(impl, mode, mask == "causal", B, H, T, D, dtype, args)
                        if r is None:
                            out_of_memory.add((impl, mode, mask, D))
                            speed.append("OOM")
                            mem.append("OOM")
                        else:
                            speed.append(f"{flops / (r[0] * 1e-3) / 1e12:.1f}")
                            mem.append(f"{r[1]:.0f}")
                    print(f"| {mode} | {mask} | {D} | {T} | {B} x {H} | " + " | ".join(speed + mem) + " |", flush=True)


if __name__ == "__main__":
    main()

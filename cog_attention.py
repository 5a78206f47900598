"""
cog_attention(q, k, v, causal=False, scale=None, deterministic=None, doc_ids=None, backend=None): Cog attention for the
models, w = sign(s) * softmax(|s|) (the definition and the contract are at the top of cog_kernel.py), run through one
of three backends:

    "tuned"      cog_kernel_tuned.py: the fused Triton kernel with its speed tricks
    "compact"    cog_kernel.py: the fused Triton kernel written to be read
    "reference"  cog_kernel.py: the definition in plain PyTorch, materialising the (Tq, Tk) weights

By default (backend=None and COG_BACKEND unset or "auto") the first of those that applies to the inputs and passes its
first-use check runs; a backend named by the backend argument or COG_BACKEND runs alone, or raises.

Why the choice is made inside a custom op (nanocog::cog_attention), at run time, and not in Python before it:
torch.compile traces over the op as one opaque call, so a backend that fails after compilation is skipped when the
graph runs, with no recompile and no graph break. The op also returns which backend ran, as a tensor that autograd
saves, so the backward op runs the same backend as its forward (a fused backward recomputes the weights from its own
forward's lse; the reference's forward makes none).
"""

import math
import os
import warnings
from typing import Optional

import torch

import cog_kernel
import cog_kernel_tuned
from cog_kernel import (MAX_HEAD_DIM, check_attention_inputs, cog_attention_reference, cog_attention_reference_backward,
                        compact_backward, compact_forward)

# cog_attention runs the first backend of BACKENDS that applies to the inputs and passes its first-use check (or only
# the one named by its backend argument or COG_BACKEND). The check runs once per configuration (device, dtype, head dim,
# causal, document masks, deterministic) and process; a backend that fails it, or fails later, is skipped with one
# warning; one asked for by name raises. docs/kernel.md says more.

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
    if name == "tuned" and q.size(2) * q.size(-1) >= 2**31:  # (the compact kernel's offsets are 64-bit)
        return f"{q.size(2)} queries of head dim {q.size(-1)} overflow the tuned kernel's 32-bit offsets"
    if q.is_cuda:
        return None
    if q.device.type != "cpu" or not (cog_kernel._INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"tensors on {q.device} need CUDA, or Triton's interpreter (TRITON_INTERPRET=1 before importing triton)"
    return "Triton's interpreter computes bfloat16 dots wrongly" if q.dtype == torch.bfloat16 else None


def _reference_forward(q, k, v, causal, scale, doc_ids, tile):  # (cog_attention has checked the inputs)
    o = cog_attention_reference(q, k, v, causal, scale, doc_ids, check=False)
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


# forward(q, k, v, causal, scale, doc_ids, tile) -> o, lse; backward(do, q, k, v, o, lse, causal, scale, deterministic,
# doc_ids, tile) -> dq, dk, dv (the reference's backward is cog_attention_reference_backward)
_FORWARD = dict(tuned=cog_kernel_tuned.forward, compact=compact_forward, reference=_reference_forward)
_BACKWARD = dict(tuned=cog_kernel_tuned.backward, compact=compact_backward)


def _check(name, tile, q, causal, scale, deterministic, doc_ids, judged=("output", "dq", "dk", "dv")):
    """Raise unless backend `name` (with `tile`) gives the reference's output and gradients (those named in judged) on
    small random problems in q's configuration: a few tiles long and ragged (Tq < Tk, neither a multiple of a tile),
    and on a GPU also with lengths that are multiples of 16, as a training run's are (Triton compiles a kernel apart
    for integer arguments divisible by 16, so the ragged problem alone would not check the code that trains)."""
    lengths = [(257, 263), (256, 256)] if q.is_cuda else [(65, 71)]
    g = torch.Generator().manual_seed(0)
    for Tq, Tk in lengths:
        q_, k_, v_, do_ = (torch.randn(1, 2, T, q.size(-1), generator=g).to(q.device, q.dtype)
                           for T in (Tq, Tk, Tk, Tq))
        docs = None if doc_ids is None else (torch.arange(Tk, device=q.device) * 3 // Tk)[None].to(doc_ids.dtype)
        o, lse = _FORWARD[name](q_, k_, v_, causal, scale, docs, tile)
        grads = judged != ("output",)
        got = (o, *(_BACKWARD[name](do_, q_, k_, v_, o, lse, causal, scale, deterministic, docs, tile)
                    if grads else ()))
        q64, k64, v64, do64 = (t.double() for t in (q_, k_, v_, do_))
        want = (cog_attention_reference(q64, k64, v64, causal, scale, docs, check=False),
                *(cog_attention_reference_backward(do64, q64, k64, v64, causal, scale, docs) if grads else ()))
        for label, x, ref in zip(("output", "dq", "dk", "dv"), got, want):
            if label not in judged:
                continue
            err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            if not err < VERIFY_TOL[q.dtype]:  # (a NaN fails too)
                raise RuntimeError(f"wrong numbers: {label} is off by {err:.1e} (relative L2) from the reference at "
                                   f"Tq={Tq}, Tk={Tk}")


def _one_line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def _verify(name, config, q, causal, scale, deterministic, doc_ids):
    """(True, the tile to run) or (False, why not): the compact tier runs its first tile set that passes _check; the
    tuned tier checks each of its kernels' tiles and autotunes over those that pass (cog_kernel_tuned.check_tiles).
    Warns of the tiles dropped."""
    if name == "reference":
        return True, None
    problem = ("Triton is not installed" if cog_kernel.triton is None else
               cog_kernel_tuned.kernel_problem() if name == "tuned" else None)
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
        tile, (ok, failures) = None, cog_kernel_tuned.check_tiles(why_wrong, q, causal, deterministic,
                                                                  doc_ids is not None)
    else:
        ok, failures = False, []
        for tile in cog_kernel.compact_tile_sets():
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
    if name != "reference":
        ok, tile = _verdicts.get((name, config), (False, "its first-use verdict is gone"))
        if ok:
            try:
                grads = _BACKWARD[name](do, q, k, v, o, lse, causal, scale, deterministic, doc_ids, tile)
                return tuple(g.contiguous() for g in grads)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # it passed its check, but fails at this shape
                _give_up(name, config, _one_line(error), named, ["reference"], q, k)
        elif named:  # skipped since its forward ran (auto has warned): asked for by name, raise as the forward does
            _give_up(name, config, tile, named, ["reference"], q, k)
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
    # the reference alone needs no custom op: as plain PyTorch ops, autograd and torch.compile see through it
    if _order(q, named) == ["reference"] or scale == 0:  # (scale 0: every logit is 0, so every weight is 0)
        return cog_attention_reference(q, k, v, causal, scale, doc_ids, check=False)
    return _attention(q, k, v, bool(causal), scale, deterministic, doc_ids, named or "")[0]

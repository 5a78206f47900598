"""
Tests of bench.py's portability matrix, FlexAttention peer and Ctrl-C handling. Compiles run in a subprocess without
TRITON_INTERPRET (conftest.py turns Triton's interpreter on for this process, and jit functions made under it cannot be
compiled for a GPU).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import cog_kernel_tuned

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder


def compile_jobs(jobs):
    """bench.compile_job for each job, in a fresh Python without the interpreter: the list of results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys, bench\n"
            "jobs = [tuple(j[:7]) + (tuple(j[7]),) for j in json.loads(sys.argv[1])]\n"
            "print(json.dumps([bench.compile_job(j) for j in jobs]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_portability_subset_compiles():
    """The A100's bf16 forward (XORSIGN off: Triton 3.5-3.8 once gave its dot an fp32 operand there), a consumer GPU's
    fp16 backward and an MI300X's fp16 forward (no inline PTX), each with a tile autotuning may pick there."""
    jobs = []
    for target, kind, dtype, causal in [("sm80", "fwd", "bf16", True), ("sm86", "bwd", "fp16", False),
                                        ("gfx942", "fwd", "fp16", True)]:
        tile = cog_kernel_tuned.candidate_tiles(kind, 64, 2, bench.TARGETS[target][2])[0]
        jobs.append((target, "tuned", kind, dtype, 64, causal, False, tile))
    results = compile_jobs(jobs)
    for r in results:
        assert r["ok"], (r["job"], r["error"])
        assert r["regs"] and r["regs"] > 0 and r["spills"] is not None


def test_xorsign_only_on_nvidia_sm86_and_newer(monkeypatch):
    """No PTX for A100s and for AMD GPUs, which ROCm reports as a CUDA capability (9, 4) on an MI300X."""
    assert not cog_kernel_tuned.has_xorsign("cuda", 80) and cog_kernel_tuned.has_xorsign("cuda", 86)
    assert not cog_kernel_tuned.has_xorsign("hip", "gfx942")
    monkeypatch.setattr(cog_kernel_tuned.triton, "set_allocator", lambda allocator: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    for hip, xorsign in ((None, True), ("6.4", False)):
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(cog_kernel_tuned, "XORSIGN", cog_kernel_tuned.tl.constexpr(True))
        cog_kernel_tuned._check_gpu.__wrapped__("cuda:0")
        assert cog_kernel_tuned.XORSIGN.value == xorsign


def test_candidate_tiles_fit_each_target():
    """Every tile the matrix compiles for a target fits its shared memory, or is the fallback tile."""
    for target, (_, _, shared) in bench.TARGETS.items():
        for kind in ("fwd", "bwd", "dkdv", "dq"):
            for D in (64, 72, 128):
                for tile in cog_kernel_tuned.candidate_tiles(kind, D, 2, shared):
                    need = cog_kernel_tuned.shared_memory_bytes(kind, tile[0], tile[1], tile[3], 128 if D > 64 else 64, 2)
                    assert need <= shared or tile == cog_kernel_tuned.FALLBACK_TILE


def test_portability_jobs_narrow_and_take_both_tiers():
    """--targets/--dtypes/--head_dims/--kernels/--tiers narrow the matrix; both tiers are in it by default, each with
    every tile it may run: the tuned tier's candidate_tiles for the target's shared memory, the compact's COMPACT_TILES."""
    args = bench.parse_args(["--portability", "--targets=sm80", "--dtypes=fp16", "--head_dims=64", "--kernels=fwd"])
    jobs = bench.portability_jobs(args)
    assert {j[:5] for j in jobs} == {("sm80", tier, "fwd", "fp16", 64) for tier in ("tuned", "compact")}
    tuned = [j for j in jobs if j[1] == "tuned"]
    assert len(tuned) == 4 * len(cog_kernel_tuned.candidate_tiles("fwd", 64, 2, 163 * 1024))  # causal x docs
    compact = [j for j in jobs if j[1] == "compact"]
    assert [j[7] for j in compact] == [tile for tile in bench.cog_kernel.COMPACT_TILES["fwd"] for _ in range(4)]
    args = bench.parse_args(["--portability", "--targets=sm80", "--dtypes=fp16", "--head_dims=64", "--tiers=compact"])
    assert {j[1] for j in bench.portability_jobs(args)} == {"compact"}  # --tiers narrows too


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_peer_matches_the_reference():
    """Cog attention through two FlexAttention calls equals the definition, causal or not, with Tq < Tk, and where a
    row has no negative logit (or no positive one: there one call's lse is -inf)."""
    from cog_kernel import cog_attention_reference
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (24, 40, 40))
    k[0, 0] = k[0, 0].abs()
    q[0, 0, :4] = q[0, 0, :4].abs()  # every logit of these rows is positive
    q[0, 0, 4:8] = -q[0, 0, 4:8].abs()  # every logit negative
    for causal in (False, True):
        for Tq in (24, 1):  # a decode row sees every key
            want = cog_attention_reference(q[:, :, -Tq:], k, v, causal=causal)
            got = bench.flex_cog_attention(q[:, :, -Tq:], k, v, causal=causal)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_peers_compile_to_one_graph():
    """What the GPU tables compile (attention_functions: compile_flex) traces as one graph, no graph break: Cog's two
    FlexAttention calls with their combination, and softmax's one call, causal or not. (aot_eager: the trace without
    Inductor, which on a CPU compiles C++ for minutes; the forward only: FlexAttention has no backward on a CPU.)"""
    from cog_kernel import cog_attention_reference
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (24, 40, 40))
    cog = torch.compile(bench.flex_cog_pair, backend="aot_eager", fullgraph=True, dynamic=False)
    softmax = torch.compile(bench.flex_softmax_call, backend="aot_eager", fullgraph=True, dynamic=False)
    for causal in (False, True):
        torch.testing.assert_close(bench.flex_cog_attention(q, k, v, causal, pair=cog),
                                   cog_attention_reference(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
        mask = torch.ones(24, 40, dtype=torch.bool).tril(40 - 24) if causal else None
        torch.testing.assert_close(bench.flex_cog_attention(q, k, v, causal, pair=softmax),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   atol=1e-5, rtol=1e-5)


def test_ctrl_c_ends_with_one_line():
    """SIGINT during a long --portability run ends it at once with a one-line message, not a traceback."""
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "bench.py", "--portability", "--workers=1", "--targets=sm90"], cwd=HERE,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    while "compiling" not in err:  # the progress bar is up: the worker pool runs
        err += proc.stderr.read(1)
        assert proc.poll() is None, err
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 130
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "bench.py: interrupted (Ctrl-C)"

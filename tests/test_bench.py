"""
Tests of bench.py's portability matrix, FlexAttention peers, Ctrl-C handling and the GPU report (its dry run, end to
end, and what it does when a step fails or overruns). Compiles run in a subprocess without TRITON_INTERPRET (conftest.py
turns Triton's interpreter on for this process, and jit functions made under it cannot be compiled for a GPU).
"""

import json
import os
import subprocess
import sys
import time

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
    while "compiling" not in err:  # the worker pool is starting
        err += proc.stderr.read(1)
        assert proc.poll() is None, err
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 130
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "bench.py: interrupted (Ctrl-C)"
    assert "%|" not in err  # not a terminal: plain progress lines, no progress bar


# --- the GPU report (python bench.py --report=FILE.md)

def test_report_dry_run(tmp_path):
    """Without a GPU, `bench.py --report` runs every step end to end at tiny sizes, as its own process would on a GPU:
    each step ends ok, and FILE.md and FILE.json are well-formed and say the same."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench.py sets it for the dry run
    env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run on a GPU machine too
    out = subprocess.run([sys.executable, "bench.py", f"--report={tmp_path / 'r.md'}"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    md, log = (tmp_path / "r.md").read_text(), (tmp_path / "r.log").read_text()
    steps = doc["steps"]
    assert [step["name"] for step in steps] == [name for name, *_ in bench.REPORT_STEPS]
    assert all(step["status"] == "ok" for step in steps), [(s["name"], s["status"], s.get("error")) for s in steps]
    assert doc["dry_run"] and "**Dry run.**" in md and "Traceback" not in log
    for i, step in enumerate(steps, 1):  # the summary table and the sections say what the JSON says
        assert f"| {i}. {step['title']} | ok | {step['seconds']:.0f} ({step['limit_s']}) |" in md
        assert f"\n## {i}. {step['title']}\n" in md
    env_, warm, checks, kernels, decode, models = (step["results"] for step in steps)
    assert env_["backend"] == "tuned" and env_["verdicts"]["tuned"] == "passed" and env_["check_s"] > 0
    assert "picks **tuned**" in md
    assert warm["done"] == warm["jobs"] == 3 and not warm["failed"]
    assert len(checks["rows"]) == len(bench.REPORT_SIZES["cpu"]["checks"]) * len(bench.CHECK_IMPLS)
    judged = [row for row in checks["rows"] if row["ok"] is not None]
    assert all(row["ok"] for row in judged) and len(judged) == len(checks["rows"]) - 1  # (flex: no document masks)
    assert f"{len(judged)} of {len(judged)} pass" in md
    for row in judged:
        assert f"| {bench.label(row['impl'])} | {row['errors']['output']:.1e} |" in md
    assert [(r["mode"], r["mask"]) for r in kernels["rows"]] == [("fwd_bwd", "causal"), ("fwd_bwd", "full"),
                                                               ("fwd", "causal"), ("fwd", "full")]
    for row in kernels["rows"]:
        cells = row["cells"]
        assert set(cells) == set(bench.KERNEL_IMPLS)
        assert all("tflops" in cells[impl] for impl in ("cog", "compact", "sdpa", "reference"))
        assert f"| {row['mode']} | {row['mask']} | {row['D']} | {row['T']} | {row['B']} x {row['H']} | " \
               f"{cells['cog']['tflops']:.1f} ({cells['cog']['vs_sdpa']:.2f}) |" in md
    assert len(decode["rows"]) == 2 and decode["rule"].startswith("Decode rule:") and decode["rule"] in md
    assert [run["model"] for run in models["models"]] == ["lm", "diffusion"]
    for run in models["models"]:
        assert [row["attn"] for row in run["rows"]] == ["cog", "softmax"]
        assert all(f"| {row['attn']} | {row['ms']:.1f} |" in md for row in run["rows"])


def fake_steps(monkeypatch, tmp_path, steps):
    """Run bench.report with steps (name, function, limit) in place of the report's; its JSON and Markdown."""
    render = lambda results: [f"rows: {results.get('rows')}"]  # noqa: E731
    monkeypatch.setattr(bench, "REPORT_STEPS", [(name, name.title(), fn, render, limit) for name, fn, limit in steps])
    t0 = time.perf_counter()
    bench.report(bench.parse_args([f"--report={tmp_path / 'r.md'}"]))
    return json.loads((tmp_path / "r.json").read_text()), (tmp_path / "r.md").read_text(), time.perf_counter() - t0


def test_report_goes_on_after_a_step_fails_overruns_or_crashes(monkeypatch, tmp_path):
    """A step that raises, one that runs past its time limit and one whose process dies are each reported (the error in
    one line, the traceback in the log, what it saved kept), and the next step still runs; a step that watches the
    clock (out_of_time) stops in time by itself."""
    def raises(args, results):
        results["rows"] = [1, 2]
        bench.save(results)
        raise RuntimeError("the kernel said no\nand more")

    def overruns(args, results):
        results["rows"] = [1]
        bench.save(results)
        time.sleep(60)

    def crashes(args, results):
        os._exit(3)

    def watches_the_clock(args, results):
        results["rows"] = []
        while not bench.out_of_time():
            results["rows"].append(len(results["rows"]))
            bench.save(results)
            time.sleep(0.1)

    def fine(args, results):
        results["rows"] = ["fine"]

    doc, md, seconds = fake_steps(monkeypatch, tmp_path, [("raises", raises, 30), ("overruns", overruns, 2),
                                                         ("crashes", crashes, 30), ("clock", watches_the_clock, 5),
                                                         ("fine", fine, 30)])
    raised, overran, crashed, clock, ok = doc["steps"]
    assert raised["status"] == "failed" and raised["error"] == "RuntimeError: the kernel said no"
    assert raised["results"] == {"rows": [1, 2]}
    assert "**failed**: RuntimeError: the kernel said no (stderr and traceback: `r.log`)" in md
    log = (tmp_path / "r.log").read_text()
    assert "Traceback" in log and "and more" in log and "step raises" in log
    assert overran["status"] == "timed out" and overran["results"] == {"rows": [1]} and 2 <= overran["seconds"] < 10
    assert "**timed out**: killed at its time limit, 2 s" in md
    assert crashed["status"] == "crashed" and "exited with code 3" in crashed["error"]
    assert clock["status"] == "ok" and clock["results"]["rows"] and clock["seconds"] < 5  # (stopped, not killed)
    assert ok["status"] == "ok" and ok["results"] == {"rows": ["fine"]} and "rows: ['fine']" in md
    assert seconds < 25


def test_decode_rule():
    """The bound the decode rows imply for DECODE_REFERENCE_MAX_HEADS: the largest B*H at which the reference wins at
    every Tk, where a fused kernel wins above it; none where B*H alone does not decide."""
    def row(B, H, Tk, ref, tuned, compact=None):
        cells = {"reference": {"ms": ref}, "cog": {"ms": tuned},
                 "compact": {"ms": compact} if compact else {"error": "x"}}
        return dict(B=B, H=H, Tk=Tk, D=64, cells=cells)

    bound, text = bench.decode_rule([row(1, 32, 1024, 1, 2), row(1, 32, 32768, 1, 2), row(8, 32, 1024, 2, 1, 3)])
    assert bound == 32 and "DECODE_REFERENCE_MAX_HEADS = 32 (any bound from 32 to 255 fits" in text
    bound, text = bench.decode_rule([row(1, 32, 1024, 2, 1), row(8, 32, 1024, 3, 1)])
    assert bound == 0 and "a fused kernel is fastest at every B*H" in text
    bound, text = bench.decode_rule([row(1, 32, 1024, 1, 2), row(1, 32, 32768, 2, 1)])
    assert bound is None and "no bound on B*H alone fits" in text and "tuned at Tk 32768" in text
    assert bench.decode_rule([])[0] is None


def test_autotune_picks_outlive_the_checks_that_clear_them(monkeypatch):
    """The kernel table lists every tile autotuning chose, though the chooser's check of each new configuration empties
    the autotuners' choices."""
    fwd, bwd = cog_kernel_tuned.kernels()["fwd"], cog_kernel_tuned.kernels()["bwd"]
    config = fwd.configs[0]
    monkeypatch.setattr(fwd, "cache", {(64, True, 1024, 1024, "torch.bfloat16"): config})
    monkeypatch.setattr(bwd, "cache", {})
    picks = bench.autotune_picks([])
    fwd.cache.clear()  # (as check_tiles does)
    bwd.cache[(128, False, 4096, 4096)] = config
    tile = list(cog_kernel_tuned._shape(config))
    assert bench.autotune_picks(picks) == [dict(kernel="fwd", key=["64", "True", "1024", "1024"], tile=tile),
                                           dict(kernel="bwd", key=["128", "False", "4096", "4096"], tile=tile)]


def test_report_plan_on_a_gpu():
    """What only a GPU runs, checked without one: the report's shapes on a GPU, its correctness configurations, the
    warm-up's jobs, and the steps' time limits (8 minutes in all)."""
    args = bench.report_args(bench.parse_args(["--report=r.md"]), "cuda")
    shapes = bench.kernel_shapes(args)
    assert len(shapes) == 2 * 2 * 2 * 3 and shapes[0] == ("fwd_bwd", "causal", 64, 1024, 16, 32)
    assert {(T, B * T, H * D) for _, _, D, T, B, H in shapes} == {(T, 16384, 2048) for T in (1024, 4096, 16384)}
    decode = bench.decode_shapes(args, args.decode_dims)
    assert {(Tk, B * H) for _, Tk, B, H in decode} == {(Tk, heads) for Tk in (1024, 4096, 16384, 32768)
                                                       for heads in (32, 256)}
    checks = args.checks
    assert {c[0] for c in checks} == {"bf16", "fp16"} and {c[1] for c in checks} == {True, False}
    assert {64, 128} < {c[2] for c in checks} and any(c[2] & (c[2] - 1) for c in checks)  # an odd head dim
    assert any(c[3] < c[4] for c in checks) and any(c[5] for c in checks)
    assert all(c[0] in bench.DTYPES and 1 <= c[2] <= 256 and c[3] <= c[4] for c in checks)
    jobs = bench.warm_jobs(args)
    assert [job[0] for job in jobs[:4]] == ["model"] * 4
    assert len(jobs) == 4 + len(checks) * 3 + len(shapes) * 4 + len(decode) * 2
    assert sum(limit for *_, limit in bench.REPORT_STEPS) <= 8 * 60
    trainer = bench.parse_args(["--report=r.md", "--n_layer=6", "--depth=4"])
    assert bench.trainer_args(bench.model_args(bench.report_args(trainer, "cuda"), "lm")) == ["--n_layer=6"]
    assert bench.trainer_args(bench.model_args(bench.report_args(trainer, "cuda"), "diffusion")) == ["--depth=4"]


def test_a_new_report_keeps_the_earlier_one(monkeypatch, tmp_path, capsys):
    """--report=FILE.md where a report is already: the new one goes to FILE-2.md (.json, .log), the old stays whole;
    a name that cannot be written is a one-line error before any step."""
    (tmp_path / "r.md").write_text("earlier")
    (tmp_path / "r.json").write_text("{}")
    monkeypatch.setattr(bench, "REPORT_STEPS", [("one", "One", lambda args, results: None, lambda r: [], 30)])
    bench.report(bench.parse_args([f"--report={tmp_path / 'r.md'}"]))
    assert (tmp_path / "r.md").read_text() == "earlier" and (tmp_path / "r.json").read_text() == "{}"
    assert json.loads((tmp_path / "r-2.json").read_text())["steps"][0]["status"] == "ok"
    assert "| 1. One | ok |" in (tmp_path / "r-2.md").read_text() and (tmp_path / "r-2.log").exists()
    for bad, says in [("", "give the Markdown file"), ("r.json", "give the Markdown file"),
                      (str(tmp_path / "missing" / "r.md"), "there is no folder")]:
        with pytest.raises(SystemExit):
            bench.parse_args([f"--report={bad}"])
        assert says in capsys.readouterr().err

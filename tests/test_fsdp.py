"""
Past one GPU's memory: FSDP (--fsdp), activation checkpointing, one checkpoint format that resumes on any number of
processes, the memory estimate and a two-node launch. On the CPU with gloo: the torchrun runs (2 processes each) are
started once for the module (a minute or so on 2 cores); the other tests run in this process.

    python -m pytest tests/test_fsdp.py -q
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_diffusion
import train_lm
from checkpoint import load_checkpoint
from conftest import prepare_functions_corpus
from distributed import micro_steps_per_process, restore_generator_state
from logs import read_log
from memory import FIT, GiB, Plan, check_fits, estimate_memory, shard_numel
from test_lm import first_step_gradients
from training import pick_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
# subprocesses: one thread each (two processes share 2 cores), Cog attention through the reference as on any CPU; every
# run on the CPU (--device=cpu, gloo), also where there is a GPU, so that runs of any number of processes compare
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
# a tiny Cogformer (softmax, cog, softmax) at a constant learning rate (so that max_iters changes nothing else), with
# clipping that acts, and 4 micro-batches per step: 2 per process on 2 processes
TINY = ["--preset=demo", "--device=cpu", "--block_size=32", "--n_layer=3", "--n_head=2", "--n_embd=32",
        "--ffn_hidden=64", "--batch_size=8", "--grad_accum=4", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=3e-3", "--min_lr=3e-3", "--warmup_iters=0", "--grad_clip=0.5", "--eval_interval=100000"]
MORE = 3  # iterations trained after the stop
KEYS = ("iter", "loss", "lr", "train_loss", "val_loss")

torch.set_num_threads(1)


def torchrun(*args, env=ENV, launch="--standalone --nproc_per_node=2"):
    """A torchrun launch on this machine (by default 2 processes on a free port of their own), started: finish() it."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch.split(), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(*launches):
    """What each launch printed, once all have ended; each must succeed. (Launches run side by side: the rendezvous
    and the start-up of one overlap with another's training.)"""
    printed = [launch.communicate(timeout=300)[0] for launch in launches]
    for launch, output in zip(launches, printed):
        assert launch.returncode == 0, output
    return printed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(out):
    return [{k: r[k] for k in KEYS if k in r} for r in read_log(os.path.join(out, "log.jsonl"))]


def losses(out):
    return [r["loss"] for r in read_log(os.path.join(out, "log.jsonl")) if "loss" in r]


def ckpt(out):
    return load_checkpoint(os.path.join(out, "ckpt.pt"))


def quietly(main, args):
    """main(args) in this process; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(args)
    return printed.getvalue()


# the resumed FSDP run, spied on: after each backward, whether the shards hold gradients (FSDP reduce-scatters them
# into the shards' .grad after a step's last micro-batch only), and the bytes of rank 0's shards and AdamW state
SPY = """
import json, os, sys
sys.path.insert(0, os.getcwd())  # the project's folder
import torch
import train_lm
from training import run_trainer

seen = {"reduced": []}
shard_model, configure_adamw, backward = train_lm.shard_model, train_lm.configure_adamw, torch.Tensor.backward

def spied_shard_model(model, *args):
    model = shard_model(model, *args)
    def spied_backward(self, *a, **kw):
        backward(self, *a, **kw)
        seen["reduced"].append(any(p.grad is not None for p in model.parameters()))
    torch.Tensor.backward = spied_backward
    seen["weights"] = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return model

def spied_configure_adamw(*args):
    seen["optimizer"] = optimizer = configure_adamw(*args)
    return optimizer

train_lm.shard_model, train_lm.configure_adamw = spied_shard_model, spied_configure_adamw
run_trainer(lambda: train_lm.main(sys.argv[1:]))
state = seen.pop("optimizer").state.values()
seen["optimizer"] = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * 4
                        for s in state for t in s.values())
with open(os.environ["SPY_OUT"] + os.environ["RANK"], "w") as f:
    json.dump(seen, f)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_functions_corpus(tmp_path_factory.mktemp("data"), 200, 0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The runs the FSDP tests compare, all of one configuration:
    stopped:   FSDP on 2 processes (torchrun), stopped by SIGTERM at iteration `stop`
    fsdp:      its checkpoint resumed with FSDP on 2 processes, with activation checkpointing (and the SPY)
    ddp:       its checkpoint resumed with DDP on 2 processes, with activation checkpointing
    one:       its checkpoint resumed on one process without torchrun (--fsdp, kept from the run, does nothing)
    two_nodes: a fresh FSDP run to the same end, as 2 "nodes" of one process (c10d rendezvous on loopback)
    kernel:    a fresh FSDP run of 2 iterations with activation checkpointing, Cog attention in the fused kernel
    nan:       a fresh FSDP run whose loss blows up (a learning rate of 1e30) after the checkpoint at iteration 0
    single:    a fresh run to the same end on one process
    bench:     bench.py --model timing the demo's training steps with FSDP and activation checkpointing.
    Returns {name: out_dir}, stop, end, the outputs and the spy's records."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: str(root / name) for name in ("stopped", "fsdp", "ddp", "one", "two_nodes", "kernel", "single",
                                               "nan")}
    args = TINY + [f"--data_dir={data}"]
    proc = torchrun("train_lm.py", *args, "--fsdp", "--max_iters=100000", f"--out_dir={out['stopped']}")
    log, deadline = os.path.join(out["stopped"], "log.jsonl"), time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # two steps trained: stop it, as a cluster would
        if os.path.exists(log) and open(log).read().count('"loss"') >= 2:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        pytest.fail(f"the FSDP run ended before it was stopped:\n{proc.communicate()[0]}")
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both workers, as Ctrl-C or a scheduler's SIGTERM would
    printed = {"stopped": proc.communicate(timeout=120)[0]}
    stop = ckpt(out["stopped"])["iter"]
    end = stop + MORE
    for name in ("fsdp", "ddp", "one"):
        shutil.copytree(out["stopped"], out[name])
    resume = args + ["--resume", f"--max_iters={end}"]
    spy = root / "spy.py"
    spy.write_text(SPY)
    two_nodes = (f"--nnodes=2 --nproc_per_node=1 --rdzv_id=nanocog --rdzv_backend=c10d "
                 f"--rdzv_endpoint=127.0.0.1:{free_port()} --local_addr=127.0.0.1")
    launches = [torchrun(str(spy), *resume, "--activation_checkpointing", f"--out_dir={out['fsdp']}",
                         env={**ENV, "SPY_OUT": str(root / "spy.")}),
                torchrun("train_lm.py", *resume, "--fsdp=false", "--activation_checkpointing",
                         f"--out_dir={out['ddp']}"),
                *[torchrun("train_lm.py", *args, "--fsdp", f"--max_iters={end}", f"--out_dir={out['two_nodes']}",
                           launch=two_nodes) for _node in range(2)],
                torchrun("train_lm.py", *args, "--fsdp", "--activation_checkpointing", "--max_iters=2",
                         f"--out_dir={out['kernel']}", env={**ENV, "TRITON_INTERPRET": "1", "COG_BACKEND": "tuned"}),
                torchrun("bench.py", "--model=lm", "--preset=demo", "--vocab_size=256", "--batch_size=2", "--steps=2",
                         "--warmup_steps=1", "--fsdp", "--activation_checkpointing")]
    nan = torchrun("train_lm.py", *args, "--fsdp", "--max_iters=20", "--eval_interval=10", "--learning_rate=1e30",
                   "--min_lr=1e30", "--grad_clip=0", f"--out_dir={out['nan']}")
    printed["one"] = quietly(train_lm.main, resume + [f"--out_dir={out['one']}"])
    printed["single"] = quietly(train_lm.main, args + [f"--max_iters={end}", f"--out_dir={out['single']}"])
    printed["fsdp"], printed["ddp"], *printed["two_nodes"], printed["kernel"], printed["bench"] = finish(*launches)
    printed["nan"] = nan.communicate(timeout=300)[0] + f"\nexit status {nan.returncode}"
    spied = [json.loads((root / f"spy.{rank}").read_text()) for rank in (0, 1)]
    return {"out": out, "stop": stop, "end": end, "printed": printed, "spied": spied}


def test_bench_times_the_training_steps_under_fsdp(runs):
    printed = runs["printed"]["bench"]
    assert printed.count("# 2 processes, FSDP") == 1, printed  # the first process prints, once
    assert re.search(r"^\| cog \| [\d.]+ \|.*\| \d+ \|$", printed, re.M) and "cog/softmax speed" in printed, printed


def test_a_sigterm_stops_every_fsdp_process_together_and_saves(runs):
    printed, stop = runs["printed"]["stopped"], runs["stop"]
    assert printed.count("SIGTERM received") == 2 and "stopped: saved" in printed, printed
    assert 2 <= stop < 100000
    assert [r["iter"] for r in logged(runs["out"]["stopped"]) if "loss" in r] == list(range(stop))


def test_a_nan_loss_stops_every_fsdp_process_and_keeps_the_last_good_checkpoint(runs):
    """The loss every process checks is the mean over all of them: both stop at the same iteration (none is left
    waiting in a collective), with the error, and the checkpoint on disk is the last good one."""
    printed = runs["printed"]["nan"]
    assert printed.count("error: loss is") == 2 and "exit status 0" not in printed, printed
    assert len(set(re.findall(r"error: loss is \S+ at iteration (\d+)", printed))) == 1, printed
    saved = ckpt(runs["out"]["nan"])
    assert saved["iter"] == 0 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_fsdp_on_two_processes_gives_the_losses_and_weights_of_one(runs):
    """fp32, 2 micro-batches per process, clipping on: FSDP on 2 processes trains as one process does, to rounding
    (every process takes its own windows of the step's batches, which do not depend on the number of processes)."""
    fsdp, single = runs["out"]["two_nodes"], runs["out"]["single"]
    assert len(losses(fsdp)) == runs["end"]
    assert losses(fsdp) == pytest.approx(losses(single), rel=1e-5)
    a, b = ckpt(fsdp)["model"], ckpt(single)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_stopped_fsdp_run_resumes_bit_for_bit(runs):
    """Stopped by SIGTERM and resumed at the same world size (here with activation checkpointing, which changes no
    number): the same losses and weights as the run that never stopped."""
    resumed, whole = runs["out"]["fsdp"], runs["out"]["two_nodes"]
    assert logged(resumed) == logged(whole)
    a, b = ckpt(resumed), ckpt(whole)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, state in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][name][k], v) for k, v in state.items()), name


def test_an_fsdp_checkpoint_resumes_on_one_process_and_under_ddp(runs):
    """The checkpoint of 2 FSDP processes continues on one process (no torchrun) and on 2 DDP processes: the same
    iterations, and the losses and weights of the run that never stopped, to rounding."""
    single = runs["out"]["single"]
    assert "note: --fsdp without torchrun" in runs["printed"]["one"]
    for name in ("one", "ddp"):
        out = runs["out"][name]
        assert [r["iter"] for r in logged(out) if "loss" in r] == list(range(runs["end"])), name
        assert losses(out) == pytest.approx(losses(single), rel=1e-5), name
        a, b = ckpt(out)["model"], ckpt(single)["model"]
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_fsdp_reduces_the_gradients_after_a_step_s_last_micro_batch_only(runs):
    """The gradients of a step's first micro-batch are kept whole on each process; the last one's backward
    reduce-scatters their sum into the shards."""
    for seen in runs["spied"]:
        assert seen["reduced"] == [False, True] * MORE


def test_the_estimate_s_sharded_figures_are_rank_0_s_real_shards(runs, data):
    """Rank 0 holds the largest shard of each parameter: exactly the estimate's weights and AdamW state."""
    config = train_lm.TrainConfig(**{**train_lm.PRESETS["demo"], "block_size": 32, "n_layer": 3, "n_head": 2,
                                     "n_embd": 32, "ffn_hidden": 64, "vocab_size": 256})
    with torch.device("meta"):
        model = train_lm.Cogformer(pick_fields(config, train_lm.CogformerConfig))
    estimate = estimate_memory(model, Plan(8, 32, 3, 32, 256, world_size=2, fsdp=True, grad_accum=4))
    assert runs["spied"][0]["weights"] == estimate.weights
    assert runs["spied"][0]["optimizer"] == estimate.optimizer


def test_a_two_node_launch_trains(runs):
    """torchrun --nnodes=2 --rdzv_backend=c10d on the loopback address, a process per "node" (both ended well)."""
    master = [p for p in runs["printed"]["two_nodes"] if "training a Cogformer" in p]
    assert len(master) == 1 and "2 process(es), 2 micro-batches each" in master[0]
    assert [r["iter"] for r in logged(runs["out"]["two_nodes"]) if "loss" in r] == list(range(runs["end"]))


def test_the_fused_cog_kernel_runs_inside_fsdp(runs):
    """With TRITON_INTERPRET=1 the CPU runs Cog attention in the tuned Triton kernel, through its custom op
    (nanocog::cog_attention), as a GPU does (COG_BACKEND=tuned: an error, not the reference, if it cannot): inside
    FSDP's blocks and activation checkpointing's recompute it trains as the reference does on one process, to the
    kernel's rounding."""
    assert losses(runs["out"]["kernel"]) == pytest.approx(losses(runs["out"]["single"])[:2], rel=1e-4)


# -----------------------------------------------------------------------------
# the diffusion trainer: FSDP (the EMA gathers the shards) against DDP with activation checkpointing


DIFFUSION = ["--preset=demo", "--device=cpu", "--img_size=8", "--patch_size=4", "--embed_dim=16", "--depth=3",
             "--num_heads=2", "--batch_size=4", "--grad_accum=4", "--eval_iters=1", "--grid_size=4", "--sample_steps=2",
             "--log_interval=1", "--max_iters=4", "--eval_interval=2", "--grad_clip=0.5"]


def test_diffusion_under_fsdp_trains_as_under_ddp_and_resumes_on_one_process(tmp_path):
    """Each process draws its own images (a generator per rank), so FSDP and DDP on 2 processes see the same ones:
    the same losses, weights and EMA, to rounding. The FSDP checkpoint then goes on on one process."""
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    finish(torchrun("train_diffusion.py", *DIFFUSION, "--fsdp", f"--out_dir={fsdp}"),
           torchrun("train_diffusion.py", *DIFFUSION, "--activation_checkpointing", f"--out_dir={ddp}"))
    assert len(losses(fsdp)) == 4 and losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    a, b = ckpt(fsdp), ckpt(ddp)
    for part in ("model", "ema"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-6, msg=f"{part}: {k}")
    printed = quietly(train_diffusion.main, DIFFUSION + [f"--out_dir={fsdp}", "--resume", "--max_iters=6"])
    assert "each process draws its batches from a fresh stream" in printed
    assert ckpt(fsdp)["iter"] == 6 and len(losses(fsdp)) == 6


# -----------------------------------------------------------------------------
# activation checkpointing: the same gradients


@pytest.mark.parametrize("trainer", ["lm", "diffusion"])
def test_activation_checkpointing_gives_the_same_gradients_and_checkpoints(tmp_path, data, monkeypatch, trainer):
    module, args = (train_lm, TINY + [f"--data_dir={data}"]) if trainer == "lm" else (train_diffusion, DIFFUSION)
    grads = {}
    for ac in (False, True):
        grads[ac] = first_step_gradients(monkeypatch, module)
        quietly(module.main, args + ["--max_iters=1", f"--activation_checkpointing={ac}",
                                     f"--out_dir={tmp_path / str(ac)}"])
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        assert torch.equal(grads[True][name], grads[False][name]), name
    # the module tree and the state_dict keys are those of a model without it
    assert ckpt(tmp_path / "True")["model"].keys() == ckpt(tmp_path / "False")["model"].keys()


# -----------------------------------------------------------------------------
# checkpoints: the older format, a stop while gathering, a checkpoint that does not fit


def test_a_checkpoint_of_the_older_format_resumes_bit_for_bit(tmp_path, data):
    """Before FSDP, checkpoints held optimizer.state_dict() as it is, keyed by position: they still resume exactly."""
    args = TINY + [f"--data_dir={data}", "--eval_interval=2"]
    quietly(train_lm.main, args + ["--max_iters=4", f"--out_dir={tmp_path / 'whole'}"])
    quietly(train_lm.main, args + ["--max_iters=2", f"--out_dir={tmp_path / 'old'}"])
    path = tmp_path / "old" / "ckpt.pt"
    checkpoint = load_checkpoint(str(path))
    order = [name for group in checkpoint["optimizer"]["param_groups"] for name in group["params"]]
    checkpoint["optimizer"] = {"state": {order.index(n): s for n, s in checkpoint["optimizer"]["state"].items()},
                               "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]}
                                                for g in checkpoint["optimizer"]["param_groups"]]}
    torch.save(checkpoint, path)
    quietly(train_lm.main, args + ["--max_iters=4", "--resume", f"--out_dir={tmp_path / 'old'}"])
    assert logged(tmp_path / "old") == logged(tmp_path / "whole")
    a, b = ckpt(tmp_path / "old")["model"], ckpt(tmp_path / "whole")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_stop_while_gathering_leaves_the_checkpoint_on_disk_whole(tmp_path, data, monkeypatch):
    """save_run gathers the model and the optimizer before it opens the file: a Ctrl-C (or a failure) there leaves
    the last checkpoint as it was."""
    import checkpoint
    args = TINY + [f"--data_dir={data}", "--eval_interval=2", f"--out_dir={tmp_path}"]
    quietly(train_lm.main, args + ["--max_iters=2"])
    before = (tmp_path / "ckpt.pt").read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "optimizer_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quietly(train_lm.main, args + ["--max_iters=4", "--resume"])
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt")) == ["ckpt.prev.pt", "ckpt.pt"]


def test_a_checkpoint_that_does_not_fit_the_run_is_refused_before_anything_is_written(tmp_path, data):
    args = TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}"]
    quietly(train_lm.main, args + ["--max_iters=1"])
    path = tmp_path / "ckpt.pt"
    checkpoint = load_checkpoint(str(path))
    del checkpoint["model"]["blocks.1.mlp.up.weight"]
    torch.save(checkpoint, path)
    log = (tmp_path / "log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"^error: .*ckpt\.pt does not fit this run: it lacks "
                                         r"blocks\.1\.mlp\.up\.weight$"):
        train_lm.main(args + ["--max_iters=2", "--resume"])
    assert (tmp_path / "log.jsonl").read_bytes() == log


def test_fsdp_errors_and_notes(tmp_path, data):
    args = TINY + [f"--data_dir={data}", "--max_iters=1"]
    with pytest.raises(SystemExit, match=r"^error: --fsdp trains in bfloat16 or float32, not float16[^\n]*$"):
        train_lm.main(args + ["--fsdp", "--dtype=float16", f"--out_dir={tmp_path / 'fp16'}"])
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(SystemExit, match=r"^error: grad_accum \(4\) must be divisible by the number of processes "
                                         r"\(3\)[^\n]*$"):
        micro_steps_per_process(4, 3)
    # without torchrun --fsdp changes nothing, and says so
    printed = quietly(train_lm.main, args + ["--fsdp", f"--out_dir={tmp_path / 'fsdp'}"])
    assert "note: --fsdp without torchrun: one process holds the whole model" in printed
    quietly(train_lm.main, args + [f"--out_dir={tmp_path / 'plain'}"])
    assert losses(tmp_path / "fsdp") == losses(tmp_path / "plain")


def test_data_generators_across_world_sizes(capsys):
    """One stream for every rank (the LM's) continues on any number of processes; a generator per rank continues at
    the same number and starts a fresh stream at another (never the run's first batches again)."""
    states = [torch.Generator().manual_seed(s).get_state() for s in (1, 2)]
    shared = torch.Generator()
    restore_generator_state(shared, states[:1] * 2, 2, 3, True, 10, shared=True)
    assert torch.equal(shared.get_state(), states[0]) and capsys.readouterr().out == ""
    restore_generator_state(shared, states, 0, 1, True, 10, shared=True)  # an older checkpoint's streams per rank
    assert torch.equal(shared.get_state(), states[0]) and "follows rank 0's" in capsys.readouterr().out
    own = torch.Generator().manual_seed(7)
    restore_generator_state(own, states, 1, 2, True, 10)
    assert torch.equal(own.get_state(), states[1])
    fresh = [torch.Generator().manual_seed(7 + r) for r in range(3)]
    for rank, gen in enumerate(fresh):
        restore_generator_state(gen, states, rank, 3, rank == 0, 10)
    assert "fresh stream" in capsys.readouterr().out
    draws = [torch.randint(1000, (8,), generator=g).tolist() for g in fresh]
    first = [torch.randint(1000, (8,), generator=torch.Generator().manual_seed(7 + r)).tolist() for r in range(3)]
    assert len({tuple(d) for d in draws + first}) == 6


# -----------------------------------------------------------------------------
# the memory estimate


def lm_shapes(preset, vocab=50304):
    config = train_lm.TrainConfig(**{**train_lm.PRESETS[preset], "vocab_size": vocab})
    with torch.device("meta"):  # without allocating
        return config, train_lm.Cogformer(pick_fields(config, train_lm.CogformerConfig))


def lm_plan(config, **changes):
    return Plan(config.batch_size, config.block_size, config.n_layer, config.n_embd, config.vocab_size,
                **{"dtype": "bfloat16", "grad_accum": config.grad_accum, **changes})


@pytest.mark.parametrize("preset", list(train_lm.PRESETS))
def test_the_estimate_s_weights_gradients_and_adamw_state_are_the_parameters_own(preset):
    config, model = lm_shapes(preset)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    whole = sum(p.numel() * p.element_size() for p in params)
    for world_size, fsdp in ((1, False), (8, False), (8, True), (3, True)):
        e = estimate_memory(model, lm_plan(config, world_size=world_size, fsdp=fsdp))
        shards = world_size if fsdp else 1
        mine = sum(-(-p.shape[0] // shards) * p[0].numel() * p.element_size() for p in params)  # rank 0's
        assert e.weights == e.gradients == mine
        assert e.optimizer == 2 * mine + 4 * len(params)  # exp_avg, exp_avg_sq, and a float32 step per tensor
        if not fsdp:
            assert e.weights == whole
        else:
            assert whole / shards <= e.weights < whole / shards * 1.01
    assert shard_numel(torch.empty(3, 4, device="meta"), 8) == 4  # fewer rows than shards: one row each


@pytest.mark.parametrize("preset", list(train_diffusion.PRESETS))
def test_the_diffusion_estimate_counts_the_parameters_and_the_ema(preset):
    config = train_diffusion.TrainConfig(**train_diffusion.PRESETS[preset])
    with torch.device("meta"):
        model = train_diffusion.UViC(pick_fields(config, train_diffusion.UViCConfig))
    params = list(model.parameters())
    for world_size, fsdp in ((1, False), (4, True)):
        plan = Plan(config.batch_size, 65, config.depth, config.embed_dim, 0, "bfloat16", world_size, fsdp, 4,
                    ema=True)
        e = estimate_memory(model, plan)
        shards = world_size if fsdp else 1
        mine = sum(-(-p.shape[0] // shards) * p[0].numel() * 4 for p in params)  # rank 0's
        assert e.weights == e.gradients == mine and e.optimizer == 2 * mine + 4 * len(params)
        assert e.extra["EMA model"] == 4 * sum(p.numel() for p in params)  # whole on every process


def test_the_1b_and_3b_presets_fit_8_gpus_of_80_gb():
    """As they are (3b shards with FSDP), 8 x 80 GB, GPT-2's vocabulary; 3b would not fit with DDP."""
    budget = FIT * 80e9
    for preset in ("1b", "3b"):
        config, model = lm_shapes(preset)
        plan = lm_plan(config, world_size=8, fsdp=config.fsdp)
        assert estimate_memory(model, plan).total <= budget, preset
    config, model = lm_shapes("3b")
    assert estimate_memory(model, lm_plan(config, world_size=8, fsdp=False)).total > budget


def test_a_run_that_would_not_fit_stops_and_names_the_flags_that_fit(monkeypatch):
    import memory
    monkeypatch.setattr(memory, "device_memory", lambda device: 80 * GiB if device.startswith("cuda") else None)
    config, model = lm_shapes("3b")
    plan = lm_plan(config, fsdp=False)
    with pytest.raises(SystemExit) as err:
        check_fits(model, plan, "cuda")
    message = str(err.value)
    assert message.startswith("error: this run needs about 75.1 GiB (weights 11.1 GiB, ") and "\n" not in message
    assert "--activation_checkpointing (57.0 GiB)" in message and "--fsdp on 2 GPUs under torchrun (" in message
    assert "--batch_size=2 --grad_accum=256 (" in message
    assert "--memory_check=false" in message
    with pytest.raises(SystemExit) as err:  # a resumed run keeps its batch: no way that changes it
        check_fits(model, plan, "cuda", resuming=True)
    assert "--batch_size" not in str(err.value)
    for fixed in (dict(activation_checkpointing=True), dict(fsdp=True, world_size=2),
                  dict(batch_size=2, grad_accum=256), dict(fsdp=True, world_size=8)):  # each way it names fits
        check_fits(model, dataclasses.replace(plan, **fixed), "cuda")
    check_fits(model, plan, "cpu")  # no GPU to compare with: nothing to stop

"""
What a user meets at the command line of every entry point: --help, errors that name the problem before anything is
written, checkpoints that are loaded without running code and survive damage, and stop requests (Ctrl-C, SIGTERM).
Tiny models, a few subprocesses; about half a minute on 2 CPU cores.

    python -m pytest tests/test_cli.py -q
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import analyze
import checkpoint
import sample
import train_diffusion
import train_lm
from checkpoint import load_checkpoint
from conftest import prepare_functions_corpus
from cli import help_value, parse_config
from data import prepare_lm
from distributed import agree_on_step
from logs import SlowRun, read_log
from training import StopNow, StopRequest, Stopped, pick_fields, run_trainer, set_cpu_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
# tiny runs of both trainers: milliseconds per step
LM = ["--preset=demo", "--block_size=16", "--n_layer=3", "--n_head=2", "--n_embd=16", "--ffn_hidden=32",
      "--batch_size=4", "--eval_iters=2", "--log_interval=1"]
DIFFUSION = ["--preset=demo", "--img_size=8", "--patch_size=4", "--embed_dim=16", "--depth=3", "--num_heads=2",
             "--batch_size=4", "--eval_iters=1", "--grid_size=4", "--sample_steps=2", "--log_interval=1"]

torch.set_num_threads(1)


@pytest.fixture
def lm_data(tmp_path):
    """A small byte-level dataset in tmp_path/data."""
    return prepare_functions_corpus(tmp_path, 40, 0.25)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# checkpoints are loaded without running code from them


class RunsCode:
    """Unpickled (torch.load with weights_only=False), this creates a file: code that the checkpoint chose, run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, lm_data):
    marker = str(tmp_path / "code_ran")
    for kind in ("lm", "diffusion"):
        os.makedirs(tmp_path / kind)
        torch.save({"kind": kind, "iter": 1, "model": {}, "payload": RunsCode(marker)}, tmp_path / kind / "ckpt.pt")
    lm, diffusion = str(tmp_path / "lm"), str(tmp_path / "diffusion")
    attempts = {"train_lm.py --resume": lambda: train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={lm}",
                                                                    "--resume"]),
                "train_diffusion.py --resume": lambda: train_diffusion.main(DIFFUSION + [f"--out_dir={diffusion}",
                                                                                         "--resume"]),
                "sample.py": lambda: sample.main([f"--out_dir={lm}"]),
                "analyze.py attention": lambda: analyze.main(["attention", f"--out_dir={lm}"])}
    for name, attempt in attempts.items():
        with pytest.raises(SystemExit) as err:
            attempt()
        message = str(err.value)
        assert message.startswith("error: refusing to load") and "\n" not in message, (name, message)
        assert "io.open" in message or "builtins.open" in message, message  # it names what it refused
        assert not os.path.exists(marker), name
    # the same from the shell: one line on stderr, no traceback
    result = run_cli("sample.py", f"--out_dir={diffusion}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "refusing to load" in result.stderr
    assert not os.path.exists(marker)
    # and the payload is real: an unsafe load runs it
    torch.load(os.path.join(lm, "ckpt.pt"), weights_only=False)
    assert os.path.exists(marker)


def test_checkpoints_written_before_safe_loading_still_load(tmp_path):
    """Older checkpoints held numpy's RNG state as np.random.get_state() returns it: an array, allowed by type."""
    import numpy as np
    np.random.seed(3)
    state = np.random.get_state()
    torch.save({"iter": 5, "rng": {"numpy": state}}, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert loaded["iter"] == 5 and np.array_equal(loaded["rng"]["numpy"][1], state[1])


# -----------------------------------------------------------------------------
# damaged checkpoints: the previous one is kept and offered


def test_a_damaged_checkpoint_names_the_previous_one_and_how_to_continue(tmp_path, lm_data):
    out = str(tmp_path / "run")
    args = LM + [f"--data_dir={lm_data}", f"--out_dir={out}", "--eval_interval=2"]
    train_lm.main(args + ["--max_iters=4"])  # checkpoints at iterations 0, 2 and 4
    ckpt, prev = os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt.prev.pt")
    assert load_checkpoint(prev)["iter"] == 2 and load_checkpoint(ckpt)["iter"] == 4
    with open(ckpt, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(ckpt) // 2)
    for attempt in (lambda: train_lm.main(args + ["--max_iters=6", "--resume"]),
                    lambda: sample.main([f"--out_dir={out}", "--max_new_tokens=2"]),
                    lambda: analyze.main(["attention", f"--out_dir={out}"])):
        with pytest.raises(SystemExit) as err:
            attempt()
        message = str(err.value)
        assert message.startswith(f"error: {ckpt} cannot be read") and "\n" not in message, message
        assert f"{prev} (iteration 2)" in message and f"cp {prev} {ckpt}" in message, message
    # doing what it says continues the run from iteration 2
    os.replace(ckpt, ckpt + ".damaged")
    os.link(prev, ckpt)
    train_lm.main(args + ["--max_iters=6", "--resume"])
    assert load_checkpoint(ckpt)["iter"] == 6
    assert not [f for f in os.listdir(out) if ".tmp." in f]


# -----------------------------------------------------------------------------
# stop requests: honoured within one micro-batch or evaluation batch, wherever the trainer is


def signal_on_calls(monkeypatch, module, name, calls, sig=signal.SIGINT):
    """Wrap module.name so that its calls-th calls (counting from 1) first send this process sig: a Ctrl-C at a known
    point. Python runs the handler in the main thread right after os.kill returns. Returns the call counter."""
    real, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return count


def comparable(log_path):
    return [{k: r[k] for k in ("iter", "loss", "train_loss", "val_loss") if k in r} for r in read_log(log_path)]


def test_a_stop_inside_an_evaluation_ends_it_at_once_and_resume_redoes_it(tmp_path, lm_data, monkeypatch, capsys):
    args = LM + [f"--data_dir={lm_data}", "--max_iters=4", "--eval_interval=2", "--eval_iters=6",
                 "--learning_rate=3e-3", "--min_lr=3e-3", "--warmup_iters=0"]
    train_lm.main(args + [f"--out_dir={tmp_path / 'full'}"])
    # get_batch calls: 12 for the evaluation at 0 (6 per split), 1 per step, so the evaluation at 2 starts at call 15
    calls = signal_on_calls(monkeypatch, train_lm, "get_batch", {17})
    with pytest.raises(Stopped) as stopped:
        train_lm.main(args + [f"--out_dir={tmp_path / 'split'}"])
    assert stopped.value.code == 130  # saved, and the exit status a shell expects after Ctrl-C
    assert calls[0] == 17  # not one batch more
    assert "SIGINT received" in capsys.readouterr().out
    stopped = load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert stopped["iter"] == 2 and stopped["eval_done"] is False
    assert [r["iter"] for r in read_log(tmp_path / "split" / "log.jsonl") if "val_loss" in r] == [0]
    train_lm.main(args + [f"--out_dir={tmp_path / 'split'}", "--resume"])
    assert comparable(tmp_path / "split" / "log.jsonl") == comparable(tmp_path / "full" / "log.jsonl")
    assert "resuming from" in capsys.readouterr().out


def test_a_stop_between_micro_batches_drops_the_step_and_resume_is_exact(tmp_path, monkeypatch):
    args = DIFFUSION + ["--grad_accum=4", "--max_iters=3", "--eval_interval=2", "--learning_rate=1e-3",
                        "--warmup_iters=0"]
    train_diffusion.main(args + [f"--out_dir={tmp_path / 'full'}"])
    # get_batch calls: 1 for the evaluation at 0, then 4 per step: call 7 is iteration 1's second micro-batch
    calls = signal_on_calls(monkeypatch, train_diffusion, "get_batch", {7}, signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        train_diffusion.main(args + [f"--out_dir={tmp_path / 'split'}"])
    assert stopped.value.code == 143  # after SIGTERM
    assert calls[0] == 7
    assert load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["iter"] == 1
    train_diffusion.main(args + [f"--out_dir={tmp_path / 'split'}", "--resume"])
    a, b = (load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("full", "split"))
    assert all(torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key])
    assert comparable(tmp_path / "split" / "log.jsonl") == comparable(tmp_path / "full" / "log.jsonl")


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tmp_path, lm_data, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_on_calls(monkeypatch, train_lm, "get_batch", {16})  # a training batch: the first Ctrl-C
    signal_on_calls(monkeypatch, checkpoint, "save_checkpoint", {2})  # the second, as the stop's checkpoint is saved
    try:
        with pytest.raises(SystemExit) as err:
            run_trainer(lambda: train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={out}", "--max_iters=50",
                                                    "--eval_iters=6"]))
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C ended in a KeyboardInterrupt traceback")
    assert err.value.code == 130 and "interrupted: quitting without saving" in capsys.readouterr().err
    assert load_checkpoint(str(out / "ckpt.pt"))["iter"] == 0  # the last one saved, whole
    assert not [f for f in os.listdir(out) if ".tmp." in f]


def test_a_gpu_sized_run_on_the_cpu_says_what_it_is_about_to_do(tmp_path, lm_data, monkeypatch, capsys):
    monkeypatch.setattr(SlowRun, "min_flops", 1e6)  # the tiny run counts as big
    train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=3", "--grad_accum=2"])
    out = capsys.readouterr().out
    warning = out.index("warning: a GPU-sized run on the CPU: 128 tokens per step")
    assert warning < out.index("eval at iter 0") < out.index("the first step took")
    assert "the other 2 steps would take about" in out and "Ctrl-C stops and saves" in out
    capsys.readouterr()
    train_diffusion.main(DIFFUSION + [f"--out_dir={tmp_path / 'diffusion'}", "--max_iters=1", "--device=cpu"])
    assert "a GPU-sized run on the CPU: 4 images per step" in capsys.readouterr().out
    monkeypatch.setattr(SlowRun, "min_flops", 1e12)
    train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={tmp_path / 'run2'}", "--max_iters=1"])
    assert "GPU-sized" not in capsys.readouterr().out  # the demo is not


def test_stop_request_flags_then_quits():
    stop = StopRequest()
    stop.poll()  # nothing asked yet
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    with pytest.raises(StopNow):
        stop.poll()
    os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing: the save is under way
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGTERM  # the first signal decides the exit status
    ddp = StopRequest(ddp=True)  # ranks stop together at the end of the step: poll() never raises
    os.kill(os.getpid(), signal.SIGINT)
    assert ddp.requested and ddp.signum == signal.SIGINT
    ddp.poll()


def test_a_stopped_run_exits_with_the_status_of_its_signal():
    """130 after Ctrl-C, 143 after SIGTERM, as shells expect: `train ... && sample ...` samples no unfinished model.
    The ranks agree on the signal (one process here: agree_on_step passes on its own)."""
    assert Stopped(signal.SIGINT).code == 130 and Stopped(signal.SIGTERM).code == 143
    loss = torch.tensor(2.5)
    assert agree_on_step(loss, 0, False) == (2.5, 0)
    assert agree_on_step(loss, signal.SIGINT, False) == (2.5, signal.SIGINT)
    assert agree_on_step(loss, signal.SIGTERM, False) == (2.5, signal.SIGTERM)
    with pytest.raises(SystemExit) as err:
        run_trainer(lambda: (_ for _ in ()).throw(Stopped(signal.SIGTERM)))
    assert err.value.code == 143


AGREE = """
import os, signal, sys, torch, torch.distributed as dist
from distributed import agree_on_step
dist.init_process_group("gloo")
got = [int(s) for s in sys.argv[1].split(",")][dist.get_rank()]
loss, agreed = agree_on_step(torch.tensor(float(dist.get_rank())), got, True)
print(loss, agreed)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("received, agreed", [("15,0", 15), ("0,2", 2), ("15,2", 2), ("0,0", 0)])
def test_every_rank_stops_with_the_same_signal(received, agreed):
    """Under torchrun a signal may reach one rank only: every rank learns of it at the end of the step and exits with
    the same status (SIGINT's, 130, if any rank got Ctrl-C). Two CPU processes on gloo."""
    import socket
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**ENV, "PYTHONPATH": REPO, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, received], cwd=REPO, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert [out.split() for out, _ in outputs] == [["0.5", str(agreed)]] * 2  # the mean loss, the agreed signal


# -----------------------------------------------------------------------------
# bad values: a one-line error that names the key, before anything is prepared, downloaded or written


@pytest.mark.parametrize("script,args,message", [
    ("lm", ["--attn=cogg"], "--attn=cogg: choose one of cog, softmax"),
    ("lm", ["--dtype=foo"], "--dtype=foo: choose one of auto, float32, bfloat16, float16"),
    ("lm", ["--device=cuda:99"], "--device=cuda:99, but"),
    ("lm", ["--device=gpu"], "--device=gpu: not a device"),
    ("lm", ["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    ("lm", ["--log_interval=0"], "--log_interval=0: must be at least 1"),
    ("lm", ["--batch_size=-2"], "--batch_size=-2: must be at least 1"),
    ("lm", ["--n_head=3"], "n_embd (16) must be divisible by n_head (3)"),
    ("lm", ["--n_head=0"], "n_head must be at least 1, got 0"),
    ("lm", ["--bogus=1"], "unknown config key --bogus"),
    ("lm", ["--preset=tiny"], "--preset=tiny: choose one of paper, demo, 600m, 1b, 3b"),
    ("lm", ["--max_iter=5"], "unknown config key --max_iter; did you mean --max_iters?"),
    ("lm", ["--n_layer=two"], "--n_layer=two: expected a value of type int"),
    ("lm", ["--compile=maybe"], "--compile=maybe: expected a value of type bool"),
    ("lm", ["--n_layer", "4"], "--n_layer needs a value: --n_layer=VALUE"),
    ("lm", ["--compile", "false"], "unexpected argument 'false'"),
    ("lm", ["--beta2=1.5"], "--beta2=1.5: must be in [0, 1)"),
    ("lm", ["--learning_rate=-1"], "--learning_rate=-1.0: must be at least 0"),
    ("lm", ["--out_dir="], "--out_dir=: must name a folder"),
    ("diffusion", ["--attn=soft"], "--attn=soft: choose one of cog, softmax"),
    ("diffusion", ["--patch_size=3"], "img_size (8) must be divisible by patch_size (3)"),
    ("diffusion", ["--patch_size=0"], "patch_size must be at least 1, got 0"),
    ("diffusion", ["--dataset=mnist"], "--dataset=mnist: choose one of cifar10, shapes, shapes_t2i, coco"),
    ("diffusion", ["--ema_decay=1.5"], "--ema_decay=1.5: must be in [0, 1]"),
    ("diffusion", ["--in_chans=1"], "the shapes are RGB images"),
    ("diffusion", ["--dtype=fp16"], "--dtype=fp16: choose one of"),
    ("sample", ["--start=FILE:{tmp}/missing.txt"], "--start=FILE:{tmp}/missing.txt: cannot read the prompt file"),
    ("sample", ["--output={tmp}/no/such/folder/grid.png"], "there is no folder {tmp}/no/such/folder"),
    ("sample", ["--output={tmp}/grid.jpeg"], "the grid is a PNG"),
    ("sample", ["--num_samples=0"], "--num_samples=0: must be at least 1"),
    ("sample", ["--temperature=-1"], "--temperature=-1.0: must be at least 0"),
    ("sample", ["--dtype=half"], "--dtype=half: choose one of"),
    ("analyze", ["eval", "--out_dir={tmp}", "--batch_size=0"], "--batch_size=0: must be at least 1"),
    ("analyze", ["attention", "--out_dir={tmp}", "--png={tmp}/no/folder/a.png"], "there is no folder {tmp}/no/folder"),
    ("lm", ["--out_dir={tmp}/file/run"], "cannot be made or written ({tmp}/file is not a folder"),
])
def test_bad_values_are_one_line_errors_before_any_side_effect(tmp_path, script, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    data, out = tmp_path / "pystdlib", tmp_path / "run"  # the LM demo would prepare data/pystdlib on first use
    run = {"lm": lambda: train_lm.main(LM + [f"--data_dir={data}", f"--out_dir={out}"] + args),
           "diffusion": lambda: train_diffusion.main(DIFFUSION + [f"--out_dir={out}"] + args),
           "sample": lambda: sample.main([f"--out_dir={out}"] + args),
           "analyze": lambda: analyze.main(args)}[script]
    with pytest.raises(SystemExit) as err:
        run()
    assert str(err.value).startswith("error: ") and message in str(err.value) and "\n" not in str(err.value)
    assert not data.exists() and not out.exists()


def test_a_checkpoint_of_the_other_kind_is_a_clear_error(tmp_path, lm_data):
    out = str(tmp_path / "run")
    train_diffusion.main(DIFFUSION + [f"--out_dir={out}", "--max_iters=1"])
    with pytest.raises(SystemExit, match="is a 'diffusion' checkpoint, not an LM's"):
        train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={out}", "--resume"])
    with pytest.raises(SystemExit, match="analyze.py reads LM checkpoints"):
        analyze.main(["attention", f"--out_dir={out}"])


# -----------------------------------------------------------------------------
# --help: every key with its type, default and the help in its field's metadata; the presets; exit 0


@pytest.mark.parametrize("script,cls_name,main", [
    ("train_lm.py", "TrainConfig", lambda: train_lm.main(["--help"])),
    ("train_diffusion.py", "TrainConfig", lambda: train_diffusion.main(["--preset=demo", "--help"])),
    ("sample.py", "SampleConfig", lambda: sample.main(["-h"])),
])
def test_help_lists_every_key_with_type_default_and_description(capsys, script, cls_name, main):
    with pytest.raises(SystemExit) as err:
        main()
    assert err.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    module = {"train_lm.py": train_lm, "train_diffusion.py": train_diffusion, "sample.py": sample}[script]
    config_cls = getattr(module, cls_name)
    for f in dataclasses.fields(config_cls):
        if f.name != "preset":
            assert f"--{f.name}" in text, f.name
    described = [f for f in dataclasses.fields(config_cls) if f.metadata.get("help")]
    assert len(described) >= 10
    for f in described:  # each field's help, beside its type and default
        assert re.search(rf"--{f.name} [^;]{{0,60}}? default {re.escape(help_value(f.default))}; "
                         rf"{re.escape(' '.join(f.metadata['help'].split()))}", flat), f.name
    assert text.startswith(f"usage: python {script}")
    if script != "sample.py":
        assert "--n_layer INT" in text or "--depth INT" in text
        assert "--attn {cog,softmax}" in text and "--dtype {auto,float32,bfloat16,float16}" in text
        assert "--compile [BOOL]" in text and "default false; torch.compile the model" in flat
        assert "demo: " in text and "max_iters=" in text  # the demo preset and what it changes
    else:
        assert "--num_samples INT or none" in text and "default 1337" in text and "diffusion models:" in text


def test_every_field_of_the_models_is_a_flag_of_its_trainer():
    for trainer, model_config in ((train_lm, train_lm.CogformerConfig), (train_diffusion, train_diffusion.UViCConfig)):
        flags = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
        assert {f.name for f in dataclasses.fields(model_config)} <= flags, trainer.__name__
    config = parse_config(train_lm.TrainConfig, train_lm.PRESETS, ["--preset=demo", "--rope_theta=500"])
    assert pick_fields(config, train_lm.CogformerConfig).rope_theta == 500.0


def test_help_from_the_shell_and_for_analyze(capsys):
    result = run_cli("train_lm.py", "--help")
    assert result.returncode == 0 and result.stderr == "" and "--grad_accum INT" in result.stdout
    result = run_cli("data/prepare_lm.py", "--help")
    assert result.returncode == 0 and "--num_proc" in result.stdout
    for argv, expected in ((["--help"], ["  attention ", "  collapse ", "  compare ", "  eval "]),
                           (["attention", "--help"], ["usage: python analyze.py attention", "--text STR",
                                                      "a text file"]),
                           (["eval", "-h"], ["--limit INT", "examples per task"])):
        with pytest.raises(SystemExit) as err:
            analyze.main(argv)
        assert err.value.code == 0
        text = capsys.readouterr().out
        assert all(e in text for e in expected), (argv, text)


# -----------------------------------------------------------------------------
# sample.py: flags that do not apply to the checkpoint's kind


def test_sample_refuses_flags_for_the_other_kind_of_model(tmp_path):
    for kind in ("lm", "diffusion"):
        os.makedirs(tmp_path / kind)
        torch.save({"kind": kind}, tmp_path / kind / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"--max_new_tokens, --start: for language models only, and .* is a "
                                         r"diffusion model's checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'diffusion'}", "--start=def ", "--max_new_tokens=5"])
    with pytest.raises(SystemExit, match=r"--sampler: for diffusion models only, and .* is a language model's"):
        sample.main([f"--out_dir={tmp_path / 'lm'}", "--sampler=em"])
    assert sorted(os.listdir(tmp_path / "diffusion")) == ["ckpt.pt"]  # no grid written
    os.makedirs(tmp_path / "t2i")
    torch.save({"kind": "diffusion", "model_config": {"num_clip_token": 3}}, tmp_path / "t2i" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"--start: for language models only, and .* is a text-to-image model's"):
        sample.main([f"--out_dir={tmp_path / 't2i'}", "--start=def "])
    with pytest.raises(SystemExit, match=r"--cfg_scale, --prompt: for text-to-image models only, and .* is a "
                                         r"diffusion model's"):
        sample.main([f"--out_dir={tmp_path / 'diffusion'}", "--prompt=a red circle", "--cfg_scale=2"])
    with pytest.raises(SystemExit, match=r"--prompt: for text-to-image models only, and .* is a language model's"):
        sample.main([f"--out_dir={tmp_path / 'lm'}", "--prompt=a red circle"])
    torch.save({"kind": "mystery"}, tmp_path / "lm" / "ckpt.pt")
    with pytest.raises(SystemExit, match="is not a checkpoint of train_lm.py or train_diffusion.py"):
        sample.main([f"--out_dir={tmp_path / 'lm'}"])


# -----------------------------------------------------------------------------
# small things


def test_sample_reads_by_default_the_folder_train_lm_writes_by_default():
    assert sample.SampleConfig().out_dir == train_lm.TrainConfig().out_dir


def test_a_new_run_never_replaces_an_earlier_one(tmp_path, lm_data, capsys):
    """A new run into a folder holding one refuses before writing anything; --overwrite moves the old one aside."""
    args = LM + [f"--data_dir={lm_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2", "--eval_interval=2"]
    train_lm.main(args)
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    with pytest.raises(SystemExit, match=r"holds a run \(ckpt.pt, ckpt.prev.pt, log.jsonl\): continue it with "
                                         r"--resume, start this one in a new --out_dir, or give --overwrite"):
        train_lm.main(args)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files
    with pytest.raises(SystemExit, match="holds a run"):
        train_diffusion.main(DIFFUSION + [f"--out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match="--resume continues .* --overwrite moves it aside: give one"):
        train_lm.main(args + ["--resume", "--overwrite"])
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not the run's: it stays where it is
    train_lm.main(args + ["--overwrite", "--max_iters=1"])
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and {name: (aside[0] / name).read_bytes() for name in files} == files
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and not (aside[0] / "notes.txt").exists()
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["iter"] == 1


def test_resume_continues_the_run_it_names(tmp_path, lm_data, capsys):
    """--resume takes the run's own config: keys not given come from the checkpoint (here block_size, which the
    preset would set otherwise), a safe key given overrides it and says so, any other key given is refused."""
    small = [k for k in LM if not k.startswith("--block_size")] + [f"--data_dir={lm_data}", f"--out_dir={tmp_path}"]
    train_lm.main(small + ["--block_size=8", "--max_iters=2", "--eval_interval=2"])
    with pytest.raises(SystemExit, match=r"--learning_rate=0.1: the run in .* has learning_rate=0.003, and --resume "
                                         r"continues that run"):
        train_lm.main(small + ["--resume", "--learning_rate=0.1"])
    capsys.readouterr()
    train_lm.main(small + ["--resume", "--max_iters=3", "--eval_interval=3"])
    assert "resuming with max_iters=3 (the run had 2)" in capsys.readouterr().out
    checkpoint = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert checkpoint["iter"] == 3
    assert checkpoint["config"]["block_size"] == 8 and checkpoint["model_config"]["block_size"] == 8


def test_resuming_a_finished_run_says_nothing_is_left_and_how_to_train_further(tmp_path, lm_data, capsys):
    args = LM + [f"--data_dir={lm_data}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"]
    train_lm.main(args)
    log_before = (tmp_path / "log.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train_lm.main(args + ["--resume"])
    assert err.value.code == 0  # nothing failed
    assert (tmp_path / "log.jsonl").read_text() == log_before  # no second evaluation at iteration 2
    out = capsys.readouterr().out
    assert out.startswith(f"nothing left to train: the run in {tmp_path} finished at iteration 2 (max_iters=2)")
    assert "a larger --max_iters, e.g. --resume --max_iters=4" in out
    assert "config:" not in out and "eval at iter" not in out and out.count("\n") == 1  # one line, no config
    train_lm.main(args + ["--resume", "--max_iters=3"])  # what it says works
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter"] == 3
    train_diffusion.main(DIFFUSION + [f"--out_dir={tmp_path / 'd'}", "--max_iters=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train_diffusion.main(DIFFUSION + [f"--out_dir={tmp_path / 'd'}", "--max_iters=1", "--resume"])
    assert err.value.code == 0 and capsys.readouterr().out.startswith("nothing left to train")


def test_tokenising_progress_counts_the_bytes_of_the_sources(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x = 1\n" * 300)
    (tmp_path / "b.txt").write_text("y = 2\n" * 300)
    prepare_lm.main([f"--files={tmp_path}/*.txt", f"--out_dir={tmp_path / 'out'}", "--tokenizer=bytes",
                     "--val_fraction=0.5", "--num_proc=1"])
    err = capsys.readouterr().err
    assert "\r" not in err  # not a terminal: plain lines
    last = err.splitlines()[-1]
    assert "100%" in last and "3.60k/3.60k" in last and "3,602 tokens" in last, last  # not "/1.00G", the token budget


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    """Redirected output (a log file, a pipe) holds no carriage returns: a line at each tenth of the way, whose time
    left reads as a duration, not as a clock."""
    script = tmp_path / "loop.py"
    script.write_text("import time\nfrom logs import progress\nfor _ in progress(range(40), desc='work', unit='steps'):"
                      "\n    time.sleep(0.001)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**ENV, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and "\r" not in result.stderr and len(lines) == 10, result.stderr
    assert lines[3].startswith("work: 16/40 steps (40%), ") and "so far, about " in lines[3] and "left" in lines[3]
    assert lines[-1].startswith("work: 40/40 steps (100%)") and "left" not in lines[-1]
    assert not re.search(r"\d+:\d\d", result.stderr)  # no 00:03 or 13:17:27


def test_on_a_terminal_progress_is_a_bar_whose_time_left_reads_as_a_duration(tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    script = tmp_path / "loop.py"
    script.write_text("import time\nfrom logs import progress\nfor _ in progress(range(30), desc='work', unit='steps'):"
                      "\n    time.sleep(0.02)\n")
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**ENV, "PYTHONPATH": REPO},
                            stderr=terminal, stdout=subprocess.DEVNULL)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "\r" in text and "work:" in text and "30/30 steps" in text, text  # a bar, redrawn in place
    assert " left]" in text and "about " in text, text
    assert not re.search(r"\d+:\d\d", text), text  # no 00:03 or 13:17:27


def test_a_redirected_script_prints_no_carriage_returns(tmp_path):
    """toy.py with its output in a file, as a newcomer runs it in the background: plain progress lines."""
    result = run_cli("toy.py", "--tasks=majority", "--seeds=1", "--steps=30", "--eval_size=20", "--catch_up=",
                     f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr
    assert "training: 60/60 steps (100%)" in result.stderr


def test_analyze_prints_no_preset_and_labels_heads_and_tokens_readably(tmp_path, capsys):
    import matplotlib.pyplot as plt
    from test_analyze import save_run, tiny_model
    run = save_run(tmp_path / "run", tiny_model("cog", block_size=64, n_layer=3, n_head=2))
    runs = analyze.main(["attention", f"--out_dir={run}"])
    assert not re.search(r"^ *preset *=", capsys.readouterr().out, flags=re.M)  # the config printed has no preset
    fig = analyze.attention_figure(plt, runs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["head 0", "head 1"] * 3  # a label for every row
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 8  # token labels: 8 pt at 150 dpi, ~17 px
    assert fig.get_size_inches()[0] >= 0.15 * 64  # room for them
    plt.close(fig)


def test_frechet_distance_of_rank_deficient_features_warns_nothing():
    import warnings

    from diffusion import feature_stats, frechet_distance
    rng = np.random.default_rng(0)
    # features of rank 3 in 16 dimensions, as the FID test's stand-in for Inception gives: singular covariances
    a, b = (feature_stats(np.repeat(rng.normal(size=(n, 3)), 6, axis=1)[:, :16]) for n in (6, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(frechet_distance(*a, *b))


def test_a_jsonl_row_without_text_is_named_on_the_redpajama_path_too(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(SystemExit, match=r"a\.jsonl: a row without a \"text\" string \(its keys: \['text', 'txt'\]\)"):
        prepare_lm.main(["--dataset=redpajama", f"--source={tmp_path}/a.jsonl", f"--out_dir={tmp_path / 'out'}",
                         "--tokenizer=bytes", "--num_proc=1"])
    assert os.listdir(tmp_path / "out") == []


def test_redpajama_without_network_says_what_to_do_instead(tmp_path):
    pytest.importorskip("datasets")  # (without it: the next test)
    out = tmp_path / "redpajama"
    result = subprocess.run([sys.executable, "data/prepare_lm.py", "--dataset=redpajama", f"--out_dir={out}"],
                            cwd=REPO, env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip()
    assert error.startswith("error: cannot read hf://datasets/togethercomputer/RedPajama-Data-1T-Sample")
    assert "--source=" in error and "--files=" in error and "\n" not in error
    assert not out.exists()


def test_redpajama_without_the_datasets_package_says_what_to_do_instead(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it: import datasets fails
    with pytest.raises(SystemExit) as err:
        prepare_lm.main(["--dataset=redpajama", f"--out_dir={tmp_path / 'redpajama'}"])
    assert str(err.value).startswith("error: --dataset=redpajama reads its files with Hugging Face's datasets")
    assert "pip install datasets" in str(err.value) and "--files=" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "redpajama").exists()


def test_bench_times_both_models_in_one_run(capsys):
    import bench
    bench.main(["--model=lm", "--preset=demo", "--vocab_size=256", "--batch_size=2", "--steps=2",
                "--warmup_steps=1"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (cog|softmax) \| ([\d.]+) \| [\d.]+-[\d.]+ \| ([\d,]+) \| - \| - \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["cog", "softmax"], out
    assert all(float(ms) > 0 and int(work.replace(",", "")) > 0 for _, ms, work, _ in rows)
    assert rows[0][3] == rows[1][3] and int(rows[0][3]) > 0  # the memory estimate, the same for both kinds
    assert re.search(r"^cog/softmax speed: \d+\.\d{3}", out, re.M)


@pytest.mark.parametrize("arg,message", [("--steps=0", "argument --steps: 0: must be at least 1"),
                                         ("--batch_size=-2", "argument --batch_size: -2: must be at least 0"),
                                         ("--vocab_size=0", "argument --vocab_size: 0: must be at least 1"),
                                         ("--model=gpt", "argument --model: invalid choice: 'gpt'")])
def test_bench_refuses_bad_values_before_building_anything(capsys, arg, message):
    import bench
    with pytest.raises(SystemExit) as err:
        bench.main(["--model=lm", "--preset=demo", "--vocab_size=256", "--batch_size=1", "--steps=1", arg])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_bench_passes_other_options_to_the_trainer(capsys):
    """--model=lm --n_layer=2: a --key=value bench.py does not know goes to the trainer's TrainConfig (as the trainers'
    later options will, e.g. for FSDP); a key the trainer lacks is named, and without --model none is taken."""
    import bench
    args = bench.parse_args(["--model=lm", "--preset=demo", "--vocab_size=256", "--batch_size=2", "--n_layer=2"])
    run = bench.training_step(args, "cog", "cpu")
    assert run.config.n_layer == 2 and len(run.model.blocks) == 2
    args = bench.parse_args(["--model=lm", "--preset=demo", "--n_lyer=2"])
    with pytest.raises(SystemExit, match="unknown config key --n_lyer; did you mean --n_layer"):
        bench.training_step(args, "cog", "cpu")
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--n_layer=2"])
    assert err.value.code == 2 and "--n_layer=2 (trainer options go with --model" in capsys.readouterr().err


@pytest.mark.parametrize("model,preset", [("lm", "demo"), ("diffusion", "demo"), ("diffusion", "demo_t2i")])
def test_bench_steps_are_the_trainers_training_steps(model, preset):
    """What bench.py --model times updates the weights of the trainer's model; the LM memorises its one batch."""
    import bench
    args = bench.parse_args([f"--model={model}", f"--preset={preset}", "--vocab_size=256", "--batch_size=4"])
    run = bench.training_step(args, "softmax", "cpu")
    assert {m.kind for m in run.model.modules() if hasattr(m, "kind")} == {"softmax"}
    assert run.config.batch_size == 4 and run.work == (4 * 128 if model == "lm" else 4)
    before = [p.detach().clone() for p in run.model.parameters()]
    losses = [run.step().item() for _ in range(10)]
    assert all(np.isfinite(losses))
    assert all(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()) if p.requires_grad)
    if model == "lm":
        assert losses[-1] < 0.7 * losses[0]


# -----------------------------------------------------------------------------
# CPU threads from the size of the work; the baselines named for what they are


def test_a_small_model_runs_on_one_cpu_thread_and_omp_num_threads_wins(monkeypatch):
    from model import Cogformer, CogformerConfig
    model = Cogformer(CogformerConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32))
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("training.CPU_THREADS_DEFAULT", 4)
    try:
        assert set_cpu_threads("cpu", model, 16) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads("cpu", model, 10 ** 9) == 4  # (torch may run fewer where there are fewer cores)
        torch.set_num_threads(1)
        assert set_cpu_threads("cuda", model, 16) == 1  # a GPU run: left alone
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert set_cpu_threads("cpu", model, 16) == 3  # the user's choice
    finally:
        torch.set_num_threads(threads)


def test_the_baselines_are_named_for_what_they_are(tmp_path, lm_data, capsys):
    from model import CogformerConfig, UViCConfig
    assert CogformerConfig().model_name() == "Cogformer" and UViCConfig().model_name() == "U-ViC"
    assert CogformerConfig(attn="softmax").model_name() == "Transformer"
    assert UViCConfig(attn="softmax").model_name() == "U-ViT"
    assert CogformerConfig(n_layer=2, softmax_layers="0,1").model_name() == "Transformer"  # no Cog layer left
    train_lm.main(LM + [f"--data_dir={lm_data}", f"--out_dir={tmp_path / 'lm'}", "--max_iters=1", "--attn=softmax"])
    assert "training a Transformer on" in capsys.readouterr().out
    train_diffusion.main(DIFFUSION + [f"--out_dir={tmp_path / 'd'}", "--max_iters=1", "--attn=softmax"])
    assert "training a U-ViT on shapes" in capsys.readouterr().out
    analyze.main(["attention", f"--out_dir={tmp_path / 'lm'}"])
    assert "lm (Transformer): last token" in capsys.readouterr().out

"""
Tests of the LM pipeline: data/prepare_lm.py, train_lm.py and the LM branch of sample.py. CPU, about a minute.

    python -m pytest tests/test_lm.py -q
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_lm
from checkpoint import load_checkpoint
from data import prepare_lm
from logs import read_log
from training import NonFiniteLoss, learning_rate, pick_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
# subprocesses: 2 threads, and Cog attention through the reference as on any CPU (not Triton's slow interpreter)
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "2"}
# a tiny Cogformer (3 layers: softmax, cog, softmax) that trains in milliseconds per step
TINY = ["--preset=demo", "--block_size=32", "--n_layer=3", "--n_head=2", "--n_embd=32", "--ffn_hidden=64",
        "--batch_size=8", "--eval_iters=2", "--log_interval=1"]


@pytest.fixture(scope="session")
def stdlib_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "pystdlib")
    prepare_lm.prepare_pystdlib(out)
    return out


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": {"source": "test"}}) + "\n")


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


def byte_tokens(texts):
    """What bytes tokenisation should give: each document's UTF-8 bytes, then end-of-text (0)."""
    return np.array([b for t in texts for b in list(t.encode("utf-8")) + [0]], dtype=np.uint16)


DOCS = ["def f(x):\n    return x\n", "héllo wörld", "import os\n", "class A:\n    pass\n", "x = 1\n", "print(2)\n"]


# -----------------------------------------------------------------------------
# data preparation


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepare_jsonl_bytes(tmp_path, num_proc):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:4])
    write_jsonl(tmp_path / "b.jsonl", DOCS[4:])
    out = tmp_path / "out"
    meta = prepare_lm.main([f"--files={tmp_path}/*.jsonl", f"--out_dir={out}", "--tokenizer=bytes",
                            "--val_fraction=0.5", f"--num_proc={num_proc}"])
    # every second document (1, 3, 5) is held out; each ends with the end-of-text byte 0
    assert (read_bin(out / "train.bin") == byte_tokens(DOCS[0::2])).all()
    assert (read_bin(out / "val.bin") == byte_tokens(DOCS[1::2])).all()
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["vocab_size"] == 256 and meta["eot_token"] == 0 and meta["tokenizer"] == "bytes"
    assert meta["train_tokens"] == len(byte_tokens(DOCS[0::2])) and meta["val_tokens"] == len(byte_tokens(DOCS[1::2]))
    assert meta["train_documents"] == 3 and meta["val_documents"] == 3 and meta["files"] == 2
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_txt_files_and_token_budget(tmp_path):
    for i, text in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare_lm.main([f"--files={tmp_path}/*.txt", f"--out_dir={out}", "--tokenizer=bytes",
                            "--val_fraction=0.5", "--max_tokens=60", "--num_proc=1"])
    # each of the 6 files gets a share of the budget proportional to its size: at most 60 tokens in all
    assert 50 <= meta["train_tokens"] + meta["val_tokens"] <= 60
    assert meta["train_tokens"] == len(read_bin(out / "train.bin"))
    assert read_bin(out / "train.bin")[:3].tolist() == list(b"def")


def test_prepare_rerun_is_idempotent_and_refuses_another_dataset(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    args = [f"--files={tmp_path}/a.jsonl", f"--out_dir={out}", "--tokenizer=bytes", "--val_fraction=0.5",
            "--num_proc=1"]
    prepare_lm.main(args)
    before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)}
    prepare_lm.main(args)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"already holds a different dataset[\s\S]*max_tokens"):
        prepare_lm.main(args + ["--max_tokens=10"])
    write_jsonl(tmp_path / "b.jsonl", DOCS)
    with pytest.raises(SystemExit, match="source"):
        prepare_lm.main([f"--files={tmp_path}/b.jsonl"] + args[1:])
    assert {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)} == before  # untouched


def test_prepare_failure_leaves_no_partial_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n{not json\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"b\.jsonl:2"):
        prepare_lm.main([f"--files={tmp_path}/*.jsonl", f"--out_dir={out}", "--tokenizer=bytes", "--num_proc=1"])
    assert os.listdir(out) == []
    # and a folder with someone else's train.bin but no meta.json is refused, not overwritten
    (out / "train.bin").write_bytes(b"\1\2")
    with pytest.raises(SystemExit, match="no meta.json"):
        prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={out}", "--tokenizer=bytes", "--num_proc=1"])
    assert (out / "train.bin").read_bytes() == b"\1\2"


def test_redpajama_path_streams_local_jsonl_through_datasets(tmp_path):
    """The RedPajama code path (datasets' generic json builder, streaming) on local files instead of the hub's."""
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "arxiv_sample.jsonl", DOCS[:3])
    write_jsonl(tmp_path / "book_sample.jsonl", DOCS[3:])
    sources = prepare_lm.hub_sources([str(tmp_path / "*_sample.jsonl")])
    assert [os.path.basename(name) for name, _, _ in sources] == ["arxiv_sample.jsonl", "book_sample.jsonl"]
    assert [size for _, size, _ in sources] == [os.path.getsize(tmp_path / f) for f in ("arxiv_sample.jsonl",
                                                                                       "book_sample.jsonl")]
    assert list(sources[1][2]()) == DOCS[3:]
    out = tmp_path / "out"
    source = f"{tmp_path}/book_sample.jsonl,{tmp_path}/arxiv_*.jsonl"  # as --source=... would name hub files
    meta = prepare_lm.main(["--dataset=redpajama", f"--source={source}", f"--out_dir={out}", "--tokenizer=bytes",
                            "--val_fraction=0.5", "--num_proc=2"])
    assert meta["source"] == f"redpajama: {source}" and meta["files"] == 2
    assert (read_bin(out / "train.bin") == byte_tokens(DOCS[0::2])).all()  # files in sorted order: arxiv, book
    assert (read_bin(out / "val.bin") == byte_tokens(DOCS[1::2])).all()


# a process with several live threads: torch's intra-op pool, and a Python thread blocked reading stdin, which holds
# the lock of stdin's buffer; a worker process forked now would inherit that lock held, and wait for it forever when
# it closes stdin (multiprocessing's workers do that first)
THREADED_PREPARE = """
import sys, threading, time
import torch
from data import prepare_lm
torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)
threading.Thread(target=sys.stdin.readline, daemon=True).start()
time.sleep(0.5)
prepare_lm.main(sys.argv[1:])
"""


def test_prepare_with_worker_processes_from_a_threaded_process(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS * 20)
    out = tmp_path / "out"
    stdin_read, stdin_write = os.pipe()  # stays open and empty: the thread keeps waiting
    proc = subprocess.Popen([sys.executable, "-c", THREADED_PREPARE, f"--files={tmp_path}/a.jsonl", f"--out_dir={out}",
                             "--tokenizer=bytes", "--val_fraction=0.5", "--num_proc=2"], cwd=REPO, env=ENV,
                            stdin=stdin_read, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its stuck workers
        proc.communicate()
        pytest.fail("data preparation with 2 worker processes hung in a process with live threads")
    finally:
        os.close(stdin_read)
        os.close(stdin_write)
    assert proc.returncode == 0, output
    assert (read_bin(out / "train.bin") == byte_tokens((DOCS * 20)[0::2])).all()


def test_gpt2_tokenizer_if_its_vocabulary_is_available(tmp_path):
    try:
        tok = prepare_lm.Tokenizer("gpt2")
    except SystemExit as err:
        pytest.skip(f"tiktoken's GPT-2 vocabulary cannot be fetched here: {err}")
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={out}", "--val_fraction=0.5", "--num_proc=2"])
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    train = read_bin(out / "train.bin")
    assert (train == 50256).sum() == 3 and train[-1] == 50256
    assert tok.decode(train.tolist()) == "<|endoftext|>".join(DOCS[0::2]) + "<|endoftext|>"


def test_bytes_tokenizer_round_trip():
    tok = prepare_lm.Tokenizer("bytes")
    assert tok.decode(tok.encode("héllo\0 wörld")) == "héllo wörld"  # NUL is reserved for end-of-text
    assert tok.decode(byte_tokens(["a", "b"]).tolist()) == "a<|endoftext|>b<|endoftext|>"


# -----------------------------------------------------------------------------
# training


def ckpt(out):
    return load_checkpoint(os.path.join(out, "ckpt.pt"))


def test_demo_preset_prepares_its_data_and_learns(tmp_path):
    data, out = tmp_path / "pystdlib", tmp_path / "run"
    train_lm.main(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20",
                          "--learning_rate=1e-2", "--warmup_iters=5"])
    assert json.loads((data / "meta.json").read_text())["tokenizer"] == "bytes"  # prepared on first use
    evals = [r for r in read_log(out / "log.jsonl") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] > 5.0  # about ln(256) at initialisation
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5
    c = ckpt(out)
    assert c["kind"] == "lm" and c["iter"] == 40 and c["meta"]["tokenizer"] == "bytes"
    assert c["model_config"]["vocab_size"] == 256 and c["model_config"]["attn"] == "cog"
    assert c["config"]["max_iters"] == 40 and c["best_val_loss"] == evals[-1]["val_loss"]
    assert {"model", "optimizer", "scaler", "rng", "data_rng"} <= set(c)
    assert (out / "loss.png").stat().st_size > 0


def test_softmax_baseline_and_vocab_from_meta(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS * 10)
    data, out = tmp_path / "data", tmp_path / "run"
    prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={data}", "--tokenizer=bytes", "--val_fraction=0.5",
                     "--num_proc=1"])
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 50257}))  # as GPT-2's BPE would say
    train_lm.main(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--attn=softmax"])
    c = ckpt(out)
    assert c["model_config"]["attn"] == "softmax" and c["iter"] == 2
    assert c["model_config"]["vocab_size"] == 50304  # padded up to a multiple of 64


def test_resume_is_bit_for_bit(tmp_path, stdlib_dir):
    """2N iterations in one go log exactly the same losses as N iterations, then N more resumed."""
    const_lr = ["--learning_rate=3e-3", "--min_lr=3e-3", "--warmup_iters=0", "--eval_interval=4"]
    common = TINY + const_lr + [f"--data_dir={stdlib_dir}"]
    train_lm.main(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=8"])
    train_lm.main(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=4"])
    assert ckpt(tmp_path / "b")["iter"] == 4
    train_lm.main(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=8", "--resume"])
    log_a, log_b = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    key = ("iter", "loss", "lr", "train_loss", "val_loss")
    assert [{k: r[k] for k in key if k in r} for r in log_a] == [{k: r[k] for k in key if k in r} for r in log_b]
    assert len([r for r in log_b if "loss" in r]) == 8
    a, b = ckpt(tmp_path / "a"), ckpt(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_learning_rate_warms_up_then_decays_by_the_cosine():
    lr, min_lr, warmup, max_iters = 1.0, 0.1, 4, 24
    want = [lr * (it + 1) / (warmup + 1) for it in range(warmup)]  # linear, never 0, reaching lr just after warmup
    want += [min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (max_iters - warmup))) * (lr - min_lr)
             for it in range(warmup, max_iters + 3)]
    want[max_iters + 1:] = [min_lr] * 2  # past max_iters: min_lr
    got = [learning_rate(it, lr, warmup, max_iters, min_lr) for it in range(max_iters + 3)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[warmup] == lr and got[max_iters] == pytest.approx(min_lr)
    assert learning_rate(100, lr, warmup) == lr  # no decay without max_iters: constant after warmup (U-ViT's)


def test_the_trainer_steps_with_the_schedule_s_learning_rate(tmp_path, stdlib_dir):
    train_lm.main(TINY + [f"--data_dir={stdlib_dir}", f"--out_dir={tmp_path}", "--max_iters=6", "--warmup_iters=3",
                          "--learning_rate=1e-3", "--min_lr=1e-4", "--eval_interval=100"])
    logged = [r["lr"] for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    assert logged == [learning_rate(it, 1e-3, 3, 6, 1e-4) for it in range(6)]


def fixed_batches(monkeypatch, module, rows):
    """module.get_batch serves consecutive micro-batches of rows to the training steps (gradients on), whatever their
    size; the evaluation's batches (no gradients) are rows' first ones."""
    served = []

    def get_batch(data_dir, split, batch_size, block_size, generator, device, ix=None):
        start = 0 if not torch.is_grad_enabled() else sum(served) % len(rows)
        if torch.is_grad_enabled():
            served.append(batch_size)
        chunk = rows[start:start + batch_size]
        return chunk[:, :-1], chunk[:, 1:]
    monkeypatch.setattr(module, "get_batch", get_batch)


def first_step_gradients(monkeypatch, module):
    """The gradients the trainer hands to its first optimizer step."""
    grads = {}
    real_step = module.optimizer_step

    def spy(model, optimizer, scaler, grad_clip):
        if not grads:
            grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
        real_step(model, optimizer, scaler, grad_clip)
    monkeypatch.setattr(module, "optimizer_step", spy)
    return grads


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch(tmp_path, stdlib_dir, monkeypatch):
    """grad_accum = 4 micro-batches of 2 rows: the gradients of one batch of 8, not 4 times them."""
    rows = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(0))
    runs = {}
    for grad_accum, batch_size in ((1, 8), (4, 2)):
        fixed_batches(monkeypatch, train_lm, rows)
        runs[grad_accum] = first_step_gradients(monkeypatch, train_lm)
        train_lm.main(TINY + [f"--data_dir={stdlib_dir}", f"--out_dir={tmp_path / str(grad_accum)}", "--max_iters=1",
                              f"--batch_size={batch_size}", f"--grad_accum={grad_accum}", "--grad_clip=0"])
    assert runs[1].keys() == runs[4].keys()
    for name in runs[1]:
        torch.testing.assert_close(runs[4][name], runs[1][name], rtol=1e-4, atol=1e-7, msg=name)
    loss = [[r["loss"] for r in read_log(tmp_path / str(n) / "log.jsonl") if "loss" in r] for n in (1, 4)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)  # the logged loss is the mean over the micro-batches


def test_sigterm_saves_and_resumes(tmp_path, stdlib_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_lm.py"] + TINY + [
        f"--data_dir={stdlib_dir}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until it trains
        if (out / "log.jsonl").exists() and '"loss"' in (out / "log.jsonl").read_text():  # a training step
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output  # saved, and the status a shell expects after SIGTERM (128 + 15)
    assert "SIGTERM received" in output and "stopped: saved" in output
    stopped_at = ckpt(out)["iter"]
    assert 0 < stopped_at < 100000
    train_lm.main(TINY + [f"--data_dir={stdlib_dir}", f"--out_dir={out}", f"--max_iters={stopped_at + 2}",
                          "--eval_interval=100000", "--resume"])
    iters = [r["iter"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert iters == list(range(stopped_at + 2))  # one history, no gap, no repeat
    assert ckpt(out)["iter"] == stopped_at + 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, stdlib_dir):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"at iteration [1-9].*last good checkpoint"):
        train_lm.main(TINY + [f"--data_dir={stdlib_dir}", f"--out_dir={out}", "--max_iters=20",
                              "--eval_interval=10", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0"])
    c = ckpt(out)
    assert c["iter"] == 0  # saved by the eval at iteration 0, before the blow-up
    assert all(torch.isfinite(v).all() for v in c["model"].values())


@pytest.mark.parametrize("preset,vocab,total", [("paper", 32000, 141_183_744), ("600m", 32000, 593_163_520),
                                                ("1b", 32000, 1_003_554_816), ("1b", 50304, 1_078_528_000),
                                                ("3b", 32000, 2_890_304_000)])
def test_larger_presets(preset, vocab, total):
    config = train_lm.TrainConfig(**{**train_lm.PRESETS[preset], "vocab_size": vocab})
    with torch.device("meta"):  # the architecture without allocating its weights
        model = train_lm.Cogformer(pick_fields(config, train_lm.CogformerConfig))
    assert model.num_params()["total"] == total
    assert config.n_embd // config.n_head in (64, 128) and config.ffn_hidden == 3 * config.n_embd
    assert config.batch_size * config.block_size * config.grad_accum in (2 ** 19, 2 ** 20)  # 0.5M or 1M tokens


def test_config_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key --bogus"):
        train_lm.main(["--bogus=1"])
    with pytest.raises(SystemExit, match=r"python data/prepare_lm\.py --dataset=redpajama --out_dir=.*nothing"):
        train_lm.main([f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'run'}"])


def test_cli_reports_missing_dataset(tmp_path):
    result = subprocess.run([sys.executable, "train_lm.py", f"--data_dir={tmp_path / 'redpajama'}"], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"python data/prepare_lm.py --dataset=redpajama --out_dir={tmp_path / 'redpajama'}" in result.stderr


# -----------------------------------------------------------------------------
# sampling


def test_sample_prints_text(tmp_path, stdlib_dir):
    out = tmp_path / "run"
    train_lm.main(TINY + [f"--data_dir={stdlib_dir}", f"--out_dir={out}", "--max_iters=3"])
    (tmp_path / "prompt.txt").write_text("import os\n")
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                             "--num_samples=2", "--max_new_tokens=40", "--top_k=20", "--device=cpu"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")[:-1]
    assert len(samples) == 2
    assert all(s.startswith("import os\n") and len(s.encode()) > len("import os\n") + 10 for s in samples)
    with pytest.raises(SystemExit, match="unknown config key --temp"):
        import sample
        sample.main([f"--out_dir={out}", "--temp=1"])


def test_deterministic_flag(tmp_path, stdlib_dir, monkeypatch):
    """--deterministic switches on PyTorch's deterministic algorithms, which the Cog kernel follows (its two-pass
    backward: test_kernel.py); without the flag nothing is switched."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append((mode, kw)))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the flag sets it too: restored after the test
    args = TINY + [f"--data_dir={stdlib_dir}", "--max_iters=1", "--eval_interval=100"]
    train_lm.main(args + [f"--out_dir={tmp_path / 'a'}"])
    assert calls == []
    train_lm.main(args + [f"--out_dir={tmp_path / 'b'}", "--deterministic"])
    assert calls == [(True, {"warn_only": True})]

"""
Tests of sample.py's contract with a checkpoint: every setting sampling needs (noise schedule, prediction, tokenizer,
model config) comes from it, a flag that contradicts it is an error that names the key, and which flags apply to
which kind of model is stated in code. Tiny models, a few seconds. Run with `python -m pytest -q tests/test_sample.py`.
"""

import dataclasses
import os

import pytest
import torch

import diffusion
import sample
import train_diffusion
import train_lm
from checkpoint import load_checkpoint, save_checkpoint
from diffusion import SD, generate, noise_predictor
from model import Cogformer, CogformerConfig, UViC, UViCConfig
from test_diffusion import TINY

torch.set_num_threads(min(2, torch.get_num_threads()))


def same_file(a, b):
    with open(a, "rb") as f0, open(b, "rb") as f1:
        return f0.read() == f1.read()


def test_an_unconditional_model_is_sampled_on_the_schedule_it_was_trained_on(tmp_path):
    out = str(tmp_path / "run")
    train_diffusion.main(["--preset=demo", *TINY, "--noise_schedule=sd", "--max_iters=2", "--eval_interval=2",
                          f"--out_dir={out}"])
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert diffusion.checkpoint_schedule(ckpt) == "sd" and diffusion.checkpoint_prediction(ckpt) == "v"
    got = str(tmp_path / "got.png")
    sample.main([f"--out_dir={out}", "--steps=3", "--num_samples=4", f"--output={got}"])  # default: DPM-Solver++
    # what train_diffusion.py's own evaluation draws: DPM-Solver++ on the discrete schedule, v-prediction
    ema = UViC(UViCConfig(**ckpt["model_config"]))
    ema.load_state_dict(ckpt["ema"])
    expected = str(tmp_path / "expected.png")
    diffusion.save_grid(generate(noise_predictor(ema.eval(), prediction="v", schedule=SD), 4, (3, 8, 8), "dpm++", 3,
                                 1337, "cpu", schedule=SD), expected)
    assert same_file(got, expected)
    sample.main([f"--out_dir={out}", "--steps=3", "--num_samples=4"])  # the default name says the sampler
    assert same_file(os.path.join(out, "samples_dpmpp3.png"), expected)
    # the VP-SDE's samplers contradict the checkpoint: an error naming the key, before anything is drawn
    for sampler in ("em", "dpm"):
        with pytest.raises(SystemExit, match=f"--sampler={sampler}: .* was trained with noise_schedule=sd; "
                                             "use dpm\\+\\+"):
            sample.main([f"--out_dir={out}", f"--sampler={sampler}", "--steps=3", "--num_samples=4",
                         f"--output={tmp_path / 'never.png'}"])
    assert not os.path.exists(tmp_path / "never.png")
    # a VP model may take DPM-Solver++ too, on its own schedule
    vp = str(tmp_path / "vp")
    train_diffusion.main(["--preset=demo", *TINY, "--max_iters=1", "--eval_interval=1", f"--out_dir={vp}"])
    sample.main([f"--out_dir={vp}", "--sampler=dpm++", "--steps=2", "--num_samples=2"])
    assert os.path.exists(os.path.join(vp, "samples_dpmpp2.png"))
    with pytest.raises(SystemExit, match="--sampler must be one of dpm, em, dpm\\+\\+, got 'ddim'"):
        sample.main([f"--out_dir={vp}", "--sampler=ddim"])


def lm_run(path, tokenizer="bytes"):
    torch.manual_seed(0)
    model = Cogformer(CogformerConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16, ffn_hidden=32))
    os.makedirs(path)
    save_checkpoint({"kind": "lm", "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "config": {}, "iter": 0, "meta": {"tokenizer": tokenizer, "vocab_size": 256}},
                    os.path.join(path, "ckpt.pt"))
    return str(path)


def test_the_tokenizer_comes_from_the_checkpoint(tmp_path, capsys):
    import analyze
    run = lm_run(tmp_path / "lm")
    args = [f"--out_dir={run}", "--start=ab", "--num_samples=1", "--max_new_tokens=3", "--temperature=0"]
    sample.main(args)
    first = capsys.readouterr().out
    sample.main(args + ["--tokenizer=bytes"])  # the same as the checkpoint's: allowed, the same text
    assert capsys.readouterr().out == first
    with pytest.raises(SystemExit, match=r"--tokenizer=gpt2: .*ckpt.pt says tokenizer=bytes; leave --tokenizer out"):
        sample.main(args + ["--tokenizer=gpt2"])
    with pytest.raises(SystemExit, match=r"--tokenizer=gpt2: .*ckpt.pt says tokenizer=bytes; leave --tokenizer out"):
        analyze.main(["attention", f"--out_dir={run}", "--tokenizer=gpt2", f"--png={tmp_path / 'a.png'}"])


def test_a_checkpoint_is_mapped_on_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """A large run's optimizer state (twice its weights in fp32) must not land on the GPU, or in memory at all."""
    calls = []

    def spy(path, map_location="cpu", mmap=False):
        calls.append((map_location, mmap))
        return load_checkpoint(path, map_location, mmap)
    monkeypatch.setattr(sample, "load_checkpoint", spy)
    sample.main([f"--out_dir={lm_run(tmp_path / 'lm')}", "--num_samples=1", "--max_new_tokens=2"])
    assert calls == [("cpu", True)]


def test_sample_and_train_lm_default_to_the_same_run_folder():
    assert sample.SampleConfig.out_dir == train_lm.TrainConfig.out_dir


def test_flag_kinds_are_stated_in_code_for_every_flag():
    listed = [f for _, flags in sample.FLAG_KINDS.values() for f in flags] + list(sample.SHARED_FLAGS)
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(sample.SampleConfig))  # each exactly once
    assert sample.flags_for_other_kinds({"start", "cfg_scale", "seed"}, "diffusion") == {
        "start": "language models", "cfg_scale": "text-to-image models"}
    assert sample.flags_for_other_kinds({"sampler", "prompt", "device"}, "text-to-image") == {}


def test_attn_is_for_released_files_only(tmp_path):
    with pytest.raises(SystemExit, match="--attn=softmax: for --init_from only"):
        sample.main([f"--out_dir={tmp_path}", "--attn=softmax"])


def test_new_outputs_never_replace_earlier_ones(tmp_path):
    """A second grid with the same name goes beside the first (samples_dpm2-2.png), which stays as it was."""
    out = str(tmp_path / "run")
    train_diffusion.main(["--preset=demo", *TINY, "--max_iters=1", "--eval_interval=1", f"--out_dir={out}"])
    first = os.path.join(out, "samples_dpm2.png")
    sample.main([f"--out_dir={out}", "--steps=2", "--num_samples=2"])
    before = open(first, "rb").read()
    sample.main([f"--out_dir={out}", "--steps=2", "--num_samples=2", "--seed=7"])
    assert open(first, "rb").read() == before and os.path.exists(os.path.join(out, "samples_dpm2-2.png"))

"""
Tests of analyze.py on tiny hand-made checkpoints (no training, no network): the attention statistics on a model whose
weights are set by hand, the collapse probes, the eval adapter's log-likelihoods, and the command line.
"""

import json
import math
import os
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import analyze
from checkpoint import save_checkpoint
from conftest import write_eval_task
from data.prepare_lm import Tokenizer
from model import Cogformer, CogformerConfig

torch.set_num_threads(min(2, torch.get_num_threads()))
BYTES = Tokenizer("bytes")


def tiny_model(attn="cog", block_size=32, seed=0, n_layer=3, n_head=2, n_embd=16):
    """A small byte-level Cogformer with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = CogformerConfig(block_size=block_size, vocab_size=256, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          ffn_hidden=32, attn=attn)
    model = Cogformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    return model.eval()


def save_run(path, model, source="pystdlib: test", log=None):
    os.makedirs(path, exist_ok=True)
    save_checkpoint({"kind": "lm", "model": model.state_dict(), "model_config": asdict(model.config), "config": {},
                     "iter": 0, "best_val_loss": 0.0,
                     "meta": {"tokenizer": "bytes", "vocab_size": 256, "source": source}}, os.path.join(path, "ckpt.pt"))
    if log is not None:
        with open(os.path.join(path, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in log)
    return str(path)


# -----------------------------------------------------------------------------
# attention


def hand_built_model():
    """3 layers (softmax, cog, softmax), 2 heads of dim 4, no RoPE rotation, tokens 0..3 embedded as unit vectors.
    Layer 0 adds nothing to the residual, so layer 1 sees x_t = sqrt(8) e_t (RMSNorm with eps 0). Its head 0 gives
    the last token (3) the logits s = q.k / 2 = (-1, -2, 0.5, -0.5) over the four keys; head 1 gives it logit 1 on each."""
    model = tiny_model(n_layer=3, n_head=2, n_embd=8)
    for block in model.blocks:
        block.attn_norm.eps = block.mlp_norm.eps = 0.0
    with torch.no_grad():
        model.rope_cos.fill_(1.0)
        model.rope_sin.zero_()
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[torch.arange(4), torch.arange(4)] = 1.0
        b0 = model.blocks[0]
        b0.attn.qkv.weight[:16].zero_()  # q = k = 0: uniform softmax weights
        b0.attn.proj.weight.zero_()
        b0.mlp.proj.weight.zero_()
        w = model.blocks[1].attn.qkv.weight  # rows: q (head 0: 0-3, head 1: 4-7), k (8-15), v (16-23)
        w[:16].zero_()
        r8 = 1 / math.sqrt(8)
        w[0, 3] = w[4, 3] = r8  # the last token's query is (1, 0, 0, 0) in both heads
        w[8, :4] = torch.tensor([-2.0, -4.0, 1.0, -1.0]) * r8  # head 0 keys: q.k = 2 s
        w[12, :4] = 2.0 * r8  # head 1 keys: q.k = 2 for every token
    return model


def test_attention_stats_match_hand_computed_weights():
    model = hand_built_model()
    maps, err = analyze.attention_maps(model, torch.tensor([[0, 1, 2, 3]]))
    assert err < 1e-5
    e = [math.exp(1.0), math.exp(2.0), math.exp(0.5), math.exp(0.5)]
    z = sum(e)
    head0 = torch.tensor([-e[0] / z, -e[1] / z, e[2] / z, -e[3] / z])
    torch.testing.assert_close(maps[1][0, 0, -1], head0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[1][0, 1, -1], torch.full((4,), 0.25), atol=1e-5, rtol=1e-5)
    stats = analyze.layer_stats(maps[1][0, :, -1])
    assert stats["neg_share"] == pytest.approx((e[0] + e[1] + e[3]) / z / 2, abs=1e-5)
    assert stats["min_weight"] == pytest.approx(-e[1] / z, abs=1e-5)
    assert stats["sink"] == pytest.approx((e[0] / z + 0.25) / 2, abs=1e-5)  # |weight| on token 0
    # layer 0 is softmax with q = k = 0: uniform, nothing negative
    stats0 = analyze.layer_stats(maps[0][0, :, -1])
    assert stats0 == pytest.approx({"neg_share": 0.0, "min_weight": 0.0, "sink": 0.25}, abs=1e-6)


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_recomputed_weights_reproduce_layer_outputs(attn):
    model = tiny_model(attn=attn, n_layer=4)
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    maps, err = analyze.attention_maps(model, idx)
    assert err < 1e-5
    assert [w.shape for w in maps] == [(2, 2, 20, 20)] * 4
    for w, block in zip(maps, model.blocks):
        assert torch.all(w.triu(1) == 0)  # causal
        row_mass = w.abs().sum(-1) if block.attn.kind == "cog" else w.sum(-1)
        torch.testing.assert_close(row_mass, torch.ones_like(row_mass))
    assert (maps[1] < 0).any() == (attn == "cog")


def test_a_wrong_recomputation_is_detected(monkeypatch):
    model = tiny_model()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(analyze, "attention_weights", lambda kind, q, k: torch.softmax(
        q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1))  # no causal mask, no sign
    assert analyze.attention_maps(model, idx)[1] > 1e-3


# -----------------------------------------------------------------------------
# collapse probes


def test_probe_prompts_exact_strings_and_lengths():
    for n in (1, 5, 37):
        a, b = analyze.probe_pair(BYTES, "count_ones", n)
        assert BYTES.decode(a) == "How many ones are in the following sequences?" + "1" * (n + 1)
        assert BYTES.decode(b) == "How many ones are in the following sequences?" + "1" * n
        assert (len(a), len(b)) == (45 + n + 1, 45 + n)
        a, b = analyze.probe_pair(BYTES, "find_a_zero", n)
        assert BYTES.decode(a) == "Is there a zero in the following sequences?" + "0" + "1" * n
        assert BYTES.decode(b) == "Is there a zero in the following sequences?" + "1" + "1" * n
        assert len(a) == len(b) == 43 + n + 1
        assert [i for i in range(len(a)) if a[i] != b[i]] == [len(a) - 1 - n]  # one token, n tokens before the end


def test_probe_lengths():
    assert analyze.probe_lengths(2048, 10) == [200, 400, 600, 800, 1000, 2000]
    assert analyze.probe_lengths(1100, 10) == [200, 400, 600, 800, 1000]
    ns = analyze.probe_lengths(256, 45)  # the demo: n_max = 210, the paper's proportions of it
    assert ns == [21, 42, 63, 84, 105, 210] and 45 + ns[-1] + 1 == 256


def test_collapse_metric_on_a_tiny_model():
    model = tiny_model(block_size=64)
    ns = analyze.probe_lengths(64, 45)
    res = analyze.collapse_probe(model, BYTES, ns)
    assert set(res) == {"count_ones", "find_a_zero"}
    for task, r in res.items():
        assert r["n"] == ns and len(r["raw"]) == len(r["normalised"]) == len(ns)
        assert r["normalised"][0] == 1.0
        assert r["normalised"] == pytest.approx([x / r["raw"][0] for x in r["raw"]])
        # the raw metric from a direct pass through the blocks
        a, b = analyze.probe_pair(BYTES, task, ns[-1])
        states = []
        for ids in (a, b):
            x = model.tok_emb(torch.tensor([ids]))
            for block in model.blocks:
                x = block(x, model.rope_cos[:len(ids)], model.rope_sin[:len(ids)])
            states.append(model.norm(x)[0, -1])
        diff = (states[0] - states[1]).abs().view(2, 8)  # 2 heads of 8 dims
        assert r["raw"][-1] == pytest.approx(diff.max(dim=1).values.mean().item(), rel=1e-5)


# -----------------------------------------------------------------------------
# eval adapter


def direct_logprob(model, full, n_cont):
    """Log-probability and greediness of the last n_cont tokens of full, one model call per token, no batching."""
    total, greedy = 0.0, True
    for p in range(len(full) - n_cont, len(full)):
        logp = F.log_softmax(model(torch.tensor([full[:p]]))[0][0, -1], dim=-1)
        total += logp[full[p]].item()
        greedy &= logp.argmax().item() == full[p]
    return total, greedy


@pytest.fixture(scope="module")
def scorer():
    return analyze.Scorer(tiny_model(block_size=16, seed=3), BYTES, batch_size=3)


def test_loglikelihood_matches_direct_computation(scorer):
    pairs = [("def f(x):", " return"), ("", "import os"), ("a", "b"), ("class A:\n    ", "pass"),
             ("x" * 40 + "y = ", "1")]  # the last one is left-truncated to block_size + 1 tokens
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        cut = len(ctx.rstrip())  # the harness's convention: trailing whitespace is scored with the continuation
        ctx, cont = ctx[:cut], ctx[cut:] + cont
        full = (BYTES.encode(ctx) or [BYTES.eot]) + BYTES.encode(cont)
        want = direct_logprob(scorer.model, full[-17:], len(cont))
        assert logprob == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    one_by_one = analyze.Scorer(scorer.model, BYTES, batch_size=1).loglikelihood(pairs)  # no padding
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in one_by_one], abs=1e-4)


def test_truncation_and_greedy(scorer):
    ctx = list(range(65, 65 + 30))  # 30 tokens, longer than block_size 16
    greedy = scorer.model.generate(torch.tensor([ctx[-14:]]), 3, temperature=0)[0, -3:].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % 256]
    (lp_g, is_g), (lp_o, is_o), (lp_short, _) = scorer.score_tokens([(ctx, greedy), (ctx, other), (ctx[-14:], greedy)])
    assert is_g and not is_o
    assert lp_g == pytest.approx(lp_short, abs=1e-5)  # only the last block_size + 1 tokens count
    assert lp_g == pytest.approx(direct_logprob(scorer.model, ctx[-14:] + greedy, 3)[0], abs=1e-4)
    with pytest.raises(ValueError, match="longer than block_size"):
        scorer.score_tokens([([1], list(range(17)))])


def test_loglikelihood_rolling(scorer):
    assert scorer.loglikelihood_rolling(["short"]) == pytest.approx([scorer.loglikelihood([("", "short")])[0][0]])
    text = "".join(chr(97 + i % 26) for i in range(40))  # 41 ids with end-of-text: three windows of <= 16 inputs
    ids = [BYTES.eot] + BYTES.encode(text)
    want = sum(direct_logprob(scorer.model, ids[c0:e], e - s)[0] for c0, s, e in [(0, 1, 17), (16, 17, 33), (24, 33, 41)])
    assert scorer.loglikelihood_rolling([text, "short"])[0] == pytest.approx(want, abs=1e-4)


def test_harness_adapter(scorer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    lm = analyze.harness_lm(scorer)
    reqs = [Instance("loglikelihood", {}, ("def f(x):", " return"), 0), Instance("loglikelihood", {}, ("", "ab"), 1)]
    assert lm.loglikelihood(reqs) == scorer.loglikelihood([r.args for r in reqs])
    text = "".join(chr(97 + i % 26) for i in range(40))
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(BYTES.encode(text), BYTES.eot, 16, 1)]
    want = sum(lp for lp, _ in scorer.score_tokens(windows))
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)]) == pytest.approx([want])


def test_eval_end_to_end_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    docs = [{"q": "def f(x):\n    return", "choices": [" x", " y"], "label": 0},
            {"q": "import", "choices": [" os", " sys", " re"], "label": 1},
            {"q": "for i in", "choices": [" range(3):", " x:"], "label": 0}]
    tasks = write_eval_task(tmp_path, "toy_nanocog", docs)
    model = tiny_model(block_size=32, seed=4)
    run = save_run(tmp_path / "run", model)
    table = analyze.main(["eval", f"--out_dir={run}", "--tasks=toy_nanocog", f"--include_path={tasks}"])
    scorer = analyze.Scorer(model, BYTES)
    right = [max(range(len(d["choices"])), key=lambda c: scorer.loglikelihood([(d["q"], d["choices"][c])])[0][0])
             == d["label"] for d in docs]
    assert table == {"run (Cogformer)": {"toy_nanocog": pytest.approx(100 * sum(right) / len(docs))}}
    assert json.load(open(tmp_path / "run" / "eval.json"))["tasks"] == table["run (Cogformer)"]


# -----------------------------------------------------------------------------
# command line


def test_cli_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="unknown subcommand 'plot'"):
        analyze.main(["plot", "--out_dir=x"])
    with pytest.raises(SystemExit, match="usage"):
        analyze.main([])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        analyze.main(["attention", f"--out_dir={tmp_path / 'missing'}"])
    with pytest.raises(SystemExit, match="--out_dir=DIR"):
        analyze.main(["collapse"])
    with pytest.raises(SystemExit, match="unknown config key --tasks"):
        analyze.main(["compare", "--out_dir=x", "--tasks=piqa"])
    run = save_run(tmp_path / "run", tiny_model())
    with pytest.raises(SystemExit, match="no such file"):
        analyze.main(["attention", f"--out_dir={run}", f"--text={tmp_path / 'missing.txt'}"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install lm-eval"):
        analyze.main(["eval", f"--out_dir={tmp_path}"])


def test_cli_end_to_end(tmp_path):
    log = lambda v: [{"iter": 0, "loss": 5.5}, {"iter": 10, "loss": 3.0, "val_loss": v + 0.5}, {"iter": 20, "val_loss": v}]
    cog = save_run(tmp_path / "cog", tiny_model("cog", block_size=64), log=log(2.0))
    cog2 = save_run(tmp_path / "cog2", tiny_model("cog", block_size=64, seed=1), log=log(2.2))
    soft = save_run(tmp_path / "soft", tiny_model("softmax", block_size=64), log=log(2.4))
    runs = analyze.main(["attention", f"--out_dirs={cog},{soft}", f"--png={tmp_path / 'att.png'}"])
    assert [len(r["layers"]) for r in runs] == [3, 3] and len(runs[0]["tokens"]) == 64  # the code, cut to the context
    assert runs[1]["layers"][1]["neg_share"] == 0.0 and runs[0]["layers"][1]["neg_share"] > 0.0
    assert json.load(open(tmp_path / "cog" / "att.json"))[0]["layers"] == runs[0]["layers"]
    res = analyze.main(["collapse", f"--out_dir={cog},{soft}", f"--png={tmp_path / 'col.png'}"])
    assert res[0]["count_ones"]["n"] == analyze.probe_lengths(64, 45)
    _, summary = analyze.main(["compare", f"--out_dirs={cog},{cog2},{soft}", f"--png={tmp_path / 'cmp.png'}"])
    assert summary["cog"]["mean"] == pytest.approx(2.1) and summary["cog"]["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert summary["softmax"] == pytest.approx({"runs": 1, "mean": 2.4, "std": 0.0, "min": 2.4, "max": 2.4})
    if analyze.pyplot() is not None:
        assert all(os.path.getsize(tmp_path / f) > 1000 for f in ("att.png", "col.png", "cmp.png"))


def test_requirements_name_the_optional_packages_the_tests_need():
    """lm-eval (the eval adapter's tests) and sentencepiece (the Llama-2 tokenizer file's) are installed with the rest,
    so that a full run of the suite tests them instead of skipping them."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")) as f:
        names = {line.split("#")[0].strip().split(">")[0].split("=")[0].strip().lower() for line in f}
    assert {"lm-eval", "sentencepiece"} <= names

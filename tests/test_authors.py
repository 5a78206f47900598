"""
Tests of the authors' released LM format (trestad/CogAttn) in nanoCog: authors.load_cogformer against an independent
forward pass written here from their conventions, the Llama-2 tokenizer path, and --init_from in sample.py,
analyze.py and train_lm.py. Small random checkpoints in their layout, a tiny tokenizer built on the spot: no network.
"""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import analyze
import train_lm
from authors import authors_to_nanocog, load_cogformer
from checkpoint import load_checkpoint
from conftest import write_eval_task
from data import prepare_lm
from logs import read_log
from model import document_ids

torch.set_num_threads(min(2, torch.get_num_threads()))
BOS, EOS = 1, 2  # Llama-2's


def authors_checkpoint(attn_type="np", vocab=128, n_layers=4, dim=16, n_heads=2, hidden=24, seed=0, recipe=1,
                       max_seq_length=64):
    """A random checkpoint in the authors' layout: {"model_cfg", "model"}, projections stored (in, out), their
    buffers included. Weights are large enough for attention far from uniform."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.4
    head_dim = dim // n_heads
    sd = {"embedding.weight": rand(vocab, dim), "norm.weight": 1 + rand(dim) / 4, "output.weight": rand(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd.update({p + f"attention.{w}": rand(dim, dim) for w in ("qw", "kw", "vw", "ow")})
        sd.update({p + "attention_norm.weight": 1 + rand(dim) / 4, p + "ffn_norm.weight": 1 + rand(dim) / 4})
        sd.update({p + "ffn.shared_experts.0.gw": rand(dim, hidden), p + "ffn.shared_experts.0.pw": rand(dim, hidden),
                   p + "ffn.shared_experts.0.ow": rand(hidden, dim)})
    # their RoPE table (a buffer in their state dict): e^(i t f_j) for 2 * max_seq_length positions, in complex64
    angles = torch.outer(torch.arange(2 * max_seq_length),
                         1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    sd["freqs_cis"] = torch.polar(torch.ones_like(angles), angles)
    sd["shortcut_bar"] = torch.zeros(4095)
    cfg = {"vocab_size": vocab, "n_layers": n_layers, "max_seq_length": max_seq_length, "dim": dim, "n_heads": n_heads,
           "head_dim": head_dim, "hidden_dim": hidden, "norm_eps": 1e-6, "attn_type": attn_type,
           "shared_expert_recipe": recipe}
    return {"model_cfg": cfg, "model": sd}


def authors_forward(ckpt, tokens, bos_mask=False, their_float32=True):
    """Their forward pass in float64, written from their Cogformer/model.py and attention.py conventions (not from
    ours): x @ W projections, RoPE rotating the pairs (2i, 2i+1) of each head as complex numbers by their table
    freqs_cis, RMSNorm, SwiGLU (x @ gw) * silu(x @ pw) @ ow, softmax in the first and last layer of an "np" model.
    their_float32: with their casts (RMSNorm and RoPE in float32 whatever the dtype, the table in complex64); else
    all in float64, the table from the same float32 angles. bos_mask: their document mask (cumsum(tokens == BOS)
    equal, and causal), else plain causal."""
    cfg, sd = ckpt["model_cfg"], {k: v.double() for k, v in ckpt["model"].items() if k != "freqs_cis"}
    B, T = tokens.shape
    nh, hd, L = cfg["n_heads"], cfg["head_dim"], cfg["n_layers"]
    work = torch.float32 if their_float32 else torch.float64
    turn = ckpt["model"]["freqs_cis"][:T]  # complex64 e^(i t f_j)
    if not their_float32:  # their float32 angles t * f_j, turned into complex128
        angles = torch.outer(torch.arange(T), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)).double()
        turn = torch.polar(torch.ones_like(angles), angles)

    def rms(x, w):  # normalised in float32 (theirs "force fp32"), then scaled in x's dtype
        xf = x.to(work)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"])).type_as(x) * w

    def rope(t):  # (B, T, nh, hd): consecutive pairs as complex numbers turned by e^(i t f_j)
        z = torch.view_as_complex(t.to(work).reshape(B, T, nh, hd // 2, 2).contiguous())
        return torch.view_as_real(z * turn[None, :, None, :]).reshape(B, T, nh, hd).type_as(t)

    visible = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    if bos_mask:
        doc = torch.cumsum(tokens == BOS, dim=-1)
        visible = visible & (doc[:, :, None] == doc[:, None, :])
    x = sd["embedding.weight"][tokens]
    for i in range(L):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + f"attention.{w}"] for w in ("qw", "kw", "vw"))
        q, k, v = rope(q.view(B, T, nh, hd)), rope(k.view(B, T, nh, hd)), v.view(B, T, nh, hd)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if cfg["attn_type"] == "vanilla" or i in (0, L - 1):
            w = torch.softmax(s.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        else:
            w = torch.sign(s) * torch.softmax(s.abs().masked_fill(~visible[:, None], float("-inf")), dim=-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, T, nh * hd) @ sd[p + "attention.ow"]
        h = rms(x, sd[p + "ffn_norm.weight"])
        e = p + "ffn.shared_experts.0."
        x = x + ((h @ sd[e + "gw"]) * F.silu(h @ sd[e + "pw"])) @ sd[e + "ow"]
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].t()


def float64_rope(model):
    """Our RoPE tables from float64 cos and sin of the same float32 angles (the tables are float32 by design)."""
    hd = model.config.n_embd // model.config.n_head
    angles = torch.outer(torch.arange(model.config.block_size), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.cat([angles, angles], dim=-1).double()
    model.rope_cos, model.rope_sin = angles.cos(), angles.sin()
    return model


def tokens(B, T, vocab=128, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def save(tmp_path, ckpt, name="cog_ckpt_test.pt"):
    path = str(tmp_path / name)
    torch.save(ckpt, path)
    return path


# -----------------------------------------------------------------------------
# the conversion


@pytest.mark.parametrize("attn_type,kinds", [("np", ["softmax", "cog", "cog", "softmax"]),
                                             ("vanilla", ["softmax"] * 4)])
def test_converted_model_gives_their_logits(tmp_path, attn_type, kinds):
    ckpt = authors_checkpoint(attn_type)
    model = load_cogformer(save(tmp_path, ckpt))
    assert not model.training and [b.attn.kind for b in model.blocks] == kinds
    assert model.config.block_size == 64 and model.config.ffn_hidden == 24
    idx = tokens(2, 23)
    want = authors_forward(ckpt, idx, their_float32=False)
    got, _ = float64_rope(model.double())(idx)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # the conversion is exact
    assert (want - want.mean(-1, keepdim=True)).abs().max() > 1.0  # the logits are far from flat: a real check
    # in float32 as they ran it (their casts, their complex64 table): float32 rounding apart
    got32, _ = load_cogformer(ckpt)(idx)
    torch.testing.assert_close(got32.double(), authors_forward(ckpt, idx), rtol=1e-4, atol=1e-4)


def test_every_key_is_used(tmp_path):
    ckpt = authors_checkpoint()
    idx = tokens(1, 9)
    base, _ = load_cogformer(ckpt).double()(idx)
    for key, value in ckpt["model"].items():
        if key in ("freqs_cis", "shortcut_bar"):
            continue
        changed = {**ckpt, "model": {**ckpt["model"], key: value + 0.3 * torch.ones_like(value)}}
        logits, _ = load_cogformer(changed).double()(idx)
        assert (logits - base).abs().max() > 1e-6, f"{key} does not reach the logits"


def test_kv_cache_generation_is_their_greedy_decoding(tmp_path):
    ckpt = authors_checkpoint()
    model = load_cogformer(save(tmp_path, ckpt))
    idx = tokens(2, 7)
    out = model.generate(idx, 20, temperature=0)  # KV cache, float32
    seq = idx.clone()
    for _ in range(20):  # greedy decoding with their full forward at every step
        seq = torch.cat([seq, authors_forward(ckpt, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_doc_mask_is_their_bos_mask(tmp_path):
    ckpt = authors_checkpoint()
    model = float64_rope(load_cogformer(ckpt).double())
    idx = tokens(2, 20)
    idx[0, [0, 6, 13]] = BOS
    idx[1, [4, 5]] = BOS
    got, _ = model(idx, doc_ids=document_ids(idx, BOS))
    torch.testing.assert_close(got, authors_forward(ckpt, idx, bos_mask=True, their_float32=False), rtol=1e-12,
                               atol=1e-12)


def test_block_size_and_expert_recipes():
    model = load_cogformer(authors_checkpoint(), block_size=32)
    assert model.config.block_size == 32 and model.rope_cos.shape[0] == 32
    # several "shared experts": hidden_dim is split by the recipe, their forward runs expert 0 only
    ckpt = authors_checkpoint(hidden=36, recipe=[2, 1])
    extra = {f"layers.{i}.ffn.shared_experts.1.{w}": torch.randn(*shape) for i in range(4)
             for w, shape in (("gw", (16, 12)), ("pw", (16, 12)), ("ow", (12, 16)))}
    with pytest.raises(ValueError, match=r"has shape \(16, 36\), model_cfg implies \(16, 24\)"):
        authors_to_nanocog(ckpt)
    for i in range(4):
        for w in ("gw", "pw"):
            ckpt["model"][f"layers.{i}.ffn.shared_experts.0.{w}"] = torch.randn(16, 24)
        ckpt["model"][f"layers.{i}.ffn.shared_experts.0.ow"] = torch.randn(24, 16)
    ckpt["model"].update(extra)
    config, _ = authors_to_nanocog(ckpt)
    assert config.ffn_hidden == 24


def bad(edit):
    ckpt = authors_checkpoint()
    edit(ckpt)
    return ckpt


@pytest.mark.parametrize("ckpt,message", [
    (bad(lambda c: c["model"].pop("layers.2.attention.kw")), r"missing keys \['layers.2.attention.kw'\]"),
    (bad(lambda c: c["model"].update(bias=torch.zeros(3))), r"unexpected keys \['bias'\]"),
    (bad(lambda c: c["model"].update({"layers.4.attention.qw": torch.zeros(16, 16)})), "unexpected keys"),
    (bad(lambda c: c["model"].update({"layers.1.ffn_norm.weight": torch.ones(17)})),
     r"layers.1.ffn_norm.weight has shape \(17,\), model_cfg implies \(16,\)"),
    (bad(lambda c: c["model"].update({"output.weight": torch.ones(100, 16)})), r"output.weight has shape \(100, 16\)"),
    (bad(lambda c: c["model_cfg"].update(attn_type="sigmoid")), "unknown attn_type 'sigmoid'"),
    (bad(lambda c: c["model_cfg"].update(head_dim=4)), r"n_heads \* head_dim = 2 \* 4 is not dim = 16"),
    (bad(lambda c: c["model_cfg"].pop("norm_eps")), "model_cfg lacks norm_eps"),
    ({"model": {}}, "not the authors' LM format"),
    ({"kind": "lm", "model": {}, "model_config": {}}, "not the authors' LM format"),
])
def test_wrong_checkpoints_are_clear_errors(tmp_path, ckpt, message):
    with pytest.raises(ValueError, match=message):
        load_cogformer(save(tmp_path, ckpt))


class RunsCode:
    """A pickle that, unpickled without weights_only, would create the file named by path."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model_cfg": RunsCode(str(marker)), "model": {}}, f, protocol=2)
    with pytest.raises(ValueError, match="cannot read .*refusing to load"):
        load_cogformer(str(path))
    assert not marker.exists()
    with pytest.raises(ValueError, match="no checkpoint file at"):
        load_cogformer(str(tmp_path / "missing.pt"))


# -----------------------------------------------------------------------------
# the Llama-2 tokenizer (a tiny stand-in with Llama-2's conventions: sentencepiece-style "▁" pieces, single digits,
# <unk> 0, <s> 1, </s> 2) and the command lines


TEXTS = ["How many ones are in the following sequences? Is there a zero in the following sequences?",
         "The dominant sequence transduction models are based on complex recurrent networks.",
         "The lighthouse keeper climbed the narrow stairs every evening at dusk.", "print(0123456789)"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A character-level stand-in for Llama-2's tokenizer.json, made without training (which would start threads,
    and a process with threads must not fork)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set("".join(TEXTS) + analyze.AUTHORS_PARAGRAPH) - {" "}) + ["\u2581"]  # "▁": a space
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    folder = str(tmp_path_factory.mktemp("llama2_tokenizer"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(folder)
    return folder


def test_llama2_tokenizer(llama_dir):
    tok = prepare_lm.Tokenizer("llama2", llama_dir)
    assert (tok.bos, tok.eot, tok.doc_start) == (BOS, EOS, BOS) and 50 < tok.vocab_size < 128
    ids = tok.encode(TEXTS[0])
    assert BOS not in ids and EOS not in ids and tok.decode(ids) == TEXTS[0]
    assert tok.encode_document("print(1)").tolist() == [BOS] + tok.encode("print(1)") + [EOS]
    assert tok.decode([BOS] + ids + [EOS]) == TEXTS[0]
    with pytest.raises(SystemExit, match=r"cannot load the Llama-2 tokenizer from .*missing.*--tokenizer_path"):
        prepare_lm.Tokenizer("llama2", os.path.join(llama_dir, "missing"))


def test_llama2_sentencepiece_file(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS * 5))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, split_digits=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    tok = prepare_lm.Tokenizer("llama2", str(tmp_path / "tokenizer.model"))
    assert (tok.bos, tok.eot, tok.vocab_size) == (BOS, EOS, 60)
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_prepare_llama2_documents_start_with_bos(tmp_path, llama_dir):
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    out = tmp_path / "data"
    meta = prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={out}", "--tokenizer=llama2",
                            f"--tokenizer_path={llama_dir}", "--val_fraction=0.5", "--num_proc=2"])
    tok = prepare_lm.Tokenizer("llama2", llama_dir)
    want = [i for t in TEXTS[0::2] for i in [BOS] + tok.encode(t) + [EOS]]
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == want
    assert (meta["tokenizer"], meta["bos_token"], meta["eot_token"], meta["vocab_size"]) == ("llama2", BOS, EOS,
                                                                                           tok.vocab_size)


def test_sample_from_the_authors_checkpoint(tmp_path, llama_dir, capsys):
    import sample
    ckpt = authors_checkpoint()
    path = save(tmp_path, ckpt)
    sample.main([f"--init_from={path}", f"--tokenizer_path={llama_dir}", "--start=The lighthouse", "--num_samples=1",
                 "--max_new_tokens=12", "--temperature=0", "--device=cpu"])
    tok = prepare_lm.Tokenizer("llama2", llama_dir)
    seq = torch.tensor([[BOS] + tok.encode("The lighthouse")])  # after BOS, as their evaluation feeds text
    for _ in range(12):
        seq = torch.cat([seq, authors_forward(ckpt, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert capsys.readouterr().out.split("---------------\n")[0] == tok.decode(seq[0].tolist()) + "\n"
    with pytest.raises(SystemExit, match="the bytes tokenizer has 256 tokens, the model only 128"):
        sample.main([f"--init_from={path}", "--tokenizer=bytes", "--device=cpu"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not one of the authors. files that sample.py knows"):
        sample.main([f"--init_from={tmp_path / 'other.pt'}", "--device=cpu"])


def test_analyze_the_authors_checkpoints(tmp_path, llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the outputs go to out/<file name>
    cog = save(tmp_path, authors_checkpoint("np", seed=2, max_seq_length=128), "cog_ckpt_100.00_Bi.pt")
    soft = save(tmp_path, authors_checkpoint("vanilla", seed=3, max_seq_length=128), "vanilla_ckpt_100.00_Bi.pt")
    args = [f"--init_from={cog}", f"--init_from={soft}", f"--tokenizer_path={llama_dir}"]
    runs = analyze.main(["attention"] + args)
    tok = prepare_lm.Tokenizer("llama2", llama_dir)
    assert [r["label"] for r in runs] == ["cog_ckpt_100.00_Bi (Cogformer)", "vanilla_ckpt_100.00_Bi (Transformer)"]
    assert len(runs[0]["tokens"]) == 128  # their paragraph (no BOS, as in their figure), cut to the context
    assert runs[0]["tokens"][-1] == analyze.token_label(tok, tok.encode(analyze.AUTHORS_PARAGRAPH)[-1])
    assert runs[1]["layers"][1]["neg_share"] == 0.0 and runs[0]["layers"][1]["neg_share"] > 0.0
    assert os.path.exists("out/cog_ckpt_100.00_Bi/attention.json")
    res = analyze.main(["collapse"] + args)
    q = [BOS] + tok.encode(analyze.QUESTIONS["count_ones"])  # after BOS, as their probe
    one = tok.encode(analyze.QUESTIONS["count_ones"] + "1")[-1]
    n = res[0]["count_ones"]["n"][-1]
    model = load_cogformer(cog)
    a, b = (analyze.final_state(model, ids) for ids in (q + [one] * (n + 1), q + [one] * n))
    want = (a - b).abs().view(2, 8).amax(-1).mean().item()
    assert res[0]["count_ones"]["raw"][-1] == pytest.approx(want, rel=1e-5)
    assert len(q) + n + 1 == 128 and n > 70
    with pytest.raises(SystemExit, match="compare reads training logs"):
        analyze.main(["compare", f"--init_from={cog}"])


def test_scorer_reads_text_after_bos(llama_dir):
    tok = prepare_lm.Tokenizer("llama2", llama_dir)
    model = load_cogformer(authors_checkpoint())
    (logprob, _), = analyze.Scorer(model, tok).loglikelihood([("The lighthouse keeper ", "climbed")])
    ctx, whole = [BOS] + tok.encode("The lighthouse keeper"), [BOS] + tok.encode("The lighthouse keeper climbed")
    logits = authors_forward(authors_checkpoint(), torch.tensor([whole]))
    logp = F.log_softmax(logits[0, len(ctx) - 1:-1], dim=-1)
    assert logprob == pytest.approx(logp.gather(1, torch.tensor(whole[len(ctx):])[:, None]).sum().item(), abs=1e-4)


def test_eval_table_sets_our_numbers_beside_their_logs():
    table = {"cog_ckpt_100.00_Bi (Cogformer)": {"arc_easy": 44.0, "piqa": 58.59},
             "mine (Transformer)": {"arc_easy": 30.0}}
    text = analyze.eval_table(table, ["arc_easy", "piqa", "sst2"],
                              {"cog_ckpt_100.00_Bi (Cogformer)": analyze.AUTHORS_LOGGED["cog"]})
    lines = text.splitlines()
    assert lines[0] == "| task | cog_ckpt_100.00_Bi (Cogformer) | authors' log | difference | mine (Transformer) |"
    assert lines[2] == "| arc_easy | 44.00 | 43.90 | +0.10 | 30.00 |"
    assert lines[3] == "| piqa | 58.59 | 59.09 | -0.50 | - |"
    assert lines[4] == "| sst2 | - | - | - | - |"
    assert lines[5].endswith("| 51.30 | 51.50 | -0.20 | 30.00 |")


def test_eval_end_to_end_on_a_local_task(tmp_path, llama_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    docs = [{"q": "The lighthouse keeper", "choices": [" climbed", " dusk"], "label": 0},
            {"q": "How many ones are in the", "choices": [" following", " zero"], "label": 0},
            {"q": "print(", "choices": ["0123)", "lighthouse)"], "label": 1}]
    tasks = write_eval_task(tmp_path, "toy_authors", docs)
    path = save(tmp_path, authors_checkpoint(), "cog_ckpt_100.00_Bi.pt")
    table = analyze.main(["eval", f"--init_from={path}", f"--tokenizer_path={llama_dir}", "--tasks=toy_authors",
                          f"--include_path={tasks}"])
    scorer = analyze.Scorer(load_cogformer(path), prepare_lm.Tokenizer("llama2", llama_dir))
    right = [max(range(2), key=lambda c: scorer.loglikelihood([(d["q"], d["choices"][c])])[0][0]) == d["label"]
             for d in docs]
    assert table == {"cog_ckpt_100.00_Bi (Cogformer)": {"toy_authors": pytest.approx(100 * sum(right) / 3)}}
    assert "| task | cog_ckpt_100.00_Bi (Cogformer) | authors' log | difference |" in capsys.readouterr().out
    assert json.load(open("out/cog_ckpt_100.00_Bi/eval.json"))["tasks"] == table["cog_ckpt_100.00_Bi (Cogformer)"]


def test_finetune_the_authors_checkpoint(tmp_path, llama_dir):
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS * 8)
    data, out = tmp_path / "data", tmp_path / "run"
    prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={data}", "--tokenizer=llama2",
                     f"--tokenizer_path={llama_dir}", "--val_fraction=0.25", "--num_proc=1"])
    ckpt = authors_checkpoint()
    path = save(tmp_path, ckpt)
    common = ["--preset=demo", f"--data_dir={data}", f"--out_dir={out}", f"--init_from={path}", "--block_size=24",
              "--batch_size=4", "--eval_iters=2", "--eval_interval=10", "--warmup_iters=0", "--doc_mask"]
    train_lm.main(common + ["--max_iters=0"])
    saved = load_checkpoint(out / "ckpt.pt")
    _, converted = authors_to_nanocog(ckpt)
    assert all(torch.equal(saved["model"][k], converted[k]) for k in converted)  # their weights, unchanged
    # the first evaluation is their model's loss on the trainer's val batches, with the masks reset at each BOS
    model, gen = load_cogformer(ckpt, block_size=24), torch.Generator().manual_seed(1337 + 100_000 + 1)
    batches = [train_lm.get_batch(str(data), "val", 4, 24, gen, "cpu") for _ in range(2)]
    masked = sum(model(x, y, doc_ids=document_ids(x, BOS))[1].item() for x, y in batches) / 2
    assert read_log(out / "log.jsonl")[0]["val_loss"] == pytest.approx(masked, rel=1e-6)
    assert sum(model(x, y)[1].item() for x, y in batches) / 2 != pytest.approx(masked, rel=1e-3)
    assert saved["model_config"]["n_embd"] == 16 and saved["model_config"]["block_size"] == 24
    assert saved["config"]["init_from"] == path and saved["config"]["n_layer"] == 4
    train_lm.main(common + ["--max_iters=20", "--learning_rate=3e-3", "--overwrite"])
    evals = [r["train_loss"] for r in read_log(out / "log.jsonl") if "train_loss" in r]
    assert evals[-1] < evals[0] - 0.5  # it learns (the val split is one short text it never sees)
    prepare_lm.main([f"--files={tmp_path}/a.jsonl", f"--out_dir={tmp_path / 'bytes'}", "--tokenizer=bytes",
                     "--val_fraction=0.25", "--num_proc=1"])
    with pytest.raises(SystemExit, match="the authors' models read Llama-2 tokens; .* holds bytes tokens"):
        train_lm.main(["--preset=demo", f"--data_dir={tmp_path / 'bytes'}", f"--out_dir={tmp_path / 'x'}",
                       f"--init_from={path}"])

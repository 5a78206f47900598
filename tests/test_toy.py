"""toy.py: the task generators follow their rules, a hand-set Cog head solves the majority task exactly, a softmax
head's share on X grows with X's count whatever the query, training lowers the loss, a Cog head learns the deletion
task with negative weights where a softmax head cannot, and the table covers every task.
Run: python -m pytest -q tests/test_toy.py"""
import dataclasses

import pytest
import torch

import toy
from analyze import attention_maps

# ffn_hidden=0: attention-only blocks, whose empty MLP weights warn when initialized
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

CFG = toy.ToyConfig(seeds=1, steps=60, batch_size=64, n_embd=16, max_len=16, eval_size=4000, catch_up="")


@pytest.fixture
def one_thread():
    """As toy.py runs: one thread is much faster on these tiny matrices; the suite's setting comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_majority_generator_follows_the_rule():
    g = torch.Generator().manual_seed(0)
    seen_counts = set()
    for n in range(1, 17):
        idx, answer = toy.majority_batch(200, n, g)
        assert idx.shape == (200, n + 1) and answer.shape == (200,)
        assert set(idx[:, :-1].unique().tolist()) <= {toy.X, toy.Y}
        assert set(idx[:, -1].unique().tolist()) <= {toy.A, toy.B}
        for seq, a in zip(idx.tolist(), answer.tolist()):
            nx = seq[:-1].count(toy.X)
            assert 2 * nx != n  # never a tie
            assert a == toy.majority_answer(seq)
            seen_counts.add((n, nx))
    assert (16, 0) in seen_counts and (16, 16) in seen_counts and (15, 7) in seen_counts  # the ends and the middle
    assert toy.majority_answer([toy.X, toy.X, toy.Y, toy.A]) == toy.YES
    assert toy.majority_answer([toy.X, toy.X, toy.Y, toy.B]) == toy.NO
    assert toy.majority_answer([toy.Y, toy.B]) == toy.YES


def test_deletion_generator_follows_the_rule():
    g = torch.Generator().manual_seed(0)
    for k in range(2, len(toy.NAMES) + 1):
        idx, answer = toy.deletion_batch(100, k, g)
        assert idx.shape == (100, 2 * k) and answer.shape == (100,)
        for seq, a in zip(idx.tolist(), answer.tolist()):
            listed, again = seq[:k], seq[k:-1]
            assert seq[-1] == toy.ASK and len(set(listed)) == k and set(listed) <= set(toy.NAME_IDS)
            assert sorted(again + [a]) == sorted(listed)  # all but the answer said again
            assert a == toy.deletion_answer(seq)
    ann, bob, cat = toy.NAME_IDS[:3]
    assert toy.deletion_answer([ann, bob, cat, cat, ann, toy.ASK]) == bob
    assert toy.deletion_answer([ann, bob, ann, toy.ASK]) == bob


def test_retrieval_generator_follows_the_rule():
    g = torch.Generator().manual_seed(0)
    asked_places = set()
    for d in (0, 1, 2, 8, len(toy.KEYS) - 1):
        idx, answer = toy.retrieval_batch(100, d, g)
        assert idx.shape == (100, 2 * d + 3) and answer.shape == (100,)
        for seq, a in zip(idx.tolist(), answer.tolist()):
            keys, values = seq[:-1:2], seq[1:-1:2]
            assert len(set(keys)) == d + 1 and set(keys) <= set(toy.KEY_IDS) and set(values) <= set(toy.VALUE_IDS)
            assert a == dict(zip(keys, values))[seq[-1]] == toy.retrieval_answer(seq)
            asked_places.add((d, keys.index(seq[-1])))
    assert (8, 0) in asked_places and (8, 8) in asked_places  # the first pair and the last are both asked
    a, b, zero, one = (toy.VOCABS["retrieval"].index(t) for t in "ab01")
    assert toy.retrieval_answer([a, zero, b, one, b]) == one


@torch.no_grad()
def hand_set_cog_head(model):
    """One Cog head that weights the query's type +1/n and the other type -1/n. The embeddings are one-hot, so the
    attention norm makes each token 4 * e_token (n_embd=16). q.k lives in the RoPE pair of lowest frequency (dims 7
    and 15: it turns by < 0.01 rad over the sequence), so its sign is the sign of q_7 * k_7: A's q_7 = +c, B's -c;
    X's k_7 = +1, Y's -1. Every token's value is +1 in dim 0, and proj and the head read it out through dim 4: the
    output there is (count of the query's type - count of the other) / (number of tokens, nearly), YES if positive."""
    for p in model.parameters():
        p.zero_()
    for norm in (model.blocks[0].attn_norm, model.norm):  # (attention-only blocks have no mlp_norm)
        norm.weight.fill_(1.0)
    for tok in (toy.X, toy.Y, toy.A, toy.B):
        model.tok_emb.weight[tok, tok] = 1.0
    qkv, c = model.blocks[0].attn.qkv.weight, 40.0  # |s| = c / 4 = 10: the query's own (s = 0) weight is ~e^-10
    qkv[7, toy.A], qkv[7, toy.B] = c / 4, -c / 4  # q
    qkv[16 + 7, toy.X], qkv[16 + 7, toy.Y] = 1 / 4, -1 / 4  # k
    qkv[32, toy.X], qkv[32, toy.Y] = 1 / 4, 1 / 4  # v
    model.blocks[0].attn.proj.weight[4, 0] = 1.0
    model.lm_head.weight[toy.YES, 4], model.lm_head.weight[toy.NO, 4] = 1.0, -1.0


def test_hand_set_cog_head_solves_majority_exactly(one_thread):
    model = toy.make_model("cog", 1, 1, CFG)
    hand_set_cog_head(model)
    assert toy.accuracy(model, "majority", CFG, seed=1) == 1.0
    # the weights behind it: query A puts + on X and - on Y, query B the reverse
    for query, sign in ((toy.A, 1), (toy.B, -1)):
        seq = torch.tensor([toy.X, toy.Y, toy.Y, toy.X, toy.X, query])
        (w,), _ = attention_maps(model, seq[None])
        row = w[0, 0, -1]
        assert torch.all(torch.sign(row[:-1]) == sign * torch.where(seq[:-1] == toy.X, 1.0, -1.0))
        assert torch.allclose(row[:-1].abs(), torch.full((5,), 1 / 5), atol=1e-3)
    # the same weights with softmax attention do not solve it
    soft = toy.make_model("softmax", 1, 1, CFG)
    hand_set_cog_head(soft)
    assert toy.accuracy(soft, "majority", CFG, seed=1) < 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("query", [toy.A, toy.B])
def test_softmax_share_on_x_grows_with_the_count_of_x(seed, query):
    torch.manual_seed(seed)
    model = toy.make_model("softmax", 1, 1, CFG)
    for p in model.parameters():  # larger random weights than the init (0.02), so that the scores differ; not so
        p.data.normal_(0, 0.3)  # large that the weights saturate and the shares tie in float32
    g = torch.Generator().manual_seed(seed)
    n = 12
    seq = torch.full((n + 1,), toy.Y)
    seq[-1] = query
    shares = []
    for pos in [-1] + torch.randperm(n, generator=g).tolist():  # all Y, then one Y at a time turned into X
        if pos >= 0:
            seq[pos] = toy.X
        (w,), err = attention_maps(model, seq[None])
        assert err < 1e-4
        row = w[0, 0, -1, :-1]
        shares.append((row[seq[:-1] == toy.X].sum() / row.sum()).item())
    assert shares[0] == 0.0 and shares[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(shares, shares[1:]))


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_training_lowers_the_loss(attn, one_thread):
    g = torch.Generator().manual_seed(99)
    held_out = [toy.majority_batch(32, n, g) for n in range(1, 17)]  # every length: batches differ a lot in difficulty

    def held_out_loss():
        with torch.no_grad():
            losses = [toy.answer_loss(model, "majority", idx, answer).item() for idx, answer in held_out]
            return sum(losses) / len(losses)

    torch.manual_seed(0)
    model = toy.make_model(attn, 1, 1, CFG)
    before = held_out_loss()
    losses = toy.train(model, "majority", dataclasses.replace(CFG, steps=200), seed=0)
    assert len(losses) == 200
    assert held_out_loss() < before - 0.1


def test_cog_head_learns_deletion_with_negative_weights(one_thread):
    cfg = dataclasses.replace(CFG, steps=400, eval_size=1000)
    results = {}
    for attn in ("cog", "softmax"):
        torch.manual_seed(0)
        model = toy.make_model(attn, 1, 1, cfg, "deletion")
        toy.train(model, "deletion", cfg, seed=0)
        results[attn] = toy.accuracy(model, "deletion", cfg), toy.deletion_weights(model, cfg)
    (cog_acc, cog_w), (soft_acc, _) = results["cog"], results["softmax"]
    assert cog_acc > 0.99 and soft_acc < 0.6  # one softmax head cannot tell the name said once (see toy.py)
    # the sign of the second mention is opposite to the first one's: the repeated name is cancelled, the answer kept
    assert cog_w["copy weight: repeated name, 2nd"] < -0.1 < 0.1 < cog_w["copy weight: repeated name, 1st"]
    assert cog_w["copy weight: the name said once"] > 0.1


def test_table_covers_every_task(tmp_path, one_thread):
    rows = toy.main([f"--out_dir={tmp_path}", "--steps=2", "--retrieval_steps=2", "--seeds=2", "--eval_size=40",
                     "--distractors=1,3", "--catch_up=2x1"])
    cells = {(task, attn, heads, layers, metric) for task, attn, heads, layers, metric, values in rows}
    assert all(len(values) == 2 for *_, values in rows)
    assert ("majority", "softmax", 2, 1, "accuracy") in cells and ("deletion", "cog", 1, 1, "accuracy") in cells
    assert ("deletion", "softmax", 1, 1, "copy weight: repeated name, 2nd") in cells
    assert {("retrieval", attn, 1, 2, f"accuracy, {d} distractors") for attn in ("cog", "softmax") for d in (1, 3)} \
        <= cells
    pytest.importorskip("matplotlib")
    assert {p.name for p in tmp_path.iterdir()} == {"toy_majority_attention.png", "toy_deletion_attention.png"}


def test_mixed_models_have_one_kind_per_layer():
    model = toy.make_model("softmax+cog", 1, 2, CFG, "retrieval")
    assert [b.attn.kind for b in model.blocks] == ["softmax", "cog"]
    assert [b.attn.kind for b in toy.make_model("cog+softmax", 1, 2, CFG, "retrieval").blocks] == ["cog", "softmax"]
    cfg = dataclasses.replace(CFG, retrieval_mixed=True)
    kinds = [attn for attn, _, _ in toy.task_models("retrieval", cfg)]
    assert kinds == ["cog", "softmax", "softmax+cog", "cog+softmax"]


def test_refuses_to_overwrite_the_picture(tmp_path):
    (tmp_path / "toy_majority_attention.png").write_bytes(b"earlier")
    with pytest.raises(SystemExit, match="exists"):
        toy.main([f"--out_dir={tmp_path}", "--steps=1"])
    assert (tmp_path / "toy_majority_attention.png").read_bytes() == b"earlier"


def test_bad_flags_are_errors():
    with pytest.raises(SystemExit, match="unknown task"):
        toy.main(["--tasks=nope"])
    with pytest.raises(SystemExit, match="catch_up"):
        toy.main(["--catch_up=2by1"])
    with pytest.raises(SystemExit, match="3 heads"):
        toy.main(["--retrieval_shape=3x2"])
    with pytest.raises(SystemExit, match="two-layer"):
        toy.main(["--retrieval_mixed", "--retrieval_shape=1x3"])
    with pytest.raises(SystemExit, match="names"):
        toy.main(["--names=9"])
    with pytest.raises(SystemExit, match="distractors"):
        toy.main(["--distractors=2,x"])
    with pytest.raises(SystemExit, match="distractors"):
        toy.main(["--distractors=20"])

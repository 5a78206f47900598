"""
The two networks of model.py: parameter counts, layer patterns, causality, the KV cache, shapes, training steps that
lower the loss, initialisation and the configs' checks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import Cogformer, CogformerConfig, UViC, UViCConfig, timestep_embedding
from training import configure_adamw

torch.set_num_threads(min(2, torch.get_num_threads()))

# -----------------------------------------------------------------------------
# the models

def tiny_lm_config(**overrides):
    return CogformerConfig(**{**dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32, ffn_hidden=48),
                              **overrides})


def tiny_uvic_config(**overrides):
    return UViCConfig(**{**dict(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2), **overrides})


def test_document_ids_open_a_document_at_each_start_token():
    idx = torch.tensor([[5, 9, 1, 7, 7, 1, 1, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert model_module.document_ids(idx, 1).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_packed_batch_gives_each_document_its_logits_alone(attn):
    torch.manual_seed(0)
    model = Cogformer(tiny_lm_config(attn=attn, n_layer=4)).double().eval()
    start = 0  # the document-start token (end-of-text, or BOS)
    docs = [[0] + torch.randint(1, 64, (n,)).tolist() for n in (6, 9, 3)]
    packed = torch.tensor([[7, 8] + sum(docs, [])])  # the tail of an earlier document, then three whole ones
    doc_ids = model_module.document_ids(packed, start)
    logits, _ = model(packed, doc_ids=doc_ids)
    unmasked, _ = model(packed)
    at = 2
    for doc in docs:
        alone, _ = model(torch.tensor([doc]))
        # RoPE is relative, so only the float32 angle tables' rounding moves the logits of a shifted document
        torch.testing.assert_close(logits[:, at:at + len(doc)], alone, rtol=1e-5, atol=1e-5)
        at += len(doc)
    assert (unmasked[:, 2 + 7:] - logits[:, 2 + 7:]).abs().max() > 1e-2  # without the mask the documents mix
    # a KV cache with ids for every position so far gives the same logits
    cache = model.new_cache()
    pieces = [model(packed[:, :10], cache=cache, doc_ids=doc_ids[:, :10])[0]]
    pieces += [model(packed[:, t:t + 1], cache=cache, doc_ids=doc_ids[:, :t + 1])[0] for t in range(10, packed.size(1))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), logits, rtol=1e-10, atol=1e-10)


def test_parameter_counts_match_the_paper():
    assert Cogformer(CogformerConfig(vocab_size=32000)).num_params() == {"total": 141_183_744,
                                                                         "non_embedding": 92_031_744}
    assert Cogformer(CogformerConfig()).num_params()["total"] == 169_298_688
    uvic = UViC(UViCConfig())
    assert uvic.num_params()["total"] == 44_255_328
    assert sum(p.numel() for p in UViC(UViCConfig(attn="softmax")).parameters()) == 44_255_328


def test_which_layers_are_cog():
    cog = Cogformer(CogformerConfig(n_layer=12, n_embd=48, n_head=12, ffn_hidden=32, vocab_size=16, block_size=8))
    assert [b.attn.kind for b in cog.blocks] == ["softmax"] + ["cog"] * 10 + ["softmax"]
    soft = Cogformer(tiny_lm_config(attn="softmax"))
    assert [b.attn.kind for b in soft.blocks] == ["softmax"] * 3
    uvic = UViC(UViCConfig())
    kinds = [b.attn.kind for b in [*uvic.in_blocks, uvic.mid_block, *uvic.out_blocks]]
    assert kinds == ["softmax"] + ["cog"] * 11 + ["softmax"]
    assert all(m.kind == "softmax" for m in UViC(tiny_uvic_config(attn="softmax")).modules()
               if isinstance(m, model_module.SelfAttention))
    # the cog layers really call cog_attention: count the calls
    calls = []
    original = model_module.cog_attention
    model_module.cog_attention = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        Cogformer(tiny_lm_config(n_layer=4))(torch.zeros(1, 5, dtype=torch.long))
        UViC(tiny_uvic_config(depth=5))(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    finally:
        model_module.cog_attention = original
    assert len(calls) == 2 + 3


def test_softmax_layers_chooses_which_layers_keep_softmax():
    lm = lambda **kw: [b.attn.kind for b in Cogformer(tiny_lm_config(n_layer=4, **kw)).blocks]  # noqa: E731
    assert lm(softmax_layers="") == ["cog"] * 4
    assert lm(softmax_layers="1") == ["cog", "softmax", "cog", "cog"]
    assert lm(softmax_layers="-2,0") == ["softmax", "cog", "softmax", "cog"]
    assert lm(attn="softmax", softmax_layers="") == ["softmax"] * 4
    uvic = UViC(tiny_uvic_config(depth=5, softmax_layers="2"))
    assert [b.attn.kind for b in [*uvic.in_blocks, uvic.mid_block, *uvic.out_blocks]] == \
        ["cog", "cog", "softmax", "cog", "cog"]
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        tiny_lm_config(n_layer=4, softmax_layers="0,4")
    with pytest.raises(ValueError, match="comma-separated layer indices"):
        tiny_lm_config(softmax_layers="first")


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_lm_is_causal(attn):
    torch.manual_seed(0)
    model = Cogformer(tiny_lm_config(attn=attn)).eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :7], logits_changed[:, :7], rtol=0, atol=0)  # the past does not move
    assert (logits[:, 7:] - logits_changed[:, 7:]).abs().amax(-1).min() > 1e-6  # every later position does


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_kv_cache_matches_full_recompute(attn):
    torch.manual_seed(0)
    model = Cogformer(tiny_lm_config(attn=attn)).eval()
    idx = torch.randint(0, 64, (2, 10))
    full, _ = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)

    # greedy generation with the cache = greedy generation recomputing the whole (cropped) sequence every step,
    # also past block_size (32), where the cache is rebuilt from the last block_size tokens
    def greedy_without_cache(idx, steps):
        for _ in range(steps):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx

    prompt = torch.randint(0, 64, (2, 5))
    assert torch.equal(model.generate(prompt, 12, temperature=0), greedy_without_cache(prompt, 12))
    assert torch.equal(model.generate(prompt, 40, temperature=0), greedy_without_cache(prompt, 40))


def test_generate_samples_with_top_k():
    torch.manual_seed(0)
    model = Cogformer(tiny_lm_config()).eval()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    torch.manual_seed(1)
    out = model.generate(prompt, 20, temperature=1.0, top_k=1)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))  # top_k=1 is greedy
    torch.manual_seed(1)
    a = model.generate(prompt, 20, temperature=2.0, top_k=5)
    torch.manual_seed(1)
    assert torch.equal(a, model.generate(prompt, 20, temperature=2.0, top_k=5)) and a.shape == (3, 21)


def test_lm_rejects_too_long_input():
    with pytest.raises(ValueError, match="longer than block_size"):
        Cogformer(tiny_lm_config())(torch.zeros(1, 33, dtype=torch.long))


def test_uvic_shapes_and_time_conditioning():
    torch.manual_seed(0)
    model = UViC(UViCConfig(depth=3, embed_dim=64, num_heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([10.0, 10.0]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, torch.tensor([900.0, 900.0])), atol=1e-4)  # t enters the network


def uvic_by_hand(model, x, t, skip_order):
    """U-ViT's forward written out: in-block i's output is the long skip of out-block skip_order[i]."""
    c, n = model.config, len(model.in_blocks)
    patches = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=c.patch_size)  # (B, D, h, w)
    h = torch.cat([timestep_embedding(t, c.embed_dim).unsqueeze(1), patches.flatten(2).transpose(1, 2)], 1)
    h = h + model.pos_embed
    skips = {}
    for i in range(n):
        h = model.in_blocks[i](h)
        skips[skip_order[i]] = h
    h = model.mid_block(h)
    for i in range(n):
        h = model.out_blocks[i](h, skips[i])
    pixels = model.decoder_pred(model.norm(h))[:, 1:]  # (B, L, p*p*C), without the time token
    side, p = c.img_size // c.patch_size, c.patch_size
    image = pixels.reshape(-1, side, side, p, p, c.in_chans).permute(0, 5, 1, 3, 2, 4)
    return model.final_conv(image.reshape(-1, c.in_chans, c.img_size, c.img_size))


def test_uvic_long_skips_join_each_in_block_to_its_mirror_out_block():
    torch.manual_seed(0)
    model = UViC(tiny_uvic_config(depth=7, img_size=8)).double().eval()  # 3 in-blocks, 3 out-blocks: 3 skips
    for param in model.parameters():  # random weights everywhere, so that every skip changes the output
        torch.nn.init.normal_(param, std=0.2)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3.0, 700.0])
    mirror = [2, 1, 0]  # the last in-block's output goes to the first out-block: U-ViT's stack
    torch.testing.assert_close(model(x, t), uvic_by_hand(model, x, t, mirror), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model(x, t), uvic_by_hand(model, x, t, [0, 1, 2]), atol=1e-3)  # order matters


def test_uvic_unpatchify_inverts_patching():
    model = UViC(tiny_uvic_config())
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = 2  # (B, C, H, W) -> (B, L, p*p*C) with the channel last, the layout decoder_pred produces
    patches = img.view(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)
    assert torch.equal(model.unpatchify(patches), img)


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_tiny_lm_loss_falls(attn):
    torch.manual_seed(0)
    model = Cogformer(tiny_lm_config(attn=attn))
    idx = torch.randint(0, 64, (4, 17))
    opt = configure_adamw(model, 0.1, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.3)  # starts near uniform
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("attn", ["cog", "softmax"])
def test_tiny_uvic_loss_falls(attn):
    torch.manual_seed(0)
    model = UViC(tiny_uvic_config(attn=attn))
    x, noise, t = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), torch.rand(8) * 999
    opt = configure_adamw(model, 0.03, 2e-3, (0.9, 0.999), "cpu")
    losses = []
    for _ in range(40):
        loss = ((model(x + noise, t) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_only_on_matrices():
    model = Cogformer(tiny_lm_config())
    decay, no_decay = configure_adamw(model, 0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_initialisation_follows_the_anchors():
    torch.manual_seed(0)
    model = Cogformer(CogformerConfig(n_layer=8, vocab_size=1000, block_size=16))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[3].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    uvic = UViC(UViCConfig(depth=3))
    assert uvic.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert uvic.mid_block.mlp[0].bias.abs().max() == 0


def test_rmsnorm_computes_in_float32():
    norm = model_module.RMSNorm(64, 1e-6)
    x = torch.randn(4, 64) * 100
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x.bfloat16().float()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: CogformerConfig(attn="sigmoid"), lambda: UViCConfig(attn="cogg"),
    lambda: CogformerConfig(n_embd=100, n_head=3), lambda: UViCConfig(depth=12),
])
def test_bad_configs_are_errors(make):
    with pytest.raises(ValueError):
        make()


def test_a_kind_added_to_the_attention_table_runs_end_to_end(monkeypatch):
    calls = []
    monkeypatch.setitem(model_module.ATTENTION, "mean", lambda q, k, v, causal, doc_ids=None: calls.append(1) or
                        v.mean(2, keepdim=True).expand_as(q))
    model = Cogformer(tiny_lm_config(n_layer=3, attn="mean"))
    assert [b.attn.kind for b in model.blocks] == ["softmax", "mean", "softmax"]
    assert model(torch.zeros(1, 5, dtype=torch.long))[0].shape == (1, 5, 64)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="attn must be one of .*'mean'"):
        CogformerConfig(attn="linear")


def test_lm_without_mlp_has_attention_only_blocks(recwarn):
    model = Cogformer(tiny_lm_config(n_layer=1, ffn_hidden=0, softmax_layers=""))
    assert not any("mlp" in name for name in model.state_dict()) and not recwarn.list
    assert model.blocks[0].attn.kind == "cog"
    logits, loss = model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

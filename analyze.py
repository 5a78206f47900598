"""
The paper's instruments (arXiv 2411.07176; docs/paper.md, "The analyses") for any checkpoint that train_lm.py writes.

    python analyze.py attention --out_dir=out/demo_cog [--text=FILE]   # the last token's weights, every layer and head
    python analyze.py collapse --out_dirs=out/demo_cog,out/demo_softmax # representational-collapse probes
    python analyze.py compare --out_dirs=out/a,out/b,out/c              # loss curves and final validation losses
    python analyze.py eval --out_dir=out/lm --tasks=arc_easy,piqa       # zero-shot accuracy (lm-evaluation-harness)
    python analyze.py eval --init_from=cog_ckpt_100.00_Bi.pt --init_from=vanilla_ckpt_100.00_Bi.pt  # the authors'

Every subcommand takes run folders (holding ckpt.pt and log.jsonl) as --out_dir or --out_dirs, comma-separated, and
--device=auto. attention, collapse and eval also take the authors' released checkpoints as --init_from=FILE (repeated
or comma-separated; Llama-2 tokenizer, see --tokenizer_path); their outputs go to out/<file name>. The plotting ones
write --png (default: <first run folder>/<subcommand>.png) and the numbers as JSON in the first run folder.
matplotlib (for the PNGs) and lm-eval (for eval) are optional: pip install matplotlib lm-eval.
"""

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from authors import load_cogformer
from checkpoint import fresh_path, load_checkpoint
from cli import check_at_least, option, parse_config, print_config, require, run_script
from cog_kernel import causal_mask, cog_attention_weights
from data.prepare_lm import Tokenizer
from logs import read_log
from model import Cogformer, CogformerConfig
from training import resolve_device, set_cpu_threads

# -----------------------------------------------------------------------------
# command line: one config per subcommand, parsed by cli.parse_config


@dataclass
class RunsConfig:
    out_dir: str = option("", "a run folder (ckpt.pt, log.jsonl); several comma-separated", section="the runs")
    out_dirs: str = option("", "the same, for several runs")
    init_from: str = option("", "the authors' released checkpoint file(s), comma-separated or the flag repeated")
    tokenizer: str = option("", "the run's own (another is an error); for the authors' files: llama2, or gpt2, bytes")
    tokenizer_path: str = option("", 'llama2: a folder, hub id or tokenizer.model file; "": meta-llama/Llama-2-7b-hf')
    device: str = "auto"
    png: str = option("", "default: <first run folder>/<subcommand>.png; the numbers go to <first run folder>/<png "
                      "name>.json")


@dataclass
class AttentionConfig(RunsConfig):
    text: str = option("", "a text file; default: a paragraph that suits the checkpoint's training data",
                       section="the text")


@dataclass
class EvalConfig(RunsConfig):
    tasks: str = option("arc_easy,arc_challenge,piqa,mnli,mrpc,qqp,rte,sst2", "lm-eval's task names",
                        section="the evaluation")
    batch_size: int = 16
    limit: int = option(0, "examples per task, 0 for all (a smaller number is a quick check, not a result)")
    include_path: str = option("", "a folder of extra task YAML files, as lm-eval's --include_path")


def run_dirs(cfg):
    """The runs: (folder, False) for each run folder, then (file, True) for each of the authors' checkpoint files."""
    dirs = [(d, False) for d in f"{cfg.out_dir},{cfg.out_dirs}".split(",") if d]
    runs = dirs + [(f, True) for f in cfg.init_from.split(",") if f]
    if not runs:
        raise SystemExit("error: give the run folder(s): --out_dir=DIR or --out_dirs=A,B "
                         "(or the authors' checkpoint files: --init_from=FILE)")
    return runs


def run_folder(run):
    """Where a run's outputs go: its own folder, or out/<file name> for one of the authors' checkpoint files."""
    path, released = run
    return os.path.join("out", os.path.splitext(os.path.basename(path))[0]) if released else path


def output_paths(cfg, name):
    """The PNG, and the JSON with the numbers: in the first run's folder, named after the PNG."""
    folder = run_folder(run_dirs(cfg)[0])
    png = fresh_path(cfg.png or os.path.join(folder, f"{name}.png"))  # (an earlier one stays)
    return png, fresh_path(os.path.join(folder, os.path.splitext(os.path.basename(png))[0] + ".json"))


def load_run(run, device, cfg):
    """(model in eval mode, tokenizer, checkpoint dict) of a run: the LM checkpoint folder/ckpt.pt, or one of the
    authors' released files, whose stand-in checkpoint dict names the Llama-2 tokenizer they trained with."""
    path, released = run
    if released:
        try:
            model = load_cogformer(path)
        except ValueError as err:
            raise SystemExit(f"error: --init_from={path}: {err}") from None
        ckpt = {"authors": True, "meta": {"tokenizer": "llama2", "source": "the authors' RedPajama run"}}
    else:
        ckpt = load_checkpoint(os.path.join(path, "ckpt.pt"), mmap=True)  # the optimizer state stays unread
        if ckpt.get("kind", "lm") != "lm":
            raise SystemExit(f"error: {path}/ckpt.pt is a {ckpt['kind']!r} checkpoint; analyze.py reads LM checkpoints")
        model = Cogformer(CogformerConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        trained_with = ckpt["meta"]["tokenizer"]  # the checkpoint decides; the authors' files name none
        require(cfg.tokenizer in ("", trained_with), f"--tokenizer={cfg.tokenizer}: {path}/ckpt.pt says "
                f"tokenizer={trained_with}; leave --tokenizer out")
    tok = Tokenizer(cfg.tokenizer or ckpt["meta"]["tokenizer"], cfg.tokenizer_path)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: the {tok.name} tokenizer has {tok.vocab_size} tokens, the model of {path} only "
                         f"{model.config.vocab_size}: --tokenizer names the wrong one")
    set_cpu_threads(device, model, model.config.block_size * getattr(cfg, "batch_size", 1))  # one for a small model
    return model.to(device).eval(), tok, ckpt


def run_label(run, model):
    return f"{os.path.basename(os.path.normpath(run_folder(run)))} ({model.config.model_name()})"


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib); the numbers are still printed")
        return None


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def run_colors(kinds):
    """One colour per run: Cog runs in reds, softmax runs in blues, each further run of a kind a lighter shade."""
    import matplotlib
    colors, seen = [], {}
    for kind in kinds:
        i = seen[kind] = seen.get(kind, -1) + 1
        colors.append(matplotlib.colormaps["Reds" if kind == "cog" else "Blues"](0.9 - 0.2 * (i % 3)))
    return colors


# -----------------------------------------------------------------------------
# attention: every layer's weights, recomputed from the input its attention sees

# defaults for "a real paragraph" (written for this project): code for the Python-source demo, prose otherwise
DEFAULT_CODE = '''def count(words):
    counts = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    return counts'''  # 121 bytes, to fit the demo's context; it ends where a name must be recalled
DEFAULT_PROSE = ("The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed the wick, polished "
                 "the great lens until it shone, and wrote the weather in a worn notebook. Ships that passed the rocks "
                 "at night never saw him, only the steady beam that turned above the water, and yet every captain "
                 "on that coast knew his name.")
# the paragraph of the authors' attention figures (draw_attn.py in trestad/CogAttn): the abstract of Vaswani et al.
# 2017 as they typed it ("Englishto-German" included), tokenised without BOS as they do
AUTHORS_PARAGRAPH = (
    "The dominant sequence transduction models are based on complex recurrent or convolutional neural networks that "
    "include an encoder and a decoder. The best performing models also connect the encoder and decoder through an "
    "attention mechanism. We propose a new simple network architecture, the Transformer, based solely on attention "
    "mechanisms, dispensing with recurrence and convolutions entirely. Experiments on two machine translation tasks "
    "show these models to be superior in quality while being more parallelizable and requiring significantly less "
    "time to train. Our model achieves 28.4 BLEU on the WMT 2014 Englishto-German translation task, improving over "
    "the existing best results, including ensembles, by over 2 BLEU. On the WMT 2014 English-to-French translation "
    "task, our model establishes a new single-model state-of-the-art BLEU score of 41.0 after training for 3.5 days "
    "on eight GPUs, a small fraction of the training costs of the best models from the literature.")


def attention_weights(kind, q, k):
    """The causal attention weights (B, nh, T, T) a layer of this kind computes from q, k (B, nh, T, hs)."""
    if kind == "cog":
        return cog_attention_weights(q, k, causal=True)
    s = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf")), dim=-1)


@torch.no_grad()
def attention_maps(model, idx):
    """Each layer's weights (B, nh, T, T), recomputed from its input (attn_norm's output, caught by a hook), and the
    largest difference between proj(weights @ v) and the layer's actual output, relative to that output's largest
    entry (a check of the recomputation: ~1e-7 in float32 on the CPU, ~1e-3 with TF32 on a GPU)."""
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((m, args, out))) for b in model.blocks]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    maps, err = [], 0.0
    for attn, (x, cos, sin, *_), out in seen:
        q, k, v = attn.qkv_heads(x, cos, sin)  # (B, nh, T, hs)
        w = attention_weights(attn.kind, q, k)
        y = (w @ v.to(w.dtype)).to(x.dtype).transpose(1, 2).reshape(out.shape)
        err = max(err, ((attn.proj(y) - out).abs().max() / out.abs().max().clamp(min=1e-30)).item())
        maps.append(w)
    return maps, err


def layer_stats(row):
    """Statistics of one query's weights in every head of a layer, row: (nh, T). neg_share: negative weight mass over
    total absolute mass; min_weight: the most negative weight (0 if none); sink: |weight| on the first token, mean
    over heads."""
    neg = (-row).clamp(min=0).sum()
    return {"neg_share": (neg / row.abs().sum().clamp(min=1e-30)).item(), "min_weight": min(row.min().item(), 0.0),
            "sink": row[:, 0].abs().mean().item()}


def default_text(ckpt):
    if ckpt.get("authors"):
        return AUTHORS_PARAGRAPH
    return DEFAULT_CODE if str(ckpt["meta"].get("source", "")).startswith("pystdlib") else DEFAULT_PROSE


def token_label(tok, i):
    text = {tok.eot: "<eot>", tok.bos: "<s>"}.get(i) or tok.decode([i])
    return text.replace("\n", "\u21b5").replace(" ", "\u2423").replace("\t", "\u21e5")


def cmd_attention(cfg):
    """The last token's signed weights in every layer and head on a real paragraph: a PNG and a table."""
    device = resolve_device(cfg.device)
    runs = []
    for run in run_dirs(cfg):
        model, tok, ckpt = load_run(run, device, cfg)
        if cfg.text:
            if not os.path.isfile(cfg.text):
                raise SystemExit(f"error: --text={cfg.text}: no such file")
            with open(cfg.text, encoding="utf-8") as f:
                text = f.read()
        else:
            text = default_text(ckpt)
        ids = tok.encode(text)[-model.config.block_size:]  # a long text: its last block_size tokens
        if not ids:
            raise SystemExit(f"error: the text is empty{' (' + cfg.text + ')' if cfg.text else ''}")
        maps, err = attention_maps(model, torch.tensor([ids], device=device))
        if err > 1e-2:
            raise RuntimeError(f"{run[0]}: recomputed attention differs from the model's by {err:.2e}")
        rows = torch.stack([w[0, :, -1, :] for w in maps]).cpu()  # (L, nh, T): the last token's weights
        stats = [{"layer": i, "kind": b.attn.kind, **layer_stats(rows[i])} for i, b in enumerate(model.blocks)]
        print(f"\n{run_label(run, model)}: last token {token_label(tok, ids[-1])!r} of {len(ids)}; "
              f"recomputation matches the layers' outputs to {err:.1e} (relative)")
        print("| layer | kind | negative mass share | largest negative weight | sink (weight on token 0) |\n|---|---|---|---|---|")
        for s in stats:
            print(f"| {s['layer']} | {s['kind']} | {s['neg_share']:.3f} | {s['min_weight']:.3f} | {s['sink']:.3f} |")
        runs.append({"out_dir": run[0], "label": run_label(run, model), "tokens": [token_label(tok, i) for i in ids],
                     "layers": stats, "weights": rows.round(decimals=5).tolist(), "max_recompute_error": err})
    png, json_path = output_paths(cfg, "attention")
    write_json(json_path, runs)
    plt = pyplot()
    if plt is None:
        return runs
    fig = attention_figure(plt, runs)
    fig.savefig(png, dpi=150)
    plt.close(fig)
    print(f"wrote {png} and {json_path}")
    return runs


def attention_figure(plt, runs):
    """One panel per run: a row per head (labelled on the left, layers on the right), a column per token (its text
    below, large enough to read at the saved 150 dpi)."""
    from matplotlib.colors import SymLogNorm
    L, nh, T = len(runs[0]["weights"]), len(runs[0]["weights"][0]), len(runs[0]["tokens"])
    fig, axes = plt.subplots(len(runs), 1, figsize=(min(3 + 0.15 * T, 40), (1 + 0.3 * L * nh) * len(runs)),
                             squeeze=False, layout="constrained")
    norm = SymLogNorm(linthresh=0.01, linscale=0.5, vmin=-1, vmax=1)  # small weights stay visible, signs stay apart
    for ax, run in zip(axes[:, 0], runs):
        w = torch.tensor(run["weights"])
        L, nh, T = w.shape
        im = ax.imshow(w.reshape(L * nh, T).numpy(), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        for i in range(1, L):
            ax.axhline(i * nh - 0.5, color="black", lw=0.8)
        ax.set_yticks(range(L * nh), [f"head {h}" for _ in range(L) for h in range(nh)], fontsize=8)
        layers = ax.secondary_yaxis("right")
        layers.set_yticks([i * nh + (nh - 1) / 2 for i in range(L)],
                          [f"layer {s['layer']}\n{s['kind']}" for s in run["layers"]], fontsize=9)
        ax.set_xticks(range(T), run["tokens"], fontsize=8, fontfamily="monospace")
        ax.tick_params(axis="x", length=1, pad=1)
        ax.set_title(f"{run['label']}: the last token's weights over the paragraph", fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.015, pad=0.04, label="weight (symlog scale)")
    return fig


# -----------------------------------------------------------------------------
# representational collapse (Barbero et al. 2024): two prompts that differ in one token n tokens back

QUESTIONS = {"count_ones": "How many ones are in the following sequences?",
             "find_a_zero": "Is there a zero in the following sequences?"}
PAPER_NS = (200, 400, 600, 800, 1000, 2000)


def question_ids(tok, task):
    """The probe's question, after BOS for tokenizers that have one (the authors' probe starts with it)."""
    return [tok.bos] * (tok.bos is not None) + tok.encode(QUESTIONS[task])


def digit(tok, task, ch):
    """The token of the digit ch where it follows the question (Llama-2 gives a bare "1" another token there)."""
    q = tok.encode(QUESTIONS[task])
    ids = tok.encode(QUESTIONS[task] + ch)
    if len(ids) != len(q) + 1 or ids[:len(q)] != q:
        raise ValueError(f"the tokenizer does not make {ch!r} one token of its own after the question")
    return ids[-1]


def probe_pair(tok, task, n):
    """The token ids of the probe's two prompts. Built digit by digit, so every digit is one token whatever the
    tokenizer (GPT-2's BPE would merge '111' into one token; the paper's Llama tokenizer splits digits)."""
    q, one, zero = question_ids(tok, task), digit(tok, task, "1"), digit(tok, task, "0")
    if task == "count_ones":
        return q + [one] * (n + 1), q + [one] * n
    return q + [zero] + [one] * n, q + [one] + [one] * n


def probe_lengths(block_size, overhead):
    """The paper's n whose prompts (overhead + n + 1 tokens) fit the context; where fewer than three fit, the same
    proportions of the largest n that fits: round(n_max * n / 2000) for the paper's n."""
    n_max = block_size - overhead - 1
    fits = [n for n in PAPER_NS if n <= n_max]
    return fits if len(fits) >= 3 else sorted({max(1, round(n_max * n / PAPER_NS[-1])) for n in PAPER_NS})


@torch.no_grad()
def final_state(model, ids):
    """The final normalised hidden state (model.norm's output) at the last token, (C,) in float32."""
    got = []
    hook = model.norm.register_forward_hook(lambda m, args, out: got.append(out[0, -1].float()))
    try:
        model(torch.tensor([ids], device=model.rope_cos.device))
    finally:
        hook.remove()
    return got[0]


def collapse_probe(model, tok, ns):
    """Per task and n: the max-abs difference of the two prompts' final states within each head's slice of the
    width, averaged over heads ("raw"), and that divided by its value at the first n ("normalised")."""
    results = {}
    for task in QUESTIONS:
        raw = []
        for n in ns:
            a, b = (final_state(model, ids) for ids in probe_pair(tok, task, n))
            raw.append((a - b).abs().view(model.config.n_head, -1).amax(dim=-1).mean().item())
        results[task] = {"n": list(ns), "raw": raw, "normalised": [r / raw[0] if raw[0] > 0 else math.nan for r in raw]}
    return results


def cmd_collapse(cfg):
    """Representational-collapse probes (count_ones, find_a_zero): how far apart two prompts stay, as n grows."""
    device = resolve_device(cfg.device)
    runs = [(run, *load_run(run, device, cfg)[:2]) for run in run_dirs(cfg)]
    overhead = max(len(question_ids(tok, task)) for _, _, tok in runs for task in QUESTIONS)
    ns = probe_lengths(min(m.config.block_size for _, m, _ in runs), overhead)
    print(f"n = {ns}" + ("" if ns[0] in PAPER_NS else " (the paper's proportions, scaled to fit the context)"))
    results = []
    for run, model, tok in runs:
        res = collapse_probe(model, tok, ns)
        results.append({"out_dir": run[0], "label": run_label(run, model), "attn": model.config.attn, **res})
        for task in QUESTIONS:
            print(f"{run_label(run, model)} {task}: normalised " + " ".join(f"{v:.3f}" for v in res[task]["normalised"])
                  + f"  (raw at n={ns[0]}: {res[task]['raw'][0]:.4f})")
    png, json_path = output_paths(cfg, "collapse")
    write_json(json_path, results)
    plt = pyplot()
    if plt is None:
        return results
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / len(results)
    for r_i, (r, color) in enumerate(zip(results, run_colors(r["attn"] for r in results))):
        for ax, task in zip(axes, QUESTIONS):
            ax.bar([x + (r_i - (len(results) - 1) / 2) * width for x in range(len(ns))], r[task]["normalised"],
                   width, color=color, label=r["label"])
    for ax, task in zip(axes, QUESTIONS):
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlabel("n (tokens between the differing token and the end)")
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"difference / difference at n={ns[0]}\n(higher = less collapse)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png} and {json_path}")
    return results


# -----------------------------------------------------------------------------
# compare: loss curves and final validation losses of several runs


def cmd_compare(cfg):
    """Loss curves of several runs on one PNG; final validation losses, mean ± std per attention kind."""
    if cfg.init_from:
        raise SystemExit("error: compare reads training logs (log.jsonl); the authors' checkpoint files have none")
    runs = []
    for out_dir, _ in run_dirs(cfg):
        log_path = os.path.join(out_dir, "log.jsonl")
        if not os.path.exists(log_path):
            raise SystemExit(f"error: no training log at {log_path}")
        rows = read_log(log_path)
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        attn = load_checkpoint(ckpt_path, mmap=True)["model_config"]["attn"] if os.path.exists(ckpt_path) else "?"
        val = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]
        runs.append({"out_dir": out_dir, "attn": attn, "final_val_loss": val[-1][1] if val else None,
                     "iters": max((r["iter"] for r in rows), default=0), "val": val,
                     "train": [(r["iter"], r["loss"]) for r in rows if "loss" in r]})
    print("| run | attn | iterations | final val loss |\n|---|---|---|---|")
    for r in runs:
        final = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        print(f"| {r['out_dir']} | {r['attn']} | {r['iters']} | {final} |")
    summary = {}
    for kind in dict.fromkeys(r["attn"] for r in runs):
        vals = [r["final_val_loss"] for r in runs if r["attn"] == kind and r["final_val_loss"] is not None]
        if vals:
            m, s = statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)  # sample std
            summary[kind] = {"runs": len(vals), "mean": m, "std": s, "min": min(vals), "max": max(vals)}
            print(f"{kind}: final val loss {m:.4f} ± {s:.4f} (mean ± std over {len(vals)} runs; "
                  f"min {min(vals):.4f}, max {max(vals):.4f})")
    png, json_path = output_paths(cfg, "compare")
    write_json(json_path, {"runs": runs, "summary": summary})
    plt = pyplot()
    if plt is None:
        return runs, summary
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(runs, run_colors(r["attn"] for r in runs)):
        name = os.path.basename(os.path.normpath(r["out_dir"]))
        for ax in axes:
            if r["train"]:
                it, loss = zip(*r["train"])
                smooth = [sum(loss[max(0, i - 4):i + 1]) / len(loss[max(0, i - 4):i + 1]) for i in range(len(loss))]
                ax.plot(it, smooth, color=color, alpha=0.5, lw=0.8)  # mean of the last 5 logged batches
            if r["val"]:
                ax.plot(*zip(*r["val"]), "o-", color=color, ms=3, label=f"{name} ({r['attn']}) val")
    last = [v for r in runs for _, v in r["val"][len(r["val"]) // 2:]]
    if last:  # right panel: the second half of training, where the runs separate
        axes[1].set_xlim(max(r["iters"] for r in runs) / 2, None)
        axes[1].set_ylim(min(last) - 0.02, max(last) + 0.05)
    for ax, title in zip(axes, ("thin: train (mean of 5 logged batches), dots: val", "second half, zoomed")):
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats per token)")
    if any(r["val"] for r in runs):
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png} and {json_path}")
    return runs, summary


# -----------------------------------------------------------------------------
# eval: zero-shot accuracy through EleutherAI's lm-evaluation-harness


class Scorer:
    """Log-likelihoods from a Cogformer, independent of the harness (which wraps it below)."""

    def __init__(self, model, tokenizer, batch_size=16):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.block_size = model.config.block_size

    def loglikelihood(self, pairs):
        """(context, continuation) strings -> (sum of the continuation's log-probabilities, whether greedy decoding
        gives it). As in the harness's models: a context's trailing whitespace moves to the continuation (BPE attaches
        a space to the word after it), the pair is encoded whole and split after the context's tokens, and an empty
        context is an end-of-text token (a document start). With Llama-2's tokenizer both encodings start with BOS,
        as the authors' evaluation (and the harness's Llama models) encode them."""
        requests, bos = [], [self.tok.bos] * (self.tok.bos is not None)
        for ctx, cont in pairs:
            cut = len(ctx.rstrip())
            ctx, cont = ctx[:cut], ctx[cut:] + cont
            ctx_ids, whole = bos + self.tok.encode(ctx), bos + self.tok.encode(ctx + cont)
            requests.append((ctx_ids or [self.tok.eot], whole[len(ctx_ids):]))
        return self.score_tokens(requests)

    def loglikelihood_rolling(self, texts):
        """Sum of log-probabilities of whole texts after a document start (end-of-text, or BOS): each token is
        predicted once, in windows of block_size predictions, the last window with a full context (the harness's
        rolling windows)."""
        requests, owner = [], []
        for n, text in enumerate(texts):
            ids, B = [self.tok.doc_start] + self.tok.encode(text), self.block_size
            for s in range(1, len(ids), B):
                e = min(s + B, len(ids))
                requests.append((ids[max(0, e - 1 - B):s], ids[s:e]))
                owner.append(n)
        totals = [0.0] * len(texts)
        for n, (logprob, _) in zip(owner, self.score_tokens(requests)):
            totals[n] += logprob
        return totals

    @torch.no_grad()
    def score_tokens(self, requests):
        """(context ids, continuation ids) -> (sum logprob, is_greedy), in batches of similar lengths. Contexts are
        left-truncated so context + continuation fits block_size + 1 tokens (the last one is never an input)."""
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = []
            for i in order[start:start + self.batch_size]:
                ctx, cont = requests[i]
                if not cont:
                    results[i] = (0.0, True)
                    continue
                if len(cont) > self.block_size:
                    raise ValueError(f"continuation of {len(cont)} tokens is longer than block_size {self.block_size}")
                full = (list(ctx) + list(cont))[-(self.block_size + 1):]
                batch.append((i, full[:-1], cont))
            if not batch:
                continue
            x = torch.zeros(len(batch), max(len(inp) for _, inp, _ in batch), dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                x[row, :len(inp)] = torch.tensor(inp)  # right padding: causal attention never looks at it
            logits, _ = self.model(x.to(self.model.rope_cos.device))
            for row, (i, inp, cont) in enumerate(batch):
                logp = F.log_softmax(logits[row, len(inp) - len(cont):len(inp)].float(), dim=-1)  # (len(cont), V)
                target = torch.tensor(cont, device=logp.device)
                results[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
        return results


def harness_lm(scorer):
    """The Scorer as an lm_eval.api.model.LM."""
    from lm_eval.api.model import LM

    class NanoCogLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("nanoCog's adapter scores text; generation tasks are not supported")

    return NanoCogLM()


# zero-shot accuracy (acc, %) of the authors' released 141M checkpoints in their lm-eval logs (docs/paper.md)
AUTHORS_LOGGED = {
    "softmax": {"arc_challenge": 19.54, "arc_easy": 42.34, "piqa": 57.73, "mnli": 33.21, "mrpc": 68.63, "qqp": 36.82,
                "rte": 51.99},
    "cog": {"arc_challenge": 19.54, "arc_easy": 43.90, "piqa": 59.09, "mnli": 34.12, "mrpc": 68.38, "qqp": 37.00,
            "rte": 52.71},
}


def eval_table(table, tasks, logged):
    """The markdown table of accuracies: a column per run, and for a run with logged numbers (the authors'
    checkpoints: {task: acc}) two more, their logged accuracy and ours minus theirs."""
    head, rows = ["task"], {t: [t] for t in tasks + ["mean"]}
    for label, accs in table.items():
        ref = logged.get(label)
        head += [label] + (["authors' log", "difference"] if ref else [])
        for t in tasks + ["mean"]:
            shared = [u for u in accs if ref is None or u in ref]
            mean = t == "mean" and shared
            ours = statistics.mean(accs[u] for u in shared) if mean else accs.get(t)
            theirs = None if ref is None else statistics.mean(ref[u] for u in shared) if mean else ref.get(t)
            rows[t].append("-" if ours is None else f"{ours:.2f}")
            if ref:
                rows[t] += ["-" if theirs is None else f"{theirs:.2f}",
                            "-" if ours is None or theirs is None else f"{ours - theirs:+.2f}"]
    rows["mean"][0] = "mean (of the tasks with a number)" if logged else f"mean of {len(tasks)}"
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows.values()])


def cmd_eval(cfg):
    """Zero-shot accuracy through EleutherAI's lm-evaluation-harness, one column per run."""
    check_at_least(cfg, 1, "batch_size")
    check_at_least(cfg, 0, "limit")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("error: analyze.py eval needs EleutherAI's lm-evaluation-harness: pip install lm-eval") from None
    device, tasks = resolve_device(cfg.device), [t for t in cfg.tasks.split(",") if t]
    table, logged, task_manager = {}, {}, TaskManager(include_path=cfg.include_path or None)
    for run in run_dirs(cfg):
        model, tok, _ = load_run(run, device, cfg)
        out = lm_eval.simple_evaluate(model=harness_lm(Scorer(model, tok, cfg.batch_size)), tasks=tasks,
                                      num_fewshot=0, limit=cfg.limit or None, log_samples=False,
                                      task_manager=task_manager)
        accs = {t: 100 * out["results"][t]["acc,none"] for t in tasks if "acc,none" in out["results"].get(t, {})}
        label = run_label(run, model)
        table[label] = accs
        if run[1]:  # one of the authors' checkpoints: set its numbers beside their logged ones
            logged[label] = AUTHORS_LOGGED[model.config.attn]
        write_json(fresh_path(os.path.join(run_folder(run), "eval.json")), {"tasks": accs, "limit": cfg.limit,
                                                                "results": out["results"]})
    print(eval_table(table, tasks, logged))
    if cfg.limit:
        print(f"(--limit={cfg.limit}: a quick check on part of each task, not comparable with the full logs)")
    return table


# -----------------------------------------------------------------------------

COMMANDS = {"attention": (AttentionConfig, cmd_attention), "collapse": (RunsConfig, cmd_collapse),
            "compare": (RunsConfig, cmd_compare), "eval": (EvalConfig, cmd_eval)}


USAGE = f"usage: python analyze.py {{{','.join(COMMANDS)}}} --out_dir=DIR [--key=value ...]"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n{__doc__.rstrip()}\n\nsubcommands (python analyze.py SUBCOMMAND --help for its keys):")
        for name, (_, command) in COMMANDS.items():
            print(f"  {name:<11}{command.__doc__}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        problem = f"error: unknown subcommand {argv[0]!r}\n" if argv else ""
        raise SystemExit(f"{problem}{USAGE}   (--help says more)")
    config_cls, command = COMMANDS[argv[0]]
    # --init_from may be repeated: the files join into one comma-separated value
    files = [a.partition("=")[2] for a in argv[1:] if a.startswith("--init_from=")]
    rest = [a for a in argv[1:] if not a.startswith("--init_from=")] + [f"--init_from={','.join(files)}"] * bool(files)
    cfg = parse_config(config_cls, None, rest, usage=f"python analyze.py {argv[0]} --out_dir=DIR",
                       description=command.__doc__)
    png_folder = os.path.dirname(getattr(cfg, "png", "")) or "."
    require(os.path.isdir(png_folder), f"--png={getattr(cfg, 'png', '')}: there is no folder {png_folder}")
    print_config(cfg)
    with torch.no_grad():
        return command(cfg)


if __name__ == "__main__":
    run_script(main)

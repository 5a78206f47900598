"""
Small generated tasks on which one Cog head does what one softmax head cannot: Cog against softmax at equal size,
steps and learning rate, over several seeds, trained from scratch on the CPU in a few minutes.

    python toy.py                                  # the table, and out/toy/toy_majority_attention.png
    python toy.py --seeds=5 --steps=3000 --out_dir=out/toy2

Task "majority" (query-dependent majority): a sequence of X and Y tokens, n of them (n random, 1..max_len, X's count
random, never a tie), then a query token A or B. After A the answer is YES when X outnumbers Y; after B, YES when Y
outnumbers X. One Cog head solves it exactly: the query's type gets weight +1/n and the other type -1/n, the sign
coming from q.k and flipping with the query (test_toy.py sets such a head by hand). A softmax head's weights are
positive, so whatever the query its share on X among the X and Y tokens grows with the count of X; it can only
approximate the answer through the weight left on the query itself.

The models are the project's Cogformer with attention-only blocks (ffn_hidden=0): all layers Cog (softmax_layers="")
or all softmax, trained with Adam on the prediction at the last position. Progress goes to stderr (tqdm).
"""
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from analyze import attention_figure, attention_maps, pyplot
from model import Cogformer, CogformerConfig
from train_utils import check_at_least, parse_config, print_config, require, run_script


@dataclass
class ToyConfig:
    tasks: str = "majority"  # comma-separated; the tasks: majority
    seeds: int = 3  # seeds per (task, model); the table gives mean and spread over them
    steps: int = 1000  # Adam steps per model
    batch_size: int = 64
    learning_rate: float = 1e-2
    n_embd: int = 16
    max_len: int = 16  # the most X and Y tokens in a sequence
    eval_size: int = 2000  # held-out sequences per model
    catch_up: str = "2x1,1x2"  # softmax heads x layers tried on the majority task, "" for none
    out_dir: str = "out/toy"  # where the PNG goes; an existing PNG there is never overwritten


# -----------------------------------------------------------------------------
# task 1: query-dependent majority

X, Y, A, B, YES, NO = range(6)
VOCAB = ["X", "Y", "A", "B", "YES", "NO"]


def majority_batch(batch_size, n, generator):
    """batch_size sequences of n X/Y tokens and a query (B, n + 1), and the answers (B,). X's count is uniform over
    0..n without the tie n/2, so that every sequence has an answer."""
    if n % 2:  # odd n: no tie possible, all n + 1 counts
        counts = torch.randint(0, n + 1, (batch_size,), generator=generator)
    else:  # even n: n of the n + 1 counts, the tie n / 2 skipped
        counts = torch.randint(0, n, (batch_size,), generator=generator)
        counts = counts + (counts >= n // 2).long()
    order = torch.rand(batch_size, n, generator=generator).argsort(dim=1)
    items = torch.where(order < counts[:, None], X, Y)  # each row: counts[i] X's in random places
    query = torch.where(torch.rand(batch_size, generator=generator) < 0.5, A, B)
    x_wins = counts > n - counts
    answer = torch.where(x_wins == (query == A), YES, NO)
    return torch.cat([items, query[:, None]], dim=1), answer


def majority_answer(seq):
    """The rule, one sequence (a list of ids) at a time: the reference the generator is tested against."""
    nx, ny = seq[:-1].count(X), seq[:-1].count(Y)
    return YES if (nx > ny) == (seq[-1] == A) else NO


TASKS = {"majority": majority_batch}


# -----------------------------------------------------------------------------
# models, training, evaluation

def make_model(attn, n_head, n_layer, cfg):
    """An attention-only Cogformer: every layer Cog (attn="cog", no softmax layers) or every layer softmax."""
    return Cogformer(CogformerConfig(block_size=cfg.max_len + 1, vocab_size=len(VOCAB), n_layer=n_layer,
                                     n_head=n_head, n_embd=cfg.n_embd, ffn_hidden=0, attn=attn, softmax_layers=""))


def last_logits(model, idx):
    """The logits of the two answers at the last position, (B, 2): YES, NO."""
    logits, _ = model(idx)
    return logits[:, -1, [YES, NO]]


def answer_loss(model, idx, answer):
    return F.cross_entropy(last_logits(model, idx).float(), (answer == NO).long())


def train(model, task, cfg, seed, progress=None):
    """Adam on fresh batches; every batch has one length, drawn at random, so each length is seen. Returns the
    losses, one per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    losses = []
    for _ in range(cfg.steps):
        n = int(torch.randint(1, cfg.max_len + 1, (1,), generator=g))
        idx, answer = TASKS[task](cfg.batch_size, n, g)
        loss = answer_loss(model, idx, answer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update()
    return losses


@torch.no_grad()
def accuracy(model, task, cfg, seed=12345):
    """Accuracy on eval_size held-out sequences, spread evenly over the lengths 1..max_len."""
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    per_len = max(1, cfg.eval_size // cfg.max_len)
    for n in range(1, cfg.max_len + 1):
        idx, answer = TASKS[task](per_len, n, g)
        guess = torch.where(last_logits(model, idx).argmax(-1) == 0, YES, NO)
        correct += (guess == answer).sum().item()
        total += len(answer)
    return correct / total


# -----------------------------------------------------------------------------
# the table and the picture

def parse_shapes(text):
    """'2x1,1x2' -> [(2, 1), (1, 2)]: heads x layers."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        heads, _, layers = item.partition("x")
        require(heads.isdigit() and layers.isdigit() and int(heads) > 0 and int(layers) > 0,
                f"--catch_up: {item!r} is not HEADSxLAYERS (e.g. 2x1)")
        shapes.append((int(heads), int(layers)))
    return shapes


def spread(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f} " \
           f"({min(values):.3f}-{max(values):.3f})"


def attention_runs(models, examples):
    """analyze.attention_figure's input: each model's last-token weights on each example, every layer and head."""
    runs = []
    for label, model in models:
        for example in examples:
            maps, _ = attention_maps(model, example[None])
            rows = torch.stack([w[0, :, -1, :] for w in maps])  # (L, nh, T)
            tokens = [VOCAB[i] for i in example.tolist()]
            runs.append({"label": f"{label}, query {tokens[-1]}", "tokens": tokens, "weights": rows.tolist(),
                         "layers": [{"layer": i, "kind": b.attn.kind} for i, b in enumerate(model.blocks)]})
    return runs


def write_picture(path, runs, title):
    plt = pyplot()
    if plt is None:
        return
    fig = attention_figure(plt, runs)
    for ax, run in zip(fig.axes, runs):
        ax.set_title(f"{run['label']}: {title}", fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    print(f"wrote {path}")


def run_task(task, cfg, shapes, progress):
    """Train every model of the table for this task over the seeds: rows of (attention, heads, layers, accuracies),
    and the first seed's one-head models for the picture."""
    rows, first = [], {}
    for attn, heads, layers in [("cog", 1, 1), ("softmax", 1, 1)] + [("softmax", h, l) for h, l in shapes]:
        accs = []
        for seed in range(cfg.seeds):
            torch.manual_seed(seed)
            model = make_model(attn, heads, layers, cfg)
            train(model, task, cfg, seed, progress)
            accs.append(accuracy(model, task, cfg))
            if seed == 0 and (heads, layers) == (1, 1):
                first[attn] = model
        rows.append((task, attn, heads, layers, accs))
    return rows, first


def majority_examples(max_len):
    """Fixed examples for the picture: one sequence of X and Y (Y outnumbers X), asked with A (NO) and with B (YES)."""
    items = [{"X": X, "Y": Y}[c] for c in "XYYXYYXYXYYY"[:max_len]]
    return [torch.tensor(items + [query]) for query in (A, B)]


def main(argv=None):
    cfg = parse_config(ToyConfig, None, argv, usage="python toy.py [--key=value ...]", description=__doc__)
    check_at_least(cfg, 1, "seeds", "steps", "batch_size", "n_embd", "eval_size")
    check_at_least(cfg, 2, "max_len")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    for t in tasks:
        require(t in TASKS, f"--tasks: unknown task {t!r} (the tasks: {', '.join(TASKS)})")
    shapes = parse_shapes(cfg.catch_up)
    pngs = [os.path.join(cfg.out_dir, f"toy_{t}_attention.png") for t in tasks]
    for png in pngs:  # before any training: refuse rather than overwrite an earlier picture
        require(not os.path.exists(png), f"{png} exists: pass a fresh --out_dir")
    print_config(cfg)
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (10x slower on a busy machine)
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    rows = []
    total = len(tasks) * cfg.seeds * (2 + len(shapes)) * cfg.steps
    with tqdm(total=total, desc="training", unit="step", leave=False) as progress:
        for task, png in zip(tasks, pngs):
            task_rows, first = run_task(task, cfg, shapes, progress)
            rows += task_rows
            with torch.no_grad():
                runs = attention_runs([(f"{a}, 1 head", first[a]) for a in ("cog", "softmax")],
                                      majority_examples(cfg.max_len))
            write_picture(png, runs, "the last token's weights")
    print(f"\n| task | attention | heads | layers | accuracy: mean ± std (min-max) over {cfg.seeds} seeds |")
    print("|---|---|---|---|---|")
    for task, attn, heads, layers, accs in rows:
        print(f"| {task} | {attn} | {heads} | {layers} | {spread(accs)} |")
    print(f"\n{cfg.steps} steps per model, {time.time() - t0:.0f} s in all")
    return rows


if __name__ == "__main__":
    run_script(main)

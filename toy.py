"""
Small generated tasks on which one Cog head does what one softmax head cannot (and one where it does not): Cog
against softmax at equal size, steps and learning rate, over several seeds, trained from scratch on the CPU in a few
minutes.

    python toy.py                      # the table, and out/toy/toy_{majority,deletion}_attention.png
    python toy.py --tasks=deletion --names=4 --seeds=5 --out_dir=out/toy2

Task "majority" (query-dependent majority): a sequence of X and Y tokens, n of them (n random, 1..max_len, X's count
random, never a tie), then a query token A or B. After A the answer is YES when X outnumbers Y; after B, YES when Y
outnumbers X. One Cog head solves it exactly: the query's type gets weight +1/n and the other type -1/n, the sign
coming from q.k and flipping with the query (test_toy.py sets such a head by hand). A softmax head's weights are
positive, so whatever the query its share on X among the X and Y tokens grows with the count of X; it can only
approximate the answer through the weight left on the query itself.

Task "deletion" (the shape of indirect-object identification): k distinct names, then all but one of them again in a
random order, then "?"; the answer is the name said only once. One Cog head solves it exactly: weight +w on the first
k positions and -w on the repeats, so each repeated name cancels and only the answer is left. In one layer a key sees
only its own token and place, so a softmax head weights each of the first k positions alike whether or not its name
comes again, and a name's logit moves one way with the weight on its positions: names absent from the sequence get
none, the answer its first mention's, a repeated name its first mention's plus a positive second one. The answer sits
in the middle and can only come out on top through the head's preference for some names or places over others: it
finds the k names, not the one said once.

Task "retrieval" (key-value recall): d + 1 pairs of a key and a value, then one of the keys; the answer is its value.
The other d pairs are distractors. It needs two layers (a value must first learn which key it follows), the same
shape for both kinds; the table gives accuracy at each distractor count.

The models are the project's Cogformer with attention-only blocks (ffn_hidden=0): all layers Cog (softmax_layers="")
or all softmax, trained with Adam on the prediction at the last position, read out over the task's answers only.
Progress goes to stderr: a bar on a terminal, a plain line at each tenth of the way elsewhere.
"""
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analyze import attention_figure, attention_maps, pyplot
from cli import check_at_least, option, parse_config, print_config, require, run_script
from logs import progress as progress_bar
from model import Cogformer, CogformerConfig
from training import set_cpu_threads


@dataclass
class ToyConfig:
    tasks: str = option("majority,deletion,retrieval", "comma-separated; the tasks: majority, deletion, retrieval")
    seeds: int = option(3, "seeds per (task, model); the table gives mean and spread over them")
    steps: int = option(1000, "Adam steps per model (majority and deletion)")
    batch_size: int = 64
    learning_rate: float = option(1e-2, "majority and deletion")
    n_embd: int = 16
    max_len: int = option(16, "majority: the most X and Y tokens in a sequence")
    names: int = option(3, "deletion: the names listed (2..8), all but one then said again")
    distractors: str = option("2,4,8,16", "retrieval: the counts of distractor pairs evaluated (trained on 0..the "
                              "largest)")
    eval_size: int = option(2000, "held-out sequences per model")
    catch_up: str = option("2x1,4x1,1x2", "majority and deletion: the softmax heads x layers tried besides 1x1, "
                           '"" for none')
    retrieval_shape: str = option("1x2", "retrieval: the heads x layers of both kinds' models")
    retrieval_steps: int = option(3000, "retrieval: Adam steps per model (a lookup is learnt after a plateau)")
    retrieval_learning_rate: float = option(3e-3, "retrieval: 1e-2 leaves both kinds on the plateau more often")
    retrieval_mixed: bool = option(False, "retrieval: also the two-layer models with one softmax and one Cog layer")
    out_dir: str = option("out/toy", "where the PNGs go; an existing PNG there is never overwritten")


# -----------------------------------------------------------------------------
# the tokens: each task has its own vocabulary, so a model has no embedding that its task never uses

X, Y, A, B, YES, NO = range(6)
NAMES = ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal"]
NAME_IDS, ASK = list(range(len(NAMES))), len(NAMES)
KEYS, VALUES = list("abcdefghijklmnopqrst"), list("0123456789")  # 20 keys: up to 19 distractor pairs
KEY_IDS, VALUE_IDS = list(range(len(KEYS))), list(range(len(KEYS), len(KEYS) + len(VALUES)))
VOCABS = {"majority": ["X", "Y", "A", "B", "YES", "NO"], "deletion": NAMES + ["?"], "retrieval": KEYS + VALUES}


# -----------------------------------------------------------------------------
# task 1: query-dependent majority


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


# -----------------------------------------------------------------------------
# task 2: deletion, the shape of indirect-object identification ("Mary and John went out; John gave a drink to" Mary)

def deletion_batch(batch_size, k, generator):
    """k distinct names, then all but one of them again in a random order, then "?": (B, 2k), and the answers (B,),
    the name said only once."""
    names = torch.tensor(NAME_IDS)[torch.rand(batch_size, len(NAMES), generator=generator).argsort(dim=1)[:, :k]]
    once = torch.randint(0, k, (batch_size,), generator=generator)
    again = names[torch.arange(k)[None, :] != once[:, None]].view(batch_size, k - 1)
    again = again.gather(1, torch.rand(batch_size, k - 1, generator=generator).argsort(dim=1))
    idx = torch.cat([names, again, torch.full((batch_size, 1), ASK)], dim=1)
    return idx, names.gather(1, once[:, None])[:, 0]


def deletion_answer(seq):
    """The rule, one sequence at a time: the name that occurs once."""
    (name,) = [t for t in seq if t in NAME_IDS and seq.count(t) == 1]
    return name


# -----------------------------------------------------------------------------
# task 3: retrieval, key-value recall among distractor pairs

def retrieval_batch(batch_size, d, generator):
    """d + 1 pairs of a key (distinct within a sequence) and a value, then one of the keys again: (B, 2d + 3), and the
    answers (B,), that key's value. The other d pairs are the distractors."""
    n = d + 1
    keys = torch.tensor(KEY_IDS)[torch.rand(batch_size, len(KEYS), generator=generator).argsort(dim=1)[:, :n]]
    values = torch.tensor(VALUE_IDS)[torch.randint(0, len(VALUES), (batch_size, n), generator=generator)]
    asked = torch.randint(0, n, (batch_size, 1), generator=generator)
    idx = torch.cat([torch.stack([keys, values], dim=2).view(batch_size, 2 * n), keys.gather(1, asked)], dim=1)
    return idx, values.gather(1, asked)[:, 0]


def retrieval_answer(seq):
    """The rule, one sequence at a time: the value right after the first occurrence of the last token."""
    return seq[seq.index(seq[-1]) + 1]


TASKS = {"majority": majority_batch, "deletion": deletion_batch, "retrieval": retrieval_batch}
ANSWERS = {"majority": [YES, NO], "deletion": NAME_IDS, "retrieval": VALUE_IDS}  # the readout's choices


# -----------------------------------------------------------------------------
# models, training, evaluation

def parse_ints(text, key):
    """'2,4,8' -> [2, 4, 8]."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    require(items and all(t.isdigit() for t in items), f"--{key}: {text!r} is not a comma-separated list of counts")
    return [int(t) for t in items]


def task_sizes(task, cfg):
    """The sizes a task's batches come in: those trained on (one drawn at random per batch), and the table's cells,
    each (metric, the sizes evaluated)."""
    if task == "majority":  # size: the count of X and Y tokens
        sizes = list(range(1, cfg.max_len + 1))
        return sizes, [("accuracy", sizes)]
    if task == "deletion":  # size: the count of names
        return [cfg.names], [("accuracy", [cfg.names])]
    distractors = parse_ints(cfg.distractors, "distractors")  # retrieval; size: the count of distractor pairs
    return list(range(max(distractors) + 1)), [(f"accuracy, {d} distractors", [d]) for d in distractors]


def make_model(attn, n_head, n_layer, cfg, task="majority"):
    """An attention-only Cogformer: every layer Cog (attn="cog", no softmax layers), every layer softmax, or one kind
    per layer ("softmax+cog": layer 0 softmax, layer 1 Cog)."""
    longest = TASKS[task](1, max(task_sizes(task, cfg)[0]), torch.Generator())[0].shape[1]
    kinds = attn.split("+")
    softmax_layers = ",".join(str(i) for i, kind in enumerate(kinds) if kind == "softmax") if len(kinds) > 1 else ""
    return Cogformer(CogformerConfig(block_size=longest, vocab_size=len(VOCABS[task]), n_layer=n_layer, n_head=n_head,
                                     n_embd=cfg.n_embd, ffn_hidden=0, attn=kinds[0] if len(kinds) == 1 else "cog",
                                     softmax_layers=softmax_layers))


def last_logits(model, task, idx):
    """The logits of the task's answers at the last position, (B, len(ANSWERS[task]))."""
    logits, _ = model(idx)
    return logits[:, -1, ANSWERS[task]]


def answer_index(task, answer):
    """Answer tokens -> their places in ANSWERS[task]."""
    return (answer[:, None] == torch.tensor(ANSWERS[task])).long().argmax(1)


def answer_loss(model, task, idx, answer):
    return F.cross_entropy(last_logits(model, task, idx).float(), answer_index(task, answer))


def task_steps(task, cfg):
    """A task's Adam steps and learning rate."""
    if task == "retrieval":
        return cfg.retrieval_steps, cfg.retrieval_learning_rate
    return cfg.steps, cfg.learning_rate


def train(model, task, cfg, seed, progress=None):
    """Adam on fresh batches; every batch has one size, drawn at random, so each size is seen. Returns the losses,
    one per step."""
    g = torch.Generator().manual_seed(seed)
    steps, lr = task_steps(task, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sizes = task_sizes(task, cfg)[0]
    losses = []
    for _ in range(steps):
        n = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]
        idx, answer = TASKS[task](cfg.batch_size, n, g)
        loss = answer_loss(model, task, idx, answer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update()
    return losses


@torch.no_grad()
def accuracy(model, task, cfg, sizes=None, seed=12345):
    """Accuracy on eval_size held-out sequences, spread evenly over the sizes (default: all the task trains on)."""
    g = torch.Generator().manual_seed(seed)
    sizes = task_sizes(task, cfg)[0] if sizes is None else sizes
    correct = total = 0
    for n in sizes:
        idx, answer = TASKS[task](max(1, cfg.eval_size // len(sizes)), n, g)
        correct += (last_logits(model, task, idx).argmax(-1) == answer_index(task, answer)).sum().item()
        total += len(answer)
    return correct / total


# -----------------------------------------------------------------------------
# the table and the pictures

def parse_shapes(text, key):
    """'2x1,1x2' -> [(2, 1), (1, 2)]: heads x layers."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        heads, _, layers = item.partition("x")
        require(heads.isdigit() and layers.isdigit() and int(heads) > 0 and int(layers) > 0,
                f"--{key}: {item!r} is not HEADSxLAYERS (e.g. 2x1)")
        shapes.append((int(heads), int(layers)))
    return shapes


SOLVED = 0.95  # an accuracy that counts a seed as having learnt the task (the plateaus sit far below it)


def spread(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f} " \
           f"({min(values):.3f}-{max(values):.3f})"


@torch.no_grad()
def copy_gains(model):
    """What a weight of +1 on a token adds to that token's own logit through a one-layer, one-head model's values
    (before the final norm, which only scales), one gain per vocabulary entry: its sign says whether attending to a
    token copies it (+) or deletes it (-). Training may give some names negative values and negative weights at once."""
    block = model.blocks[0]
    n_embd = model.tok_emb.weight.shape[1]
    values = F.linear(block.attn_norm(model.tok_emb.weight), block.attn.qkv.weight[2 * n_embd:])
    return (model.lm_head.weight * block.attn.proj(values)).sum(1)


@torch.no_grad()
def deletion_weights(model, cfg, seed=12345):
    """A one-layer, one-head model's mean copy weight from the last token "?" (its weight times the sign of the
    token's copy gain, so that + raises the token's logit and - lowers it), over eval_size held-out sequences, on each
    kind of position: the name said once (the answer), a repeated name's first mention and its second."""
    g = torch.Generator().manual_seed(seed)
    k = cfg.names
    idx, answer = deletion_batch(cfg.eval_size, k, g)
    (w,), _ = attention_maps(model, idx)
    row = w[:, 0, -1, :] * copy_gains(model).sign()[idx]  # (B, T)
    is_once = idx[:, :k] == answer[:, None]
    return {"copy weight: the name said once": row[:, :k][is_once].mean().item(),
            "copy weight: repeated name, 1st": row[:, :k][~is_once].mean().item(),
            "copy weight: repeated name, 2nd": row[:, k:2 * k - 1].mean().item()}


def task_models(task, cfg):
    """The models of the table for a task: (attention, heads, layers)."""
    if task == "retrieval":
        shapes = parse_shapes(cfg.retrieval_shape, "retrieval_shape")
        require(len(shapes) == 1, f"--retrieval_shape: {cfg.retrieval_shape!r} is not one HEADSxLAYERS")
        heads, layers = shapes[0]
        require(layers == 2 or not cfg.retrieval_mixed, "--retrieval_mixed needs a two-layer --retrieval_shape")
        mixed = ["softmax+cog", "cog+softmax"] if cfg.retrieval_mixed else []
        return [(attn, heads, layers) for attn in ["cog", "softmax"] + mixed]
    return [("cog", 1, 1), ("softmax", 1, 1)] + [("softmax", h, l) for h, l in parse_shapes(cfg.catch_up, "catch_up")]


def run_task(task, cfg, progress):
    """Train every model of the table for this task over the seeds: rows of (task, attention, heads, layers, metric,
    values over the seeds), and the first seed's one-head models for the picture."""
    rows, first = [], {}
    for attn, heads, layers in task_models(task, cfg):
        values = {}
        for seed in range(cfg.seeds):
            torch.manual_seed(seed)
            model = make_model(attn, heads, layers, cfg, task)
            train(model, task, cfg, seed, progress)
            for metric, sizes in task_sizes(task, cfg)[1]:
                values.setdefault(metric, []).append(accuracy(model, task, cfg, sizes))
            if task == "deletion" and (heads, layers) == (1, 1):
                for metric, w in deletion_weights(model, cfg).items():
                    values.setdefault(metric, []).append(w)
            if seed == 0 and (heads, layers) == (1, 1):
                first[attn] = model
        rows += [(task, attn, heads, layers, metric, v) for metric, v in values.items()]
    return rows, first


def majority_examples(cfg):
    """Fixed examples for the picture: one sequence of X and Y (Y outnumbers X), asked with A (NO) and with B (YES)."""
    items = [{"X": X, "Y": Y}[c] for c in "XYYXYYXYXYYY"[:cfg.max_len]]
    return [(torch.tensor(items + [q]), f"query {VOCABS['majority'][q]}") for q in (A, B)]


def deletion_examples(cfg):
    """Fixed examples for the picture: the first names listed, then all but the second again (reversed), or all but
    the first."""
    names = NAME_IDS[:cfg.names]
    again = [n for n in reversed(names) if n != names[1]], names[1:]
    return [(torch.tensor(names + a + [ASK]), f"answer {NAMES[o]}") for a, o in zip(again, (names[1], names[0]))]


EXAMPLES = {"majority": majority_examples, "deletion": deletion_examples}  # the tasks with a picture


def attention_runs(models, examples, vocab):
    """analyze.attention_figure's input: each model's last-token weights on each example, every layer and head."""
    runs = []
    for label, model in models:
        for example, caption in examples:
            maps, _ = attention_maps(model, example[None])
            rows = torch.stack([w[0, :, -1, :] for w in maps])  # (L, nh, T)
            runs.append({"label": f"{label}, {caption}", "tokens": [vocab[i] for i in example.tolist()],
                         "weights": rows.tolist(), "layers": [{"layer": i, "kind": b.attn.kind}
                                                              for i, b in enumerate(model.blocks)]})
    return runs


def write_picture(path, runs, title):
    plt = pyplot()
    if plt is None:
        return
    fig = attention_figure(plt, runs)
    fig.set_figwidth(max(fig.get_figwidth(), 6))  # room for the titles of a short sequence
    for ax, run in zip(fig.axes, runs):
        ax.set_title(f"{run['label']}: {title}", fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    cfg = parse_config(ToyConfig, None, argv, usage="python toy.py [--key=value ...]", description=__doc__)
    check_at_least(cfg, 1, "seeds", "steps", "retrieval_steps", "batch_size", "n_embd", "eval_size")
    check_at_least(cfg, 2, "max_len", "names")
    require(cfg.names <= len(NAMES), f"--names={cfg.names}: must be at most {len(NAMES)}")
    require(max(parse_ints(cfg.distractors, "distractors")) < len(KEYS),
            f"--distractors: at most {len(KEYS) - 1} (there are {len(KEYS)} keys)")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    for t in tasks:
        require(t in TASKS, f"--tasks: unknown task {t!r} (the tasks: {', '.join(TASKS)})")
    models = {t: task_models(t, cfg) for t in tasks}  # (also checks --catch_up and --retrieval_shape)
    for heads, layers in {(h, l) for m in models.values() for _, h, l in m}:
        require(cfg.n_embd % heads == 0 and cfg.n_embd // heads % 2 == 0,
                f"{heads}x{layers}: --n_embd={cfg.n_embd} must split into {heads} heads of even size")
    pngs = {t: os.path.join(cfg.out_dir, f"toy_{t}_attention.png") for t in tasks if t in EXAMPLES}
    for png in pngs.values():  # before any training: refuse rather than overwrite an earlier picture
        require(not os.path.exists(png), f"{png} exists: pass a fresh --out_dir")
    print_config(cfg)
    biggest = max((make_model(a, h, l, cfg, t) for t, m in models.items() for a, h, l in m),
                  key=lambda model: model.num_params()["total"])
    set_cpu_threads("cpu", biggest, cfg.batch_size * biggest.config.block_size)  # tiny models: one thread
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    rows = []
    total = sum(len(m) * task_steps(t, cfg)[0] for t, m in models.items()) * cfg.seeds
    with progress_bar(total=total, desc="training", unit="steps", leave=False) as progress:
        for task in tasks:
            task_rows, first = run_task(task, cfg, progress)
            rows += task_rows
            if task in pngs:
                with torch.no_grad():
                    runs = attention_runs([(f"{a}, 1 head", first[a]) for a in ("cog", "softmax")],
                                          EXAMPLES[task](cfg), VOCABS[task])
                write_picture(pngs[task], runs, "the last token's weights")
    print(f"\n| task | attention | heads | layers | metric | mean ± std (min-max) over {cfg.seeds} seeds | "
          f"seeds at {SOLVED:.2f} or more |")
    print("|---|---|---|---|---|---|---|")
    for task, attn, heads, layers, metric, values in rows:
        solved = f"{sum(v >= SOLVED for v in values)} of {len(values)}" if metric.startswith("accuracy") else "-"
        print(f"| {task} | {attn} | {heads} | {layers} | {metric} | {spread(values)} | {solved} |")
    steps = ", ".join(f"{t} {task_steps(t, cfg)[0]}" for t in tasks)
    print(f"\nsteps per model: {steps}; {time.time() - t0:.0f} s in all")
    return rows


if __name__ == "__main__":
    run_script(main)

"""
Token datasets for train_lm.py in nanoGPT's format: train.bin and val.bin hold uint16 token ids with an end-of-text
token after every document, and meta.json says how they were made (tokenizer, vocab size, token counts, source).

    python data/prepare_lm.py --dataset=redpajama                  # -> data/redpajama: GPT-2 BPE, up to 1B tokens
    python data/prepare_lm.py --files='corpus/*.jsonl' --out_dir=data/mine [--tokenizer=bytes]
    python data/prepare_lm.py --dataset=pystdlib                   # the offline demo corpus (train_lm.py makes it itself)

- redpajama: the hub's togethercomputer/RedPajama-Data-1T-Sample, 11 JSONL files (arxiv, book, c4, five
  CommonCrawl dumps, github, stackexchange, wikipedia; ~5.4 GB, ~1B tokens, a "text" field per line), streamed through
  datasets' generic "json" builder, never downloaded whole. --source takes other files or URLs (comma-separated, or
  @list.txt with one per line), e.g. the JSONL URLs of the full RedPajama-Data-1T that the paper's 100B tokens came from.
- --files: local .jsonl files (a "text" field per line, one document each) or .txt files (one document per file).
- pystdlib: the .py sources of this Python's standard library (no tests, no site-packages, no generated tables),
  byte-level: ~10 MB, no network, deterministic.
Tokenizers: gpt2 (tiktoken, end-of-text 50256) or bytes (UTF-8 bytes, vocab 256; byte 0 is end-of-text: NUL never
occurs in real text and is dropped if it does), or llama2: Llama-2's 32,000-token sentencepiece vocabulary, the one
the paper's authors trained with. Each document is then <s> text </s> (BOS 1, EOS 2), as their evaluation feeds text
after BOS. --tokenizer_path says where it is: a folder or hub id (transformers' AutoTokenizer; the default is the
gated meta-llama/Llama-2-7b-hf) or a tokenizer.model file (sentencepiece).
--max_tokens (default 1B, about the whole RedPajama sample, 2 GB on disk) caps train + val; each source file gets a
share proportional to its size, so a small budget still mixes every source. Every round(1/val_fraction)-th document
(evenly spaced) goes to val. Output is written to temporary files and renamed at the end; a folder that already holds a
different dataset is refused.
"""

import argparse
import glob
import json
import multiprocessing
import os
import signal
import sys
import sysconfig
from collections import deque
from contextlib import ExitStack
from itertools import islice
from types import SimpleNamespace

import numpy as np

try:
    from logs import progress
except ImportError:  # run as python data/prepare_lm.py: the project's modules are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from logs import progress

REDPAJAMA_SAMPLE = "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/*.jsonl"
RECIPE_KEYS = ("source", "tokenizer", "max_tokens", "val_fraction")  # equal recipes make equal datasets
LLAMA2_HUB = "meta-llama/Llama-2-7b-hf"  # the Llama-2 tokenizer's home on the hub (gated: licence and token needed)
PYSTDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}


class Tokenizer:
    """GPT-2 BPE through tiktoken, bytes, or Llama-2's sentencepiece vocabulary. encode() never emits the end-of-text
    (or BOS) token; documents add them. bos is None for tokenizers without one (gpt2, bytes)."""

    def __init__(self, name, path=""):
        self.name, self.path, self.bos = name, path, None
        if name == "llama2":
            self.enc, self.vocab_size, self.bos, self.eot = load_llama2(path or LLAMA2_HUB)
        elif name == "gpt2":
            import tiktoken
            try:
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as err:  # the vocabulary is downloaded on first use
                raise SystemExit(f"error: cannot load tiktoken's GPT-2 vocabulary ({type(err).__name__}: {err}); "
                                 "it is fetched from the internet on first use. Offline, use --tokenizer=bytes") from None
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif name == "bytes":
            self.enc, self.vocab_size, self.eot = None, 256, 0
        else:
            raise SystemExit(f"error: unknown tokenizer {name!r} (choose gpt2, bytes or llama2)")

    @property
    def doc_start(self):
        """The token a document starts after: BOS, or else end-of-text (which ends the document before it)."""
        return self.eot if self.bos is None else self.bos

    def encode(self, text):
        if self.name == "llama2":
            return self.enc.encode(text)
        if self.enc is not None:
            return self.enc.encode_ordinary(text)
        return list(text.replace("\0", "").encode("utf-8"))

    def decode(self, ids):
        if self.enc is not None:
            return self.enc.decode(ids)
        parts = bytes(ids).split(b"\0")  # end-of-text shown as GPT-2 shows it
        return "<|endoftext|>".join(p.decode("utf-8", errors="replace") for p in parts)

    def encode_document(self, text):
        """The document's ids followed by end-of-text (after BOS if the tokenizer has one), as uint16."""
        return np.array([self.bos] * (self.bos is not None) + self.encode(text) + [self.eot], dtype=np.uint16)


def load_llama2(path):
    """(encoding, vocab size, BOS id, EOS id) of the Llama-2 tokenizer at path: a sentencepiece *.model file, or a
    folder or hub id for transformers' AutoTokenizer (Llama-2's tokenizer.json). encode never adds BOS or EOS, and
    decode drops them."""
    try:
        if path.endswith(".model"):
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
            enc = SimpleNamespace(encode=sp.encode, decode=sp.decode)
            vocab_size, bos, eos = sp.get_piece_size(), sp.bos_id(), sp.eos_id()
        else:
            # our worker processes are the parallelism: no tokenizer threads, which would make forking unsafe
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path)
            enc = SimpleNamespace(encode=lambda text: tok.encode(text, add_special_tokens=False),
                                  decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
            vocab_size, bos, eos = len(tok), tok.bos_token_id, tok.eos_token_id
    except ImportError as err:
        raise SystemExit(f"error: the llama2 tokenizer needs {err.name}: pip install transformers (for a folder or hub "
                         "id), or pip install sentencepiece (for a tokenizer.model file)") from None
    except Exception as err:  # a missing file, no network, no access to the gated hub repository
        raise SystemExit(f"error: cannot load the Llama-2 tokenizer from {path} ({type(err).__name__}: {err}). "
                         "Point --tokenizer_path at a local copy: a folder with tokenizer.json or tokenizer.model, "
                         "or the tokenizer.model file itself") from None
    if bos is None or bos < 0 or eos is None or eos < 0:
        raise SystemExit(f"error: the tokenizer at {path} has no BOS or EOS token: not Llama-2's")
    return enc, vocab_size, bos, eos


# -----------------------------------------------------------------------------
# sources: (name, size in bytes, a function returning an iterator over the documents' texts)


def unreachable(what, err):
    """The error for a source that cannot be listed or read: from the hub, most often because there is no network."""
    remote = any(part.startswith(("hf://", "http://", "https://")) for part in str(what).split(","))
    hint = ("; if the hub (or the network) is unreachable from here, copy the JSONL files onto this machine and use "
            "--source='/path/*.jsonl' (or --source=@list.txt, one file per line), or tokenise your own files with "
            "--files='corpus/*.jsonl' --out_dir=data/mine") if remote else ""
    first_line = (str(err).splitlines() or [""])[0]
    return SystemExit(f"error: cannot read {what} ({type(err).__name__}: {first_line}){hint}")


def hub_sources(data_files):
    """Files named by patterns or URLs (hf://, https://, local), each streamed by datasets' generic json builder."""
    try:
        import datasets  # only here: the GPU machines do not have it
        import fsspec
    except ImportError as err:
        raise SystemExit(f"error: --dataset=redpajama reads its files with Hugging Face's datasets, which is not "
                         f"installed here ({err}): pip install datasets, or tokenise local files with "
                         "--files='corpus/*.jsonl' --out_dir=data/mine") from None
    try:
        fs, _, paths = fsspec.get_fs_token_paths(data_files)  # expands globs, on the hub through huggingface_hub
    except Exception as err:  # whatever the hub client raises (no network, offline mode, a wrong name)
        raise unreachable(",".join(data_files), err) from None
    if not paths:
        raise SystemExit(f"error: no files match {data_files}")

    def texts(url):
        try:
            for row in datasets.load_dataset("json", data_files=url, split="train", streaming=True):
                if not isinstance(row.get("text"), str):
                    raise SystemExit(f"error: {url}: a row without a \"text\" string (its keys: {sorted(row)})")
                yield row["text"]
        except Exception as err:  # the connection dropped, or a file that is not JSONL
            raise unreachable(url, err) from None
    urls = sorted(fs.unstrip_protocol(p) for p in paths)
    return [(url, fs.size(url), lambda url=url: texts(url)) for url in urls]


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_local(path):
    if path.endswith(".txt"):
        yield read_text(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as err:
                    raise SystemExit(f"error: {path}:{lineno}: expected a JSON object with a \"text\" field "
                                     f"({type(err).__name__}: {err})") from None


def local_sources(pattern):
    paths = sorted({p for pat in pattern.split(",") for p in glob.glob(os.path.expanduser(pat), recursive=True)})
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths or any(not p.endswith((".jsonl", ".txt")) for p in paths):
        raise SystemExit(f"error: --files={pattern} must match .jsonl or .txt files (matched: {paths[:5]})")
    return [(p, os.path.getsize(p), lambda p=p: read_local(p)) for p in paths]


def pystdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in PYSTDLIB_SKIP]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return root, sorted(found, key=lambda p: os.path.relpath(p, root))  # sorted: the same corpus on every run


def prepare_pystdlib(out_dir, num_proc=1):
    """The offline demo corpus: each stdlib .py file is a document, byte-level, 5% of files held out."""
    root, paths = pystdlib_files()
    source = f"pystdlib: Python {sys.version.split()[0]} standard library .py files at {root}"
    sources = [(p, os.path.getsize(p), lambda p=p: iter([read_text(p)])) for p in paths]
    return prepare(sources, out_dir, source, "bytes", max_tokens=None, val_fraction=0.05, num_proc=num_proc)


# -----------------------------------------------------------------------------
# tokenise in worker processes, write through temporary files


_worker_tokenizer = None


def _init_worker(name, path):
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    _worker_tokenizer = Tokenizer(name, path)


def _encode_batch(texts):
    return [_worker_tokenizer.encode_document(t) for t in texts]


def encoded_documents(texts, tokenizer, pool, num_proc):
    """(token array, length of the text) of each document in order; the pool encodes a few batches ahead, no more
    (streams are long)."""
    if pool is None:
        for text in texts:
            yield tokenizer.encode_document(text), len(text)
        return
    pending, texts = deque(), iter(texts)
    while batch := list(islice(texts, 64)):
        pending.append((pool.apply_async(_encode_batch, (batch,)), [len(t) for t in batch]))
        if len(pending) >= 4 * num_proc:
            result, lengths = pending.popleft()
            yield from zip(result.get(), lengths)
    while pending:
        result, lengths = pending.popleft()
        yield from zip(result.get(), lengths)


def existing_recipe(out_dir, recipe):
    """None if out_dir has no dataset; the meta if it holds this very dataset; exits if it holds another."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        stray = [f for f in ("train.bin", "val.bin") if os.path.exists(os.path.join(out_dir, f))]
        if stray:
            raise SystemExit(f"error: {out_dir} holds {', '.join(stray)} but no meta.json (another tool's data, or "
                             "an interrupted run): delete them or choose another --out_dir")
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    differ = [k for k in RECIPE_KEYS if meta.get(k) != recipe[k]]
    if differ:
        lines = "\n".join(f"  {k}: has {meta.get(k)!r}, asked for {recipe[k]!r}" for k in differ)
        raise SystemExit(f"error: {out_dir} already holds a different dataset:\n{lines}\n"
                         "delete the folder or choose another --out_dir")
    for split in ("train", "val"):
        path = os.path.join(out_dir, f"{split}.bin")
        if not os.path.exists(path) or os.path.getsize(path) != 2 * meta[f"{split}_tokens"]:
            raise SystemExit(f"error: {path} does not match {meta_path} (missing or wrong size): delete the folder")
    return meta


def write_tokens(sources, tokenizer, paths, max_tokens, val_fraction, num_proc):
    """Stream the documents of every source through the tokenizer into paths["train"] and paths["val"]."""
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    total_bytes = max(1, sum(size for _, size, _ in sources))
    index = 0  # of the document over all sources: decides its split
    with ExitStack() as stack:
        pool = None
        if num_proc > 1:  # spawned, not forked: a fork copies locks that other threads (torch's, tqdm's) hold
            spawn = multiprocessing.get_context("spawn")
            pool = stack.enter_context(spawn.Pool(num_proc, initializer=_init_worker,
                                                  initargs=(tokenizer.name, tokenizer.path)))
        files = {split: stack.enter_context(open(paths[split], "wb")) for split in ("train", "val")}
        # progress in bytes of the sources (a token budget is often far more than the files hold)
        bar = stack.enter_context(progress(total=total_bytes, unit="B", unit_scale=True, desc="tokenising"))
        sources_done = 0  # bytes
        for _, size, texts in sources:
            quota = None if max_tokens is None else int(max_tokens * size / total_bytes)  # a share by size
            taken = 0
            for ids, length in encoded_documents(texts(), tokenizer, pool, num_proc):
                if quota is not None and taken >= quota:
                    break
                if quota is not None:
                    ids = ids[:quota - taken]
                split = "val" if int((index + 1) * val_fraction) > int(index * val_fraction) else "train"
                ids.tofile(files[split])
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_documents"] += 1
                taken += len(ids)
                index += 1
                bar.update(min(length, sources_done + size - bar.n))  # characters: about the bytes read
                bar.set_postfix_str(f"{counts['train_tokens'] + counts['val_tokens']:,} tokens", refresh=False)
            sources_done += size
            bar.update(sources_done - bar.n)  # the source's whole size, its JSON keys and a cut-off rest included
    if not (counts["train_documents"] and counts["val_documents"]):
        raise SystemExit(f"error: {index} documents are too few to hold out val_fraction={val_fraction} of them: "
                         "give more documents (one per JSONL line) or a larger --val_fraction")
    return counts


def prepare(sources, out_dir, source, tokenizer_name, max_tokens, val_fraction, num_proc, tokenizer_path=""):
    """Tokenise the documents of sources into out_dir and return its meta; nothing to do if it is there already."""
    recipe = {"source": source, "tokenizer": tokenizer_name, "max_tokens": max_tokens, "val_fraction": val_fraction}
    meta = existing_recipe(out_dir, recipe)
    if meta is not None:
        print(f"{out_dir} already holds this dataset ({meta['train_tokens']:,} train, {meta['val_tokens']:,} val "
              "tokens): nothing to do")
        return meta
    if not 0 < val_fraction < 1:
        raise SystemExit(f"error: val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = Tokenizer(tokenizer_name, tokenizer_path)
    os.makedirs(out_dir, exist_ok=True)
    final = {name: os.path.join(out_dir, f"{name}.bin") for name in ("train", "val")}
    final["meta"] = os.path.join(out_dir, "meta.json")
    tmp = {name: f"{path}.tmp.{os.getpid()}" for name, path in final.items()}
    try:
        counts = write_tokens(sources, tokenizer, tmp, max_tokens, val_fraction, num_proc)
        meta = {**recipe, "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot, "bos_token": tokenizer.bos,
                "dtype": "uint16",
                **counts, "files": len(sources)}
        with open(tmp["meta"], "w") as f:
            json.dump(meta, f, indent=2)
        for name in ("train", "val", "meta"):  # meta.json last: its presence means "complete"
            os.replace(tmp[name], final[name])
    except BaseException:  # errors, Ctrl-C: leave no partial files
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    print(f"wrote {out_dir}: {counts['train_tokens']:,} train and {counts['val_tokens']:,} val tokens "
          f"({counts['train_documents']:,} + {counts['val_documents']:,} documents), tokenizer {tokenizer_name}")
    return meta


def token_count(text):
    return int(float(text))  # 1e9 too


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["redpajama", "pystdlib"], help="a named dataset (or use --files)")
    parser.add_argument("--files", help="local .jsonl/.txt files: a glob, or several comma-separated")
    parser.add_argument("--source", default=REDPAJAMA_SAMPLE, help="redpajama: data_files for datasets' json builder")
    parser.add_argument("--out_dir", help="default: data/<dataset>")
    parser.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes", "llama2"])
    parser.add_argument("--tokenizer_path", default="", help=f"llama2: a folder, hub id or tokenizer.model file "
                        f"(default {LLAMA2_HUB})")
    parser.add_argument("--max_tokens", type=token_count, default=1_000_000_000,
                        help="token budget for train + val, 0 for no limit (default 1e9)")
    parser.add_argument("--val_fraction", type=float, default=0.005, help="fraction of documents held out")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokeniser processes")
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.files is None):
        parser.error("give exactly one of --dataset and --files")
    if args.files and not args.out_dir:
        parser.error("--files needs --out_dir")
    for ok, problem in ((args.num_proc >= 1, f"--num_proc={args.num_proc}: must be at least 1"),
                        (args.max_tokens >= 0, f"--max_tokens={args.max_tokens}: must be at least 0 (0: no limit)"),
                        (0 < args.val_fraction < 1, f"--val_fraction={args.val_fraction}: must be in (0, 1)")):
        if not ok:
            parser.error(problem)
    if args.out_dir and os.path.isfile(args.out_dir):
        parser.error(f"--out_dir={args.out_dir} is a file, not a folder")
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.dataset)
    if args.dataset == "pystdlib":
        return prepare_pystdlib(out_dir, args.num_proc)
    max_tokens = args.max_tokens or None
    if args.dataset == "redpajama":
        if args.source.startswith("@"):
            if not os.path.isfile(args.source[1:]):
                parser.error(f"--source={args.source}: no file {args.source[1:]} (a list of files, one per line)")
            with open(args.source[1:]) as f:
                data_files = [line.strip() for line in f if line.strip()]
        else:
            data_files = args.source.split(",")
        sources, source = hub_sources(data_files), f"redpajama: {args.source}"
    else:
        sources, source = local_sources(args.files), f"files: {args.files}"
    return prepare(sources, out_dir, source, args.tokenizer, max_tokens, args.val_fraction, args.num_proc,
                   args.tokenizer_path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # prepare() has removed its partial files
        print("\ninterrupted: no partial files were left", file=sys.stderr)
        raise SystemExit(130)

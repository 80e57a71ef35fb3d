"""A training process's memory with stored caption embeddings: 1 k against 100 k captions, side by side.

    python benchmarks/bench_embed_memory.py [--captions 1000 100000] [--lookups 20000] [--batch 8] [--real]

Writes one embedding store per caption count (show1.data.text_embeddings, keyed by the tiny encoder's content hash,
its 384-d outputs in bf16, 8-30 real tokens per caption: a WebVid caption's ~19 on average). The token values are
random unless `--real`, which embeds every caption with the tiny encoder (~30 captions/s on 2 CPU cores: slow for
100 k); what is measured reads bytes and never looks at their values. Then, each in a fresh process, so that its
peak resident memory (VmHWM) is its own:

- bare: a process that imported torch and show1's training captions (the floor);
- stored: what the trainer does with a store: open it (`from_store`) and look up `--lookups` batches of `--batch`
  captions drawn at random over the whole store (a tenth dropped for classifier-free guidance), as the training loop
  does (`CaptionEmbeddings.lookup`: real tokens, zeros to 77);
- table: the same captions held in host memory, as embedding at train start keeps them (each caption's real tokens
  read from the store into a dict), for contrast.

Goal (issue 34): resident memory of the stored lookups within 10% between 1 k and 100 k captions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from show1.data.text_embeddings import StoreInfo, StoreWriter, encoder_key
from show1.models.text import MAX_LENGTH
from show1.models.text_layout import tiny_text_encoder_dir

WORDS = ["waves", "a city street", "aerial view of", "forest", "people walking", "sunset over", "close-up of",
         "a dog running", "snow falling", "timelapse of clouds"]


def caption(i: int) -> str:
    """The i-th caption of the benchmark (a WebVid-like caption, each distinct)."""
    return f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]} stock footage number {i}"


def write_store(root: Path, count: int, real: bool) -> Path:
    """A store of `count` captions (and the empty prompt) under `root`, as show1 embed writes it."""
    encoder = tiny_text_encoder_dir()
    key = encoder_key(encoder)
    dim = json.loads((encoder / "config.json").read_text())["hidden_size"]
    captions = ["", *(caption(i) for i in range(count))]
    with StoreWriter.open(root / key) as writer:
        writer.start(StoreInfo(key, str(encoder), dim, MAX_LENGTH, "bf16", 16))
        if real:
            from show1.training.embed import text_encoder

            with text_encoder(encoder) as model:
                for text, tokens in model.encode(captions):
                    writer.add(text, tokens)
        else:
            generator = torch.Generator().manual_seed(0)
            for i, text in enumerate(captions):
                writer.add(text, torch.randn(8 + i % 23, dim, generator=generator))
    return root / key


# The measured processes import nothing of this file: they are given `caption` as source.
PEAK = f"WORDS = {WORDS!r}\n" + inspect.getsource(caption) + """
def memory_mb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024
"""
BARE = PEAK + """
import torch
from show1.data.text_embeddings import EmbeddingStore
from show1.training.captions import from_store
print(json.dumps({"seconds": 0, "peak_mb": memory_mb()[0], "rss_mb": memory_mb()[1]}))
"""
STORED = PEAK + """
import random, sys, time
import torch
from show1.data.text_embeddings import EmbeddingStore
from show1.training.captions import from_store
count, lookups, batch = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
embeddings = from_store(EmbeddingStore(sys.argv[1]))
rng = random.Random(0)
start = time.perf_counter()
for _ in range(lookups):
    chosen = [caption(rng.randrange(count)) for _ in range(batch)]
    dropped = torch.tensor([rng.random() < 0.1 for _ in range(batch)])
    text = embeddings.lookup(chosen, dropped)
assert text.shape == (batch, 77, embeddings.dim)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": memory_mb()[0], "rss_mb": memory_mb()[1]}))
"""
TABLE = PEAK + """
import sys, time
import torch
from show1.data.text_embeddings import EmbeddingStore
from show1.training.captions import from_store
store = EmbeddingStore(sys.argv[1])
start = time.perf_counter()
table = {caption(i): store.tokens(caption(i)) for i in range(int(sys.argv[2]))}
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": memory_mb()[0], "rss_mb": memory_mb()[1]}))
"""


def measure(script: str, *args: object) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", "import json\n" + script, *map(str, args)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--lookups", type=int, default=20_000, help="batches looked up per process")
    parser.add_argument("--batch", type=int, default=8, help="captions per batch")
    parser.add_argument("--real", action="store_true", help="embed with the tiny encoder (slow) instead of random")
    parser.add_argument("--no-table", action="store_true", help="skip the in-memory table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = measure(BARE, "-", 0, 0, 0)
        print(f"bare process (torch + show1.training.captions): peak resident {bare['peak_mb']:.0f} MB")
        results = {}
        for count in args.captions:
            started = time.perf_counter()
            folder = write_store(Path(tmp) / str(count), count, args.real)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"{count:,} captions: store written in {time.perf_counter() - started:.1f} s, {size / 1e6:.0f} MB "
                  f"on disk ({len(list((folder / 'parts').iterdir()))} part files)")
            stored = measure(STORED, folder, count, args.lookups, args.batch)
            results[count] = stored
            per_caption = stored["seconds"] / (args.lookups * args.batch) * 1e6
            print(f"  stored: {args.lookups:,} batches of {args.batch} looked up in {stored['seconds']:.1f} s "
                  f"({per_caption:.0f} µs per caption); peak resident {stored['peak_mb']:.0f} MB "
                  f"({stored['peak_mb'] - bare['peak_mb']:+.0f} MB above bare), resident at the end "
                  f"{stored['rss_mb']:.0f} MB")
            if not args.no_table:
                table = measure(TABLE, folder, count, 0, 0)
                print(f"  table in host memory (embedding at train start keeps this): peak resident "
                      f"{table['peak_mb']:.0f} MB ({table['peak_mb'] - bare['peak_mb']:+.0f} MB above bare)")
        low, high = min(results), max(results)
        ratio = results[high]["peak_mb"] / results[low]["peak_mb"]
        print(f"stored lookups, peak resident at {high:,} vs {low:,} captions: {ratio:.3f}x "
              f"({(ratio - 1) * 100:+.1f}%; goal within 10%)")


if __name__ == "__main__":
    main()

"""Read throughput of the Loom data loader against numpy memmap readers of the same tokens and
boundaries, and a plain memory copy, all measured in this run.

    python bench/data_throughput.py [--size-mib 256] [--seq-len 2048] [--batch 8]
                                    [--big-batch 256] [--rows-per-shard N] [--repeats 7]
                                    [--workdir DIR]

Prepares a synthetic corpus through data_pipeline.prepare (byte tokenizer, rows of seq_len + 1
tokens, uint16), then writes the same train rows in Megatron's flat layout: a .bin of tokens
and, as CSR arrays (.npy), every row's document and sentence starts. Each reader then reads
batches of random rows (the corpus's shuffled global order); what each row of the table
measures:

Same outputs as the training loader -- {"sample_ids" int64, "tokens" int64 [batch, S],
"doc_start", "sent_start" bool [batch, S]} per step, checked equal before timing:
- loom loader:         Loader.next_batch() (global order, DP slicing, planned read-ahead)
- memmap loader:       the same global order and dict from the flat files, vectorised per
                       batch: fancy row indexing of the token memmap, int64 cast, CSR -> masks
Tokens only, int64 torch tensor [batch, S] per call, rows given:
- loom gather:         PackedDataset.gather(rows)
- memmap rows:         torch.from_numpy(memmap[rows].astype(int64))
- memmap frombuffer:   np.frombuffer per sample on the mapped file (Megatron's path)
- the gather and memmap rows again with big-batch rows per call (per-call cost amortised)
- memcpy:              np.copyto of the whole token stream already in RAM (the machine's limit)

Page cache is warm (one untimed pass each); repeats are interleaved across readers; the median
tokens per wall-clock second is printed, and tokens per CPU second (steadier on a busy
machine), with the load average before and after. With --workdir the corpus is kept and reused
by later runs with the same sizes. Nothing is asserted but the equality of the two loaders.

Results on a 2-core machine shared with other jobs (load average 2.4-3.6 during the runs),
256 MiB corpus, batch 8; CPU-time ratios, median of 7 (wall-clock ratios agreed within 0.05
when the load was steady). "before" is the reader this one replaced, timed by this bench:

| ratio, before -> after                  | S=2048, 1 shard | S=2049, 1 shard | S=2048, 8 shards |
|-----------------------------------------|-----------------|-----------------|------------------|
| loom loader / memmap loader (same dict) | 1.77x -> 2.06x  | 1.94x -> 2.16x  | 1.27x -> 1.41x   |
| loom gather / memmap rows (tokens only) | 0.54x -> 0.87x  | 0.65x -> 0.99x  | 0.29x -> 0.61x   |
| loom loader / memmap rows (tokens only) | 0.41x -> 0.50x  | 0.50x -> 0.56x  | 0.30x -> 0.35x   |
| loom gather / memmap frombuffer         | 1.08x -> 1.65x  | 1.23x -> 1.91x  | 0.58x -> 1.13x   |
| the gather pair, 256 rows per call      | 0.82x -> 0.86x  | 0.94x -> 1.03x  | 0.67x -> 0.80x   |

After, S=2048, 1 shard: loom loader 896 M tokens/s (18 us per step), memmap loader 436, loom
gather 1564, memmap rows 1807, memcpy 6983. S = seq_len + 1 (--seq-len 2047 or 2048; the
S=2049 runs used --rows-per-shard 66560 to keep one shard). Rows of 2048 uint16 tokens are
4096 bytes: each lies on one page of the flat file but straddles two in the Arrow body, whose
buffers are 64-byte aligned (the same copy from the flat file shifted by 64 bytes takes ~8%
longer); with S=2049 neither layout is aligned and the tokens-only paths are level. Rows of
several shards cost about 1 us more each (see rows.read_rows).

Default (--seq-len 2048: 2048-token training samples are rows of 2049, split over 2 shards),
idle 2-core machine, median of 7: loom loader 696 M tokens/s = 1.76x the memmap loader;
loom gather 1327 = 0.89x memmap rows and 1.65x memmap frombuffer (Megatron's path). A later
idle run: loader 736 = 1.83x, gather 1302 = 0.85x memmap rows and 1.58x frombuffer; run to
run, the gather pair moves by about 0.05 on this machine.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

# Run as a script from anywhere: put the repository root ahead of bench/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.dataset import PackedDataset, sample_order  # noqa: E402
from data_pipeline.loader import Loader, build_loader  # noqa: E402
from data_pipeline.prepare import prepare_corpus  # noqa: E402

SEED = 1234
Reader = Callable[[], int]
Batch = dict[str, torch.Tensor]
LOADER = "loom loader"
MM_LOADER = "memmap loader"
GATHER = "loom gather (tokens)"
MEMMAP = "memmap rows (tokens)"
FROMBUFFER = "memmap frombuffer (Megatron)"
FLAT_FILES = ("tokens.bin", "doc_ptr.npy", "doc_pos.npy", "sent_ptr.npy", "sent_pos.npy")
# Printable ASCII with spaces and sentence ends, so every id is a byte token.
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ..,ETAOIN", dtype=np.uint8)


def synthetic_documents(total_bytes: int, *, seed: int) -> Iterator[str]:
    """Random ASCII documents of 2-20 KB adding up to about `total_bytes` characters."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < total_bytes:
        n = int(rng.integers(2_000, 20_000))
        yield _ALPHABET[rng.integers(0, len(_ALPHABET), size=n)].tobytes().decode("ascii")
        made += n


def prepare(workdir: Path, *, size_mib: int, seq_len: int, rows_per_shard: int | None) -> float:
    """Write the corpus and its flat copy into `workdir` unless it holds them for these sizes;
    returns the seconds spent."""
    params = {"size_mib": size_mib, "seq_len": seq_len, "rows_per_shard": rows_per_shard}
    stamp = workdir / "params.json"
    have = all((workdir / name).is_file() for name in FLAT_FILES)
    if have and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return 0.0
    start = time.perf_counter()
    prepare_corpus(
        synthetic_documents(size_mib << 19, seed=SEED),  # byte tokens are 2 bytes (uint16)
        workdir / "corpus",
        tokenizer_spec="byte",
        seq_len=seq_len,
        val_fraction=0.001,
        max_rows_per_shard=rows_per_shard,
        overwrite=True,
    )
    write_flat(workdir / "corpus", workdir)
    stamp.write_text(json.dumps(params))
    return time.perf_counter() - start


def write_flat(corpus: Path, out: Path) -> None:
    """The train rows as tokens.bin plus CSR boundaries: row r's document starts are
    doc_pos[doc_ptr[r]:doc_ptr[r + 1]] (positions in the row), likewise for sentences."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    lists: dict[str, tuple[list, list]] = {"doc": ([], []), "sent": ([], [])}
    with open(out / "tokens.bin", "wb") as tokens:
        for shard in manifest["splits"]["train"]["shards"]:
            reader = pa.ipc.open_file(pa.memory_map(str(corpus / shard["file"])))
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                column = batch.column("tokens")
                tokens.write(column.flatten().to_numpy(zero_copy_only=True).tobytes())
                for key, name in (("doc", "doc_offsets"), ("sent", "sent_offsets")):
                    values = batch.column(name)
                    lists[key][0].append(np.diff(values.offsets.to_numpy()))
                    lists[key][1].append(values.flatten().to_numpy())
    for key, (counts, positions) in lists.items():
        ptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        np.save(out / f"{key}_ptr.npy", ptr)
        np.save(out / f"{key}_pos.npy", np.concatenate(positions).astype(np.int32))


class MemmapLoader:
    """The training loader's output, single rank, from the flat files: sample ids, the global
    shuffled order (Loom's sample_order, so the two loaders read the same rows), int64 tokens
    and document/sentence start masks. Vectorised per batch; what a memmap reader would do."""

    def __init__(self, workdir: Path, *, sample_len: int, batch: int, seed: int) -> None:
        self.S, self.batch, self.seed = sample_len, batch, seed
        tokens = np.memmap(workdir / "tokens.bin", dtype=np.uint16, mode="r")
        self.rows = np.asarray(tokens).reshape(-1, sample_len)
        # Plain ndarrays over the maps: indexing an np.memmap goes through its Python subclass.
        self.csr = [
            tuple(
                np.asarray(np.load(workdir / f"{k}_{a}.npy", mmap_mode="r")) for a in ("ptr", "pos")
            )
            for k in ("doc", "sent")
        ]
        self.consumed = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = sample_order(len(self.rows), seed=self.seed, epoch=epoch)
        return self._orders[epoch]

    def _keys(self, ptr: np.ndarray, pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """i * S + position of every boundary of rows[i]."""
        lo = ptr[rows]
        counts = ptr[rows + 1] - lo
        ends = np.cumsum(counts)
        at = np.repeat(lo - (ends - counts), counts) + np.arange(ends[-1])
        return np.repeat(self.S * np.arange(len(rows)), counts) + pos[at]

    def next_batch(self) -> Batch:
        n, B = len(self.rows), self.batch
        epoch, at = divmod(self.consumed, n)
        rows = self._order(epoch)[at : at + B]
        if len(rows) < B:  # the batch straddles two epochs
            rows = np.concatenate([rows, self._order(epoch + 1)[: B - len(rows)]])
        ids = np.arange(self.consumed, self.consumed + B, dtype=np.int64)
        self.consumed += B
        starts = np.zeros((2, B * self.S), dtype=bool)
        doc, sent = (self._keys(ptr, pos, rows) for ptr, pos in self.csr)
        starts[0, doc] = starts[1, doc] = starts[1, sent] = True
        starts = starts.reshape(2, B, self.S)
        return {
            "sample_ids": torch.from_numpy(ids),
            "tokens": torch.from_numpy(self.rows[rows].astype(np.int64)),
            "doc_start": torch.from_numpy(starts[0]),
            "sent_start": torch.from_numpy(starts[1]),
        }


def loom_loader(corpus: Path, *, batch: int) -> Loader:
    return build_loader(
        [(str(corpus), 1.0)],
        global_batch_size=batch,
        micro_batch_size=batch,
        dp_rank=0,
        dp_size=1,
        seed=SEED,
    )


def check_same_outputs(workdir: Path, *, sample_len: int, batch: int, steps: int = 50) -> None:
    """The two loaders hand out equal batches (fresh loaders, untimed)."""
    ours = loom_loader(workdir / "corpus", batch=batch)
    theirs = MemmapLoader(workdir, sample_len=sample_len, batch=batch, seed=SEED)
    for step in range(steps):
        a, b = ours.next_batch()[0], theirs.next_batch()
        if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
            raise SystemExit(f"loom and memmap loaders differ at step {step}")


def make_readers(workdir: Path, *, batch: int, big: int) -> dict[str, Reader]:
    """name -> one pass over random batches; each returns the tokens it read."""
    ds = PackedDataset(workdir / "corpus")
    S, n = ds.sample_len, len(ds)
    permutation = sample_order(n, seed=SEED, epoch=0)
    order = permutation[: n // batch * batch].reshape(-1, batch)
    big_order = permutation[: n // big * big].reshape(-1, big)
    loader = loom_loader(workdir / "corpus", batch=batch)
    mm_loader = MemmapLoader(workdir, sample_len=S, batch=batch, seed=SEED)
    flat = workdir / "tokens.bin"
    dtype = ds.token_dtype
    rows_mm = np.asarray(np.memmap(flat, dtype=dtype, mode="r")).reshape(-1, S)
    with open(flat, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the file
    in_ram = np.fromfile(flat, dtype=dtype)
    copy_dst = np.empty_like(in_ram)

    def steps(next_batch: Callable[[], object]) -> int:
        for _ in range(len(order)):
            next_batch()
        return order.size * S

    def gather(indices) -> int:
        for idx in indices:
            ds.gather(idx)
        return indices.size * S

    def memmap_rows(indices) -> int:
        for idx in indices:
            torch.from_numpy(rows_mm[idx].astype(np.int64))
        return indices.size * S

    def memmap_frombuffer() -> int:
        for idx in order:
            out = np.empty((batch, S), dtype=np.int64)
            for j, r in enumerate(idx.tolist()):
                out[j] = np.frombuffer(raw, dtype=dtype, count=S, offset=r * S * dtype.itemsize)
            torch.from_numpy(out)
        return order.size * S

    def memcpy() -> int:
        np.copyto(copy_dst, in_ram)
        return in_ram.size

    return {
        LOADER: lambda: steps(loader.next_batch),
        MM_LOADER: lambda: steps(mm_loader.next_batch),
        GATHER: lambda: gather(order),
        MEMMAP: lambda: memmap_rows(order),
        FROMBUFFER: memmap_frombuffer,
        f"loom gather, {big} rows per call": lambda: gather(big_order),
        f"memmap rows, {big} rows per call": lambda: memmap_rows(big_order),
        "memcpy of the token stream": memcpy,
    }


def measure(readers: dict[str, Reader], *, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(tokens per wall second, tokens per CPU second) of each reader per repeat, repeats
    interleaved across readers. CPU time is printed too: it is steadier on a shared machine."""
    for read in readers.values():
        read()  # warm the page cache and Loom's per-record-batch checks
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = read()
            rates[name].append(
                (tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu))
            )
    return rates


def report(rates: dict[str, list[tuple[float, float]]], *, big: int) -> None:
    wall = {name: statistics.median(r[0] for r in runs) for name, runs in rates.items()}
    cpu = {name: statistics.median(r[1] for r in runs) for name, runs in rates.items()}
    print(f"{'reader (M tokens/s, median)':44s} {'wall':>8s} {'min':>7s} {'max':>7s} {'cpu':>8s}")
    for name, runs in rates.items():
        lo, hi = (f(r[0] for r in runs) / 1e6 for f in (min, max))
        print(f"{name:44s} {wall[name] / 1e6:8.0f} {lo:7.0f} {hi:7.0f} {cpu[name] / 1e6:8.0f}")
    pairs = [
        (LOADER, MM_LOADER, "same outputs"),
        (GATHER, MEMMAP, "tokens only"),
        (LOADER, MEMMAP, "loader's extra outputs included"),
        (GATHER, FROMBUFFER, "tokens only"),
        (f"loom gather, {big} rows per call", f"memmap rows, {big} rows per call", "tokens"),
    ]
    for a, b, what in pairs:
        print(
            f"ratio {a} / {b} ({what}): {wall[a] / wall[b]:.2f}x wall, {cpu[a] / cpu[b]:.2f}x cpu"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="corpus size (uint16 tokens)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=2048,
        help="training tokens per sample; rows hold seq_len + 1",
    )
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--big-batch", type=int, default=256, help="rows per call, 2nd pair")
    parser.add_argument("--rows-per-shard", type=int, default=None, help="default: ~256 MiB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given")
    args = parser.parse_args()
    if min(args.size_mib, args.batch, args.big_batch, args.repeats) < 1:
        parser.error("--size-mib, --batch, --big-batch and --repeats must be positive")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loom-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        sizes = {"size_mib": args.size_mib, "seq_len": args.seq_len}
        prep_s = prepare(workdir, **sizes, rows_per_shard=args.rows_per_shard)
        start = time.perf_counter()
        ds = PackedDataset(workdir / "corpus")
        open_ms = 1e3 * (time.perf_counter() - start)
        shards = len(ds.manifest["splits"]["train"]["shards"])
        print(
            f"corpus: {len(ds)} rows x {ds.sample_len} tokens ({ds.manifest['dtype']}) in "
            f"{shards} shard(s), {(workdir / 'tokens.bin').stat().st_size / 2**20:.0f} MiB; "
            f"prepared in {prep_s:.1f} s, opened in {open_ms:.1f} ms; batch {args.batch}, "
            f"{args.repeats} repeats; {os.cpu_count()} CPUs, load average {load_before:.1f}"
        )
        check_same_outputs(workdir, sample_len=ds.sample_len, batch=args.batch)
        readers = make_readers(workdir, batch=args.batch, big=args.big_batch)
        rates = measure(readers, repeats=args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rates, big=args.big_batch)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

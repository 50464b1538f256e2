"""One epoch of the training stream alone, to see which processes hold memory: a cache folder
(`<run>/cache/train-<key>`, e.g. from benchmarks/train_memory.py) -> medclf.data.cache.dataset (seeded
block order, 256 MB read-ahead) -> streaming_split(2) -> two consumer actors iterating torch batches
with the local shuffle, as the train workers do (no model). Prints the peak RSS summed over the
Ray processes and, per process title, the count, peak RSS and its shared part (object store pages,
libraries).

`--reader v2` reads with Ray 2.60's default Parquet reader instead of the one medclf chooses
(cache.READER_NOTE), to compare; RAY_DATA_PARQUET_FOOTER_NUM_ACTORS sets V2's footer actor pool.

    python benchmarks/stream_memory.py runs/bench_train_memory/mem-stream-20000-*/cache/train-*
    python benchmarks/stream_memory.py --reader v2 runs/bench_train_memory/mem-stream-20000-*/cache/train-*
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from medclf.ops.runs import local_ray_options  # noqa: E402
from treerss import TreeRSS  # noqa: E402


class PeaksByProcess(TreeRSS):
    """Per process (pid): peak RSS, its title then, peak shared; `peak`: of the summed RSS."""

    def __init__(self, interval: float = 0.3):
        super().__init__(interval)
        self.by_pid: dict = {}

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    info, title = p.memory_info(), (p.cmdline() or [p.name()])[0].rsplit("/", 1)[-1][:40]
                except Exception:
                    continue  # a worker that just exited
                total += info.rss
                old_title, old_rss, old_shared = self.by_pid.get(p.pid, ("", 0, 0))
                self.by_pid[p.pid] = (title if info.rss >= old_rss else old_title, max(old_rss, info.rss),
                                      max(old_shared, info.shared))
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def table(self) -> dict:
        rows: dict = {}
        for title, rss, shared in self.by_pid.values():
            row = rows.setdefault(title, [0, 0, 0])
            row[0], row[1], row[2] = row[0] + 1, row[1] + rss, row[2] + shared
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="a cache folder: <run>/cache/train-<key>")
    ap.add_argument("--reader", choices=["medclf", "v2"], default="medclf")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--object-store-mb", type=int, default=0, help="Ray's object store size (0: Ray's default)")
    ap.add_argument("--pause", type=float, default=0.02, help="seconds per batch in each consumer")
    args = ap.parse_args()

    import ray
    import ray.data

    from medclf.data import cache as cache_mod

    ray.init(**local_ray_options(args.cpus), object_store_memory=args.object_store_mb * 2**20 or None,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=0.5)
    class Consumer:
        def run(self, split, pause: float) -> int:
            rows = 0
            for n in split.iter_torch_batches(batch_size=32, local_shuffle_buffer_size=512, local_shuffle_seed=0,
                                              collate_fn=lambda b: len(b["row"])):
                rows += n
                time.sleep(pause)
            return rows

    with PeaksByProcess() as peaks:
        split_cache = cache_mod.SplitCache("train", args.cache, "", 0, False)
        if args.reader == "v2":  # what cache.dataset reads with, but through Ray's default reader
            from ray.data import RandomSeedConfig

            ds = cache_mod.bounded(ray.data.read_parquet(args.cache, columns=["row", "label", "pixels"],
                                                         file_extensions=["parquet"])
                                   .randomize_block_order(seed=RandomSeedConfig(seed=0, reseed_after_execution=True)),
                                   256)
        else:
            ds = cache_mod.dataset(split_cache, seed=0, buffer_mb=256)
        splits = ds.streaming_split(2, equal=True)
        consumers = [Consumer.remote() for _ in splits]
        t0 = time.time()
        rows = ray.get([c.run.remote(s, args.pause) for c, s in zip(consumers, splits)])
        seconds = time.time() - t0
        time.sleep(1)
    ray.shutdown()
    print(f"reader {args.reader}: {sum(rows)} rows in {seconds:.0f} s; peak RSS summed over the processes "
          f"{peaks.peak / 2**20:.0f} MB")
    print(f"{'process title':40s} {'count':>5s} {'peak RSS MB':>11s} {'shared MB':>9s}")
    for title, (n, rss, shared) in sorted(peaks.table().items(), key=lambda kv: -kv[1][1]):
        if rss > 150 * 2**20:
            print(f"{title:40s} {n:5d} {rss / 2**20:11.0f} {shared / 2**20:9.0f}")


if __name__ == "__main__":
    main()

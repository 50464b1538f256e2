"""TreeRSS: the memory of this process and its descendants (a local Ray cluster), sampled in a
thread; shared by the memory benchmarks. Imports nothing heavy, so the driver it measures is the
benchmark's own."""

from __future__ import annotations

import threading
import time


class TreeRSS:
    """Peak of the summed RSS of this process and all its descendants (the local Ray cluster); with
    `pss`, also the peak of their summed PSS. RSS counts a shared page (Ray's object store is shared
    memory mapped by every worker) once per process that touched it; PSS splits it among them, so the
    PSS sum is the memory the processes take together. Setting `phase` while it runs also keeps the
    peaks of each phase (`by_phase`: phase -> (peak RSS, peak PSS)) and which processes held the
    RSS at that peak (`who_by_phase`: phase -> {process title: MB}, summed over same-titled ones) and
    how much of that was shared pages (`shared_by_phase`, same keys: the object store, mapped files)."""

    def __init__(self, interval: float = 0.2, pss: bool = False):
        import psutil

        self.root, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()
        self.pss, self.peak_pss = pss, 0
        self.phase, self.by_phase, self.who_by_phase, self.shared_by_phase = None, {}, {}, {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int, dict, dict]:
        rss = pss = 0
        who: dict = {}
        shared: dict = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                if self.pss:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                else:
                    info = p.memory_info()
                    rss += info.rss
                title = (p.cmdline() or [p.name()])[0].rsplit("/", 1)[-1][:40]  # ray::RayTrainWorker, raylet, ...
                who[title] = who.get(title, 0) + info.rss
                shared[title] = shared.get(title, 0) + getattr(info, "shared", 0)
            except Exception:
                pass  # a worker that just exited
        return rss, pss, who, shared

    def _run(self):
        while not self._stop.is_set():
            rss, pss, who, shared = self._sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            if self.phase:
                old_rss, old_pss = self.by_phase.get(self.phase, (0, 0))
                self.by_phase[self.phase] = (max(old_rss, rss), max(old_pss, pss))
                if rss > old_rss:
                    self.who_by_phase[self.phase], self.shared_by_phase[self.phase] = who, shared
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

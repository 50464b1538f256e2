"""CPU cost of glibc's malloc settings for CNN training and inference (medclf.ops.runs.ALLOCATOR_ENV).

    python benchmarks/allocator.py [--threads 1]

Each variant runs in a fresh process (glibc reads its settings at start-up): EfficientNet-Lite0 at
224 px, batch 32, a freeze_first:9 training step and an inference batch, timed with getrusage (CPU
seconds, system share, minor page faults), so a busy machine changes the wall clock but not these.
Each runs in the main thread and in a second thread, where Ray Data's actors and Ray Train's workers
run user code (a thread's glibc arena cannot keep a block over 64 MiB: MALLOC_ARENA_MAX=1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.ops.runs import ALLOCATOR_ENV  # noqa: E402

VARIANTS = {
    "glibc default": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "ALLOCATOR_ENV without MALLOC_ARENA_MAX": {k: v for k, v in ALLOCATOR_ENV.items() if k != "MALLOC_ARENA_MAX"},
    "medclf ALLOCATOR_ENV": ALLOCATOR_ENV,
}

MEASURE = """
import resource, sys, torch
from medclf.model.networks import apply_transfer_mode, build_model, set_train_mode
torch.set_num_threads(int(sys.argv[1]))
m = build_model("efficientnet_lite0", 2, "none").to(memory_format=torch.channels_last)
frozen = apply_transfer_mode(m, "efficientnet_lite0", "freeze_first:9")
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (32,))

def train():
    set_train_mode(m, frozen)
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

def infer():
    m.eval()
    with torch.inference_mode():
        m(x)

def measure():
    for name, step, n in (("training step", train, 3), ("inference", infer, 4)):
        step()  # warm-up
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(n):
            step()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        print(f"{name}|{(user + sys_) / (32 * n):.4f}|{sys_ / (user + sys_):.2f}|{r1.ru_minflt - r0.ru_minflt}")

if sys.argv[2] == "thread":  # where Ray Data's actors and Ray Train's workers run user code
    import threading
    t = threading.Thread(target=measure)
    t.start()
    t.join()
else:
    measure()
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print("| work | runs in | allocator | CPU seconds per image | sys share | minor faults |\n|---|---|---|---|---|---|")
    for where in ("main", "thread"):  # the main thread, or a second one
        for label, extra in VARIANTS.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_"))}
            out = subprocess.run([sys.executable, "-c", MEASURE, str(args.threads), where], env={**env, **extra},
                                 cwd=ROOT, capture_output=True, text=True, check=True).stdout
            for line in out.strip().splitlines():
                work, cost, share, faults = line.split("|")
                print(f"| {work} | {where} | {label} | {cost} | {float(share):.0%} | {int(faults):,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray workers started by medclf keep freed memory (medclf.ops.runs.ALLOCATOR_ENV): a worker that allocates
and frees a 50 MB buffer ten times faults its pages in once, not ten times."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import os, resource, numpy as np, ray
from medclf.ops.runs import ALLOCATOR_ENV, init_ray
from medclf.config import Config
cfg = Config(); cfg.ray.num_cpus = 1
init_ray(cfg)

@ray.remote(num_cpus=0.5)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        buf = np.ones(50_000_000 // 8)
        del buf
    return {k: os.environ.get(k) for k in ALLOCATOR_ENV}, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

env, n = ray.get(faults.remote())
assert env == ALLOCATOR_ENV, env
print("FAULTS", n)
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_workers_keep_freed_memory():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RAY_ADDRESS"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = int(out.stdout.split("FAULTS")[-1])
    # one 50 MB buffer is ~12,200 pages: ten of them re-faulted would be ~122,000
    assert faults < 2 * 12_200, faults

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


def _faults(script: str) -> int:
    """Run `script` in a fresh process with no MALLOC_* of ours (glibc reads them at start): its FAULTS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RAY_ADDRESS"))}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split("FAULTS")[-1])


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("state_api", [True, False], ids=["training-ray", "scoring-ray"])
def test_ray_workers_keep_freed_memory(state_api):
    # a scoring job's local Ray has no runtime_env: its workers get the settings from the raylet's environment
    faults = _faults(SCRIPT.replace("init_ray(cfg)", f"init_ray(cfg, state_api={state_api})"))
    # one 50 MB buffer is ~12,200 pages: ten of them re-faulted would be ~122,000
    assert faults < 2 * 12_200, faults


THREAD_SCRIPT = """
import resource, torch, ray
from concurrent.futures import ThreadPoolExecutor
from medclf.ops.runs import init_ray
from medclf.config import Config
cfg = Config(); cfg.ray.num_cpus = 1
init_ray(cfg)

@ray.remote(num_cpus=0.5)
def faults():
    from medclf.model.networks import build_model
    torch.set_num_threads(1)
    model = build_model("efficientnet_lite0", 2).eval()
    x = torch.rand(32, 3, 224, 224)  # activations of ~100 MB: over a thread arena's 64 MiB heap

    def infer():
        with torch.inference_mode():
            model(x)  # warm-up: the process reaches its peak
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            model(x)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with ThreadPoolExecutor(1) as pool:  # as Ray Data's actors and Ray Train's workers run user code
        return pool.submit(infer).result()

print("FAULTS", ray.get(faults.remote()))
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_worker_thread_keeps_freed_memory_too():
    faults = _faults(THREAD_SCRIPT)
    # without MALLOC_ARENA_MAX=1, two such batches in a thread faulted 403,453 pages; with it, 0 on an idle
    # machine and 36,850 under the full test run's load (the kernel reclaims idle pages)
    assert faults < 150_000, faults

#!/usr/bin/env bash
# Issue 35's GPU check, in ONE call: the machine's limits (benchmarks/gpu_limits.py) and medclf's end-to-end
# scoring (benchmarks/gpu_score.py, Parquet written) in the same run, on 224 px and 2,048^2 JPEGs generated
# here from a few carried films. Falls back to CPU (GPU parts skipped) without CUDA.
# Each step is capped (nvJPEG tolerance 60 s; limits 150 s; medclf runs 110, 110, 90, 80, 110 s), most
# important first: a call's own timeout of 465 s cuts the last ones only if the first use their caps. On
# 2026-12-04 limits + the first two runs took 202 s in all; the steps added since should take ~170 s more.
#
#   benchmarks/gpu_check.sh FILMS_DIR OUT_DIR [N224] [N2048]
# Wheels: if `ray` does not import and ./whl exists, they are installed into /tmp/site first.
set -u
FILMS=$1; OUT=$2; N224=${3:-20000}; N2048=${4:-3000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/check.log"; }
if ! $PY -c "import ray, pydantic" 2>/dev/null && [ -d "$HERE/whl" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$HERE"/whl/*.whl \
    >> "$OUT/check.log" 2>&1
  chmod +x /tmp/site/ray/core/src/ray/gcs/gcs_server /tmp/site/ray/core/src/ray/raylet/raylet 2>/dev/null
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
log "python $($PY -c 'import sys, torch, ray; print(sys.version.split()[0], torch.__version__, ray.__version__, torch.cuda.is_available())' 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/check.log" 2>&1
DATA=/tmp/gpucheck-data
$PY - "$FILMS" "$DATA" "$N224" "$N2048" <<'PY' 2>&1 | tee -a "$OUT/check.log"
# 224 px: the carried films copied to N files (each decoded on its own); 2048: 48 distinct upscaled films
# (benchmarks/make_fullsize.py's recipe) copied to N files. Data made here, never carried.
import glob, os, shutil, sys
from multiprocessing import Pool
sys.path.insert(0, "benchmarks")
import numpy as np
from make_fullsize import jpeg_bytes, upscaled
films, root, n224, n2048 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = sorted(glob.glob(os.path.join(films, "*")))
for d in ("j224", "j2048"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
for i in range(n224):
    os.link(src[i % len(src)], os.path.join(root, "j224", f"{i:06d}.jpeg"))
def big(i):
    path = os.path.join(root, "j2048", f"{i:06d}.jpeg")
    with open(path, "wb") as f:
        f.write(jpeg_bytes(upscaled(src[i % len(src)], 2048, np.random.default_rng(i))))
    return path
with Pool(os.cpu_count()) as p:
    uniq = p.map(big, range(min(48, n2048)))
for i in range(len(uniq), n2048):
    os.link(uniq[i % len(uniq)], os.path.join(root, "j2048", f"{i:06d}.jpeg"))
print(f"data: {n224} x 224 px, {n2048} x 2048^2 JPEG q90 in {root}")
PY
log "data made"
# nvJPEG's model input against the CPU decode task's, on 16 of the 2,048^2 films (medclf.imaging.device_decode)
timeout 60 $PY "$HERE/benchmarks/device_tolerance.py" "$DATA/j2048" --n 16 2>&1 | grep -v Warning | tee -a "$OUT/check.log"
timeout 150 $PY "$HERE/benchmarks/gpu_limits.py" --jpeg224 "$DATA/j224" --jpeg2048 "$DATA/j2048" \
  --seconds "${LIMIT_SECONDS:-5}" --out "$OUT/limits.jsonl" 2>&1 | grep -v Warning | tee -a "$OUT/check.log"
log "limits done"
timeout 110 $PY "$HERE/benchmarks/gpu_score.py" "$DATA/j224" jpeg224 --out "$OUT/score.jsonl" \
  > "$OUT/score224.log" 2>&1; log "medclf 224 exit $?"; grep -E "^\{|images/s|stage costs" "$OUT/score224.log" | tee -a "$OUT/check.log"
timeout 110 $PY "$HERE/benchmarks/gpu_score.py" "$DATA/j2048" jpeg2048 --out "$OUT/score.jsonl" \
  > "$OUT/score2048.log" 2>&1; log "medclf 2048 exit $?"; grep -E "^\{|images/s|stage costs" "$OUT/score2048.log" | tee -a "$OUT/check.log"
# the same films decoded by the CPU tasks (draft mode) instead of by the GPU actor (nvJPEG; score.jpeg_decode=auto
# hands films >= 4x the model's input to a GPU actor: medclf.imaging.device_decode)
timeout 90 $PY "$HERE/benchmarks/gpu_score.py" "$DATA/j2048" jpeg2048-tasks --set score.jpeg_decode=tasks \
  --out "$OUT/score.jsonl" > "$OUT/score2048t.log" 2>&1; log "medclf 2048 tasks-decode exit $?"
grep -E "^\{|images/s|stage costs" "$OUT/score2048t.log" | tee -a "$OUT/check.log"
# 224 px JPEGs decoded by the GPU actor too (auto leaves them to the CPU tasks): ships ~15 KB of JPEG per image
# through the object store instead of 200 KB of float32 pixels, but runs the per-image checks in the actor
timeout 80 $PY "$HERE/benchmarks/gpu_score.py" "$DATA/j224" jpeg224-actor --set score.jpeg_decode=actor \
  --out "$OUT/score.jsonl" > "$OUT/score224a.log" 2>&1; log "medclf 224 actor-decode exit $?"
grep -E "^\{|images/s|stage costs" "$OUT/score224a.log" | tee -a "$OUT/check.log"
# score.compile (medclf.model.compiled): its compile time falls inside the run, as it would for a user
timeout 110 $PY "$HERE/benchmarks/gpu_score.py" "$DATA/j224" jpeg224-compiled --set score.compile=true \
  --out "$OUT/score.jsonl" > "$OUT/score224c.log" 2>&1; log "medclf 224 compiled exit $?"
grep -E "^\{|images/s|stage costs" "$OUT/score224c.log" | tee -a "$OUT/check.log"
log "end"

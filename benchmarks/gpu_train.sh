#!/usr/bin/env bash
# The pneumonia recipe on a CUDA GPU (issues 10 and 11): one Ray Train worker with the GPU, AMP (fp16
# autocast + GradScaler, on whenever the device is CUDA), the in-memory and the streaming data path
# sharing one preprocessed cache, then a summary (images/s per epoch, wall time, validation figures
# on both validation schemes) as JSON. Results: docs/benchmarks.md, "GPU".
#
#   benchmarks/gpu_train.sh DATA OUT_DIR [RUN=CONFIG[:KEY=VALUE,...] ...]
#
# Default runs: gpu-memory and gpu-stream of configs/pneumonia_xray.yaml.
set -u
DATA=$1; OUT_DIR=$2; shift 2
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=("gpu-memory=configs/pneumonia_xray.yaml:train.data_path=memory"
                                 "gpu-stream=configs/pneumonia_xray.yaml:train.data_path=stream")
CPUS=$(nproc)
mkdir -p "$OUT_DIR"
for spec in "${RUNS[@]}"; do
  name=${spec%%=*}; rest=${spec#*=}; config=${rest%%:*}; sets=()
  [ "$rest" != "$config" ] && IFS=, read -ra kv <<< "${rest#*:}" && for s in "${kv[@]}"; do sets+=(--set "$s"); done
  start=$(date +%s)
  ${PYTHON:-python3} -m medclf.cli train --config "$config" --data "$DATA" --use-gpu --workers 1 --run-root "$OUT_DIR" \
      --run-id "$name" --set train.cpus_per_worker=$((CPUS / 2)) --set ray.num_cpus="$CPUS" \
      --set tracking.enabled=false --set train.cache_root="$OUT_DIR/cache" "${sets[@]}" > "$OUT_DIR/$name.log" 2>&1
  echo "$name exit $? wall $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/walls.txt"
done
${PYTHON:-python3} - "$OUT_DIR" <<'PY'
import glob, json, os, sys
import pandas as pd
out = sys.argv[1]
walls = dict((l.split()[0], l.split()[4]) for l in open(os.path.join(out, "walls.txt")))
summary = {}
for name in walls:
    run = os.path.join(out, name)
    row = {"wall_s": float(walls[name])}
    if os.path.exists(os.path.join(run, "history.parquet")):
        h = pd.read_parquet(os.path.join(run, "history.parquet"))
        row["images_per_s"] = [round(v, 1) for v in h.images_per_s]
        row["epoch_seconds"] = [round(v, 1) for v in h.epoch_seconds]
        row["val_roc_auc"] = [round(v, 4) for v in h.val_roc_auc]
    for part in ("validation_report", "validation_report_patient"):
        f = os.path.join(run, part, "summary.json")
        if os.path.exists(f):
            s = json.load(open(f))
            row[part] = {"data": s["predictions"], "temperature": s["temperature"], **{k: round(v, 4)
                         for k, v in s["metrics"].items() if k.split("_ci_")[0] in
                         ("accuracy", "sensitivity", "specificity", "roc_auc", "ece", "threshold", "n", "f1")}}
    summary[name] = row
print(json.dumps(summary, indent=1))
json.dump(summary, open(os.path.join(out, "gpu_summary.json"), "w"), indent=1)
PY

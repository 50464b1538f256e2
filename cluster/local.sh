#!/usr/bin/env bash
# Local development cluster on this machine.
#   cluster/local.sh start [NUM_CPUS]      head node (dashboard + job server on 127.0.0.1:8265)
#   cluster/local.sh add-worker NUM_CPUS   a second node on the same machine, with its own CPUs
#   cluster/local.sh stop                  stop every Ray process started from here
#   cluster/local.sh status
# Then: ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
# Job entrypoints run `python` from the head's PATH: make that the project's virtual environment.
if [ -d .venv/bin ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
RAY=${RAY:-ray}
# A head enables token authentication by default; nodes joining it (and `ray job submit`) must
# use token mode too. They share the token in ~/.ray/auth_token on this machine.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
PORT=${RAY_GCS_PORT:-6379}
case "${1:-}" in
  start)
    "$RAY" start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      ${2:+--num-cpus "$2"} --disable-usage-stats
    ;;
  add-worker)
    "$RAY" start --address "127.0.0.1:$PORT" --num-cpus "${2:?NUM_CPUS}" --disable-usage-stats
    ;;
  stop)
    "$RAY" stop --force
    ;;
  status)
    "$RAY" status --address "127.0.0.1:$PORT"
    ;;
  *)
    sed -n '2,7p' "$0"; exit 2
    ;;
esac

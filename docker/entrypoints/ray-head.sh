#!/bin/sh
# Ray head node (docs/deployment.md). Advertises the private address only (RAY_NODE_IP, default: the address of
# this host's own name); the dashboard is off; no CPU or GPU here, so model actors land on the GPU workers.
# Ray clusters use token authentication: head, workers and the edge server share RAY_AUTH_TOKEN.
# Extra arguments go to `ray start` (e.g. --temp-dir=...).
set -eu
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  echo "error: set RAY_AUTH_TOKEN (e.g. openssl rand -hex 32) for the head, the workers and the edge server" >&2
  exit 2
fi
here="$(dirname "$0")"
node_ip="${RAY_NODE_IP:-$("$here/private-ip.sh")}"
exec ray start --head --block \
  --node-ip-address="$node_ip" \
  --port="${RAY_GCS_PORT:-6379}" \
  --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
  --include-dashboard=false \
  --num-cpus="${RAY_HEAD_NUM_CPUS:-0}" \
  --num-gpus=0 \
  --disable-usage-stats \
  "$@"

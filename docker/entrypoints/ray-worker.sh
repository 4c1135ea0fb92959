#!/bin/sh
# Ray GPU worker node (docs/deployment.md): joins the head at RAY_HEAD_ADDRESS (host:port of its GCS) and
# advertises the address of the interface that routes to the head (or RAY_NODE_IP). Ray detects the GPUs; the
# edge server's model actors ask for num_gpus=1 each. Extra arguments go to `ray start` (e.g. --num-gpus=2).
set -eu
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ -z "${RAY_HEAD_ADDRESS:-}" ]; then
  echo "error: set RAY_HEAD_ADDRESS=head-host:6379" >&2
  exit 2
fi
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  echo "error: set RAY_AUTH_TOKEN to the head's token" >&2
  exit 2
fi
here="$(dirname "$0")"
node_ip="${RAY_NODE_IP:-$("$here/private-ip.sh" "${RAY_HEAD_ADDRESS%:*}")}"
exec ray start --block \
  --address="$RAY_HEAD_ADDRESS" \
  --node-ip-address="$node_ip" \
  --disable-usage-stats \
  "$@"

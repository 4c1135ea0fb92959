#!/bin/sh
# A device client: finish an image for each of its prompts from the edge server, one PNG per prompt.
#   SAGE_PROMPTS        prompts file, one per line (default: the project's examples/prompts.txt)
#   SAGE_OUT_DIR        where NNNN.png go (default /out)
#   SAGE_CLIENT_INDEX   this client's index i, SAGE_CLIENTS the number of clients n: prompts i, i+n, i+2n, ...
# Arguments go to every `sage-device generate` (e.g. --server edge-server:50051 --tls-ca ... --token-file ...).
set -eu
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,6p' "$0"
  exec sage-device generate --help
fi
prompts="${SAGE_PROMPTS:-$(dirname "$0")/../../examples/prompts.txt}"
out="${SAGE_OUT_DIR:-/out}"
index="${SAGE_CLIENT_INDEX:-0}"
clients="${SAGE_CLIENTS:-1}"
mkdir -p "$out"
i=0
status=0
while IFS= read -r prompt || [ -n "$prompt" ]; do
  if [ -n "$prompt" ] && [ $((i % clients)) -eq "$index" ]; then
    sage-device generate "$prompt" --out "$out/$(printf '%04d' "$i").png" --seed "$i" "$@" || status=1
  fi
  i=$((i + 1))
done < "$prompts"
exit "$status"

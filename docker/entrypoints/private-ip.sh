#!/bin/sh
# Print this machine's address on the interface that routes to host $1 (default: this host's own name), i.e. the
# private NIC that Ray must advertise. No packet is sent (a UDP socket's connect only picks a route).
set -eu
target="${1:-$(hostname)}"
exec python -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((socket.gethostbyname(sys.argv[1]), 9))
print(s.getsockname()[0])
' "$target"

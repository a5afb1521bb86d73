#!/usr/bin/env bash
# Regenerates the committed Python messages from these .proto files (run from anywhere; needs grpcio-tools, for
# its protoc: the calls themselves go through puller's own client, stores/containerd/stream.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
python3 -m grpc_tools.protoc -I . --python_out=. --pyi_out=. puller/stores/containerd_api/*.proto

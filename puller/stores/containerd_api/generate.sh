#!/usr/bin/env bash
# Regenerates the committed Python stubs from these .proto files (run from anywhere; needs grpcio-tools).
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. puller/stores/containerd_api/*.proto

#!/usr/bin/env bash
# Regenerates the Python stubs from proto/**/*.proto (run after editing a .proto).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
  proto/scission/v1/generation.proto proto/scission/internal/v1/worker.proto
# Generated modules import "scission.v1..." — rewrite to our package path.
sed -i -E 's/^from scission\.(v1|internal\.v1) import/from scission.proto.scission.\1 import/' \
  proto/scission/v1/*_pb2*.py proto/scission/internal/v1/*_pb2*.py

#!/usr/bin/env bash
# Runs every test of MeshOS: first the loom models (built with --cfg loom in their own
# target directory, so the normal build cache stays warm), then the whole suite: unit,
# property, crash (SIGKILL), corruption, golden-frame, CLI and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== loom models (RUSTFLAGS=--cfg loom, LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3})"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
    cargo test -p loom-tests --release

echo "== the suite"
cargo test

#!/usr/bin/env bash
# Build the shipped latency tables for search_spaces/uib_yolo.yaml on this machine (ops, calibration on 30 sampled
# networks, whole-detector ops) and validate each on 100 seeded architectures (issue 4). Results go to
# docs/BENCHMARKS.md by hand, with the printed figures.
# Usage: bash benchmarks/latency_tables.sh [CORE] [torch|ort|both]   (default: core 1, both tables)
set -euo pipefail
cd "$(dirname "$0")/.."
core=${1:-1}
which=${2:-both}
nas=.venv/bin/nas
space=search_spaces/uib_yolo.yaml
# Whole-detector budgets (issue 7): the dw neck+head (10 classes, DigitsDet) behind every feature-channel combination
# of the space, and the zoo baselines the Pareto figure plots, at the space's resolutions.
zoo="--arch zoo:mobilenet_v2_100 --arch zoo:mobilenet_v3_small_100 --arch zoo:mobilenet_v3_large_100"
zoo="$zoo --arch zoo:mobilenet_v4_conv_small --resolution 256 --resolution 320"
one() {  # table-name, build flags...
  local t=$1; shift
  time taskset -c "$core" $nas lut build --space $space --out latency_tables/$t.csv --force "$@"
  # shellcheck disable=SC2086
  time taskset -c "$core" $nas lut extend latency_tables/$t.csv --space $space $zoo --detector --neck dw --classes 10
  time taskset -c "$core" $nas lut validate latency_tables/$t.csv --space $space -n 100 --seed 1 --out runs/lut-validate/$t
}
# ONNX Runtime without the reference workload: after an ORT call the reference's time depends on what ran before
# it, and its p10 figures tracked end-to-end runs without normalisation (calibration scale 0.999 on 20 networks).
[[ $which == ort ]] || one cpu_torch-cpu_fp32_t1
[[ $which == torch ]] || one cpu_onnxruntime-cpu_fp32_t1 --backend onnxruntime-cpu --no-reference

#!/usr/bin/env bash
# Build the shipped latency tables for search_spaces/uib_yolo.yaml on this machine and validate them on 100
# seeded architectures each (issue 4). Results go to docs/BENCHMARKS.md by hand, with the printed figures.
# Usage: bash benchmarks/latency_tables.sh [CORE]   (default core 1: pin to one core, keep the machine quiet)
set -euo pipefail
cd "$(dirname "$0")/.."
core=${1:-1}
nas=.venv/bin/nas
space=search_spaces/uib_yolo.yaml
time taskset -c "$core" $nas lut build --space $space --out latency_tables/cpu_torch-cpu_fp32_t1.csv --force
time taskset -c "$core" $nas lut build --space $space --backend onnxruntime-cpu --no-reference \
  --out latency_tables/cpu_onnxruntime-cpu_fp32_t1.csv --force
# Whole-detector budgets (issue 7): the dw neck+head (10 classes, DigitsDet) behind every feature-channel combination
# of the space, and the zoo baselines the Pareto figure plots, at the space's resolutions.
zoo="--arch zoo:mobilenet_v2_100 --arch zoo:mobilenet_v3_small_100 --arch zoo:mobilenet_v3_large_100"
zoo="$zoo --arch zoo:mobilenet_v4_conv_small --resolution 256 --resolution 320"
for t in cpu_torch-cpu_fp32_t1 cpu_onnxruntime-cpu_fp32_t1; do
  # shellcheck disable=SC2086
  time taskset -c "$core" $nas lut extend latency_tables/$t.csv --space $space $zoo --detector --neck dw --classes 10
done
for t in cpu_torch-cpu_fp32_t1 cpu_onnxruntime-cpu_fp32_t1; do
  time taskset -c "$core" $nas lut validate latency_tables/$t.csv --space $space -n 100 --seed 1 \
    --out runs/lut-validate/$t
done

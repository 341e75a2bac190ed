#!/usr/bin/env bash
# Step benchmarks on one GPU: ViT-S/16 (batch 128) and ViT-B/16 (batch 64), 2x224 + 10x96 crops
# from 512x512 canvases, bf16 compute, synthetic data on the device; cuDNN fused attention
# ("auto") and XLA attention. Results as JSON lines in ${OUT:-.}/bench.jsonl.
set -u
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
run() {
  timeout "$1" python3 -m dino_jax.bench step "${@:2}" 2>&1 | tee -a "$out/bench.log" \
    | grep '^{' >> "$out/bench.jsonl"
}
# the released recipes computed in float32; the speed targets are for bf16 compute
bf16=--config.model.compute_dtype=bfloat16
small=(--config=vit_small16 "$bf16" --batch 128 --steps 10 --warmup 3)
base=(--config=vit_base16 "$bf16" --batch 64 --steps 10 --warmup 3)
run 100 "${small[@]}"
run 80 "${small[@]}" --config.model.attention=xla
run 100 "${base[@]}" || true
grep -q '"vit_base"' "$out/bench.jsonl" || run 80 "${base[@]}" --config.model.attention=xla
cat "$out/bench.jsonl"

#!/usr/bin/env bash
# The step benchmark on one GPU, in one call of at most BUDGET_S seconds (default 530: under
# 9 minutes): the card and JAX's version, the bf16 matmul rate, then `dino-jax-bench step` for
# ViT-S/16 (batch 128) and ViT-B/16 (batch 64), bf16 compute, 2 x 224 + 10 x 96 crops from
# 512 x 512 canvases on the device, each model in one process (its settings share the GEMM
# autotuning): the recipe as it is (traced with --profile), then every exact speed option at
# once, then one variant per speed option, most wanted first; last, scripts/optimizer_layouts.py (the optimiser's kernels in three state
# layouts). Every item has its own timeout, cut to the time left, so the summary always
# prints; a setting that fails (cuDNN refusing a shape, an option not wired yet) is a JSON line
# with its error and the others run.
#
#   OUT=DIR scripts/gpu_bench.sh        results in DIR (default .): bench.jsonl (one JSON line
#                                       per setting), bench.md (tables for docs/performance.md),
#                                       summary.txt, ITEM.out / ITEM.log, profile_MODEL/
#   PLAIN_PORT=path/to/step.py          also time that script (a plain JAX port of the step):
#                                       `python PATH $PLAIN_PORT_ARGS`, its output in bench.md
#                                       (OUT and PLAIN_PORT: relative to the current folder)
#   SMOKE=1                             the same items on the CPU with a tiny ViT, 2 steps, no
#                                       nvidia-smi (tests/test_gpu_bench_smoke.py runs it)
#   PYTHON=python3  BUDGET_S=530        the interpreter; the whole call's time limit
# Needs JAX for the accelerator and the requirements (requirements.txt) installed; runs from
# the checkout, which need not be installed.
set -u
out=${OUT:-.}
mkdir -p "$out"
out=$(cd "$out" && pwd)
plain=${PLAIN_PORT:-}
if [ -n "$plain" ] && [ -f "$plain" ]; then
  plain="$(cd "$(dirname "$plain")" && pwd)/$(basename "$plain")"
fi
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
budget=${BUDGET_S:-530}
reserve=15 # seconds kept for the tables and the summary
: > "$out/bench.jsonl"
: > "$out/summary.txt"
rm -f "$out/gpu.out" "$out/info.out" "$out/plain_port.out" "$out/layouts.out" # in bench.md
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# item LIMIT NAME COMMAND...: COMMAND under `timeout` (LIMIT, cut to the time left), stdout in
# NAME.out, stderr in NAME.log, its settings' JSON lines (those printed before a timeout too)
# appended to bench.jsonl, one summary line.
item() {
  local limit=$1 name=$2
  shift 2
  local left=$((budget - SECONDS - reserve))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "$name: skipped, no time left" | tee -a "$out/summary.txt"
    return
  fi
  local began=$SECONDS
  timeout -k 5 "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"
  local status=$?
  local how="exit $status"
  ((status == 124 || status == 137)) && how="timed out"
  echo "$name: $how after $((SECONDS - began)) s (limit $limit s)" | tee -a "$out/summary.txt"
  grep -h '^{"setting"' "$out/$name.out" >> "$out/bench.jsonl"
}

# profile_back NAME: the trace's Perfetto file, the step's HLO and the grouping of profile_NAME
# into $out (the XPlane file, large, stays behind); `dino-jax-bench profile DIR` regroups it.
profile_back() {
  local from="$scratch/profile_$1" to="$out/profile_$1"
  [ -d "$from" ] || return
  mkdir -p "$to"
  cp "$from"/profile.json "$from"/step_hlo.txt.gz "$to"/ 2> /dev/null
  (cd "$from" && find plugins -name perfetto_trace.json.gz -exec cp --parents {} "$to" \;)
}

info_py='import jax, jax.numpy as jnp, sys
from dino_jax.bench.step import reference_rate
print("jax", jax.__version__, jax.devices())
rate = reference_rate(sys.argv[1])
print(f"{sys.argv[1]} matmul: {rate / 1e12:.4g} TFLOP/s")'

if [ "${SMOKE:-0}" = 1 ]; then
  # tests/helpers/tiny.py's model on the demo recipe: seconds of compute, the GPU's code paths
  models=(tiny)
  tiny=(--config=demo --batch 8 --config.model.embed_dim=16 --config.model.depth=1
    --config.model.num_heads=2 --config.model.patch_size=4 --config.model.out_dim=64
    --config.model.head_hidden_dim=32 --config.model.head_bottleneck_dim=16
    --config.aug.global_size=16 --config.aug.local_size=8 --config.aug.n_local=2)
  # the base measured and profiled; the GPU's first variant, which a CPU refuses (a JSON line
  # with the error, the other settings unaffected)
  declare -A args=([tiny]="${tiny[*]} --variant model.attention=cudnn,model.attention_pad=8")
  steps=(--steps 2 --warmup 1)
  layouts=(--blocks 1 --prototypes 64 --repeats 1)
  declare -A limits=([tiny]=${SMOKE_LIMIT_S:-300})
  item 60 info "$python" -c "$info_py" float32
else
  bf16=--config.model.compute_dtype=bfloat16
  # every exact speed option at once (the "after" line: a compile takes about 50 s, so an
  # item may run out of time after three or four settings), then one option at a time, the
  # largest expected gain first; tanh-GELU, another function, only on its own
  exact=model.attention=cudnn,model.attention_pad=64,aug.window=True,optim.branch_updates=True
  exact+=,optim.wait_for_gradient=True,optim.flat_state=True
  in_place=optim.branch_updates=True,optim.wait_for_gradient=True
  speed=(--variant "$exact" --variant model.attention=cudnn,model.attention_pad=64
    --variant aug.window=True --variant "optim.flat_state=True,$in_place" --variant "$in_place"
    --variant dino.loss_chunks=4 --variant model.gelu=tanh
    --variant model.attention=cudnn,model.attention_pad=8)
  models=(vit_small16 vit_base16)
  declare -A args=(
    [vit_small16]="--config=vit_small16 $bf16 --batch 128 ${speed[*]} --variant model.remat=dots"
    [vit_base16]="--config=vit_base16 $bf16 --batch 64 ${speed[*]}
      --variant model.remat=dots,optim.batch_size=128 --variant optim.batch_size=128"
  )
  declare -A limits=([vit_small16]=200 [vit_base16]=260)
  steps=(--steps 10 --warmup 3)
  layouts=(--repeats 10)
  item 15 gpu nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version \
    --format=csv,noheader
  item 60 info "$python" -c "$info_py" bfloat16
fi
if [ -n "$plain" ] && [ ! -f "$plain" ]; then
  echo "plain_port: skipped, no such file: $plain" | tee -a "$out/summary.txt"
elif [ -n "$plain" ]; then
  # shellcheck disable=SC2086 # PLAIN_PORT_ARGS: the port's own options, split as a shell would
  item 75 plain_port "$python" "$plain" ${PLAIN_PORT_ARGS:-}
fi
for model in "${models[@]}"; do
  # shellcheck disable=SC2086 # args: the options of this model's settings, one per word
  item "${limits[$model]}" "$model" "$python" -m dino_jax.bench step ${args[$model]} \
    "${steps[@]}" --profile "$scratch/profile_$model"
  profile_back "$model"
done
item 45 layouts "$python" scripts/optimizer_layouts.py "${layouts[@]}"

{
  echo "# Step benchmark"
  echo
  [ -s "$out/gpu.out" ] && echo "- card (nvidia-smi): $(head -1 "$out/gpu.out")"
  [ -s "$out/info.out" ] && sed 's/^/- /' "$out/info.out"
  echo
  echo "\`scripts/gpu_bench.sh\`$([ "${SMOKE:-0}" = 1 ] && echo " (SMOKE=1)"); settings as run:"
  echo
  "$python" -m dino_jax.bench report "$out/bench.jsonl" 2>&1
  if [ -s "$out/plain_port.out" ]; then
    echo
    echo "Plain JAX port (\`$(basename "$plain") ${PLAIN_PORT_ARGS:-}\`), last lines:"
    echo
    echo '```'
    tail -n 15 "$out/plain_port.out" 2> /dev/null
    echo '```'
  fi
  if [ -s "$out/layouts.out" ]; then
    echo
    echo "Optimiser, clip and EMA in three state layouts (\`scripts/optimizer_layouts.py\`):"
    echo
    echo '```'
    cat "$out/layouts.out"
    echo '```'
  fi
  echo
  echo "Items:"
  echo
  sed 's/^/- /' "$out/summary.txt"
} > "$out/bench.md"
cat "$out/bench.md"

#!/usr/bin/env bash
# Scale-out check on one GPU: PPO with a ~130M-parameter Llama-shaped model (hidden 768, 12 layers, vocabulary
# 32000; built from a config, nothing downloaded) in bf16 under DeepSpeed ZeRO-2 and FSDP2, a few iterations each;
# prints samples/s, tokens/s and peak GPU memory per engine (from metrics.jsonl) as a markdown table.
#
# Needs: CUDA torch, `pip install -e ".[deepspeed]"`, one GPU. Run from the repository root:
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python}
ITERS=${ITERS:-4}
mkdir -p "$OUT"
"$PY" bench/gpu_setup.py "$OUT/setup"
SETS=(
  --set "model.policy=$OUT/setup/policy" --set "model.reward=$OUT/setup/rm" --set "data.prompts=$OUT/setup/prompts.jsonl"
  --set model.dtype=bfloat16 --set "ppo.iterations=$ITERS" --set ppo.critic_pretrain_steps=0
  --set ppo.rollout_batch_size=32 --set ppo.buffer_size=64 --set ppo.minibatch_size=32 --set ppo.micro_batch_size=16
  --set generation.max_new_tokens=128 --set logging.tensorboard=false --set logging.progress=false
  --set logging.checkpoint_every=0
)
for engine in zero2 fsdp; do
  rm -rf "${OUT:?}/$engine"
  accelerate launch --config_file "configs/accelerate/$engine.yaml" --num_processes 1 --mixed_precision bf16 \
    -m ppomax train-ppo "${SETS[@]}" --set "logging.out_dir=$OUT/$engine" 2> "$OUT/$engine.log" || {
      echo "$engine failed, last lines of $OUT/$engine.log:"; tail -20 "$OUT/$engine.log"; }
done
"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| engine | samples/s | tokens/s | peak GPU memory (GiB) | iterations |")
print("|---|---|---|---|---|")
for engine in ("zero2", "fsdp"):
    f = out / engine / "metrics.jsonl"
    rows = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
    rows = [r for r in rows if "perf/samples_per_s" in r][1:]  # first iteration: warm-up
    if not rows:
        print(f"| {engine} | failed | | | |"); continue
    med = lambda k: statistics.median(r[k] for r in rows)
    peak = max(r.get("perf/peak_gpu_memory_gib", float("nan")) for r in rows)
    print(f"| {engine} | {med('perf/samples_per_s'):.2f} | {med('perf/tokens_per_s'):.0f} | {peak:.2f} | {len(rows)} |")
PYEOF

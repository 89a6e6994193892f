#!/usr/bin/env bash
# One prepared check for a machine with CUDA GPUs (none was lent while this was written; the CUDA
# paths have never run: expect bugs, and record what you see in docs/benchmarks.md).
#
#   bash bench/gpu_check.sh            # ~10 minutes on one H100-class GPU
#   STEPS=5 bash bench/gpu_check.sh    # shorter
#
# Needs: this repository, a Python with CUDA torch and the studio's dependencies ($PYTHON, default
# python3), and the demo model in ~/.cache/alignment-studio (or STUDIO_MODEL=/path/to/hf/folder).
# Prints, for DPO and PPO (and GRPO when its engine exists) on the model in bf16 autocast:
# tokens/s, model-FLOPs utilisation, peak CUDA memory; then a 2-process DDP bundle run when there
# are 2+ GPUs (its metrics against the 1-process run); then the out-of-memory path: an oversized
# batch must fail with the studio's message and leave the run resumable.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-20}
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
export PYTHONPATH=$PWD

$PYTHON - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

echo "== project in $WORK"
$PYTHON - "$WORK" <<'EOF' || exit 1
import json, os, sys
from pathlib import Path
from studio.core import datasets, store
work = Path(sys.argv[1])
model = os.environ.get("STUDIO_MODEL")
base = {"kind": "folder", "path": model} if model else {"kind": "demo"}
with store.Project.create(work / "project", base_model=base) as project:
    demo = Path("resources/demo")
    datasets.import_file(project.db, demo / "preference_pairs.jsonl")
    datasets.import_file(project.db, demo / "prompts.jsonl")
    datasets.import_file(project.db, demo / "eval_prompts.jsonl", as_eval=True)
EOF

report() {  # report RUN_ID: tokens/s, MFU, peak memory from the run's stored metrics
$PYTHON - "$WORK/project" "$1" <<'EOF'
import statistics, sys
import torch
from studio.core import runs, store
db = store.connect(sys.argv[1])
run_id = int(sys.argv[2])
metrics = store.run_metrics(db, run_id)
run = store.get_run(db, run_id)
tps = statistics.median(metrics["tokens_per_second"][1][1:] or metrics["tokens_per_second"][1])
model, _ = runs.load_model_state(db, None)
params = sum(p.numel() for p in model.parameters())
# LoRA: forward 2N + backward through frozen weights 2N (no weight gradients) = 4N FLOPs per trained token.
# PPO's tokens/s counts rollout tokens, which also pay generation and reference passes: its MFU is lower by design.
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
name = torch.cuda.get_device_name(0)
flops = next((v for k, v in peak.items() if k in name), None)
mfu = f"{4 * params * tps / flops:.1%} of {flops / 1e12:.0f} TFLOP/s bf16 dense" if flops else "peak FLOPs unknown for " + name
print(f"{run['method'].upper()} run {run_id} ({run['status']}): {tps:,.0f} tokens/s (median), MFU {mfu}, "
      f"peak CUDA memory {max(metrics['memory/peak_mb'][1]):,.0f} MB, {params / 1e6:.0f}M parameters")
EOF
}

train() {  # train METHOD KEY=VALUE...: a run on GPU 0, then its report
  local method=$1; shift
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  CUDA_VISIBLE_DEVICES=0 timeout 900 $PYTHON -m studio train "$WORK/project" --method "$method" \
      --set max_steps=$STEPS --set checkpoint_every=$STEPS "${sets[@]}" > "$WORK/$method.log" 2>&1
  echo "exit $? ($WORK/$method.log)"; tail -n 3 "$WORK/$method.log"
  report "$($PYTHON -c "import sys; from studio.core import store; print(store.list_runs(store.connect(sys.argv[1]))[-1]['id'])" "$WORK/project")"
}

echo "== DPO, $STEPS steps, bf16 autocast"; train dpo batch_size=8
echo "== PPO, $STEPS steps, bf16 autocast"; train ppo prompts_per_step=16
if $PYTHON -c "import studio.core.grpo" 2>/dev/null; then echo "== GRPO"; train grpo; fi

GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  echo "== DDP: DPO bundle, 2 processes vs 1, same global batch"
  RUN=$($PYTHON -c "
import sys; from studio.core import runs, store
with store.Project.open(sys.argv[1]) as p:
    print(runs.create_run(p.db, runs.make_config('dpo', {'max_steps': 10, 'checkpoint_every': 5, 'batch_size': 8})))" "$WORK/project")
  $PYTHON -m studio bundle "$WORK/project" "$RUN" "$WORK/bundle" --no-model
  cp -r "$WORK/bundle" "$WORK/bundle-one"
  CUDA_VISIBLE_DEVICES=0 $PYTHON -m studio run-bundle "$WORK/bundle-one" > "$WORK/ddp1.log" 2>&1
  $PYTHON -m torch.distributed.run --standalone --nproc_per_node 2 -m studio run-bundle "$WORK/bundle" > "$WORK/ddp2.log" 2>&1
  $PYTHON - "$WORK" <<'EOF'
import sys
from pathlib import Path
from studio.core.bundles import read_jsonl
one, two = (read_jsonl(Path(sys.argv[1]) / b / "run" / "metrics.jsonl") for b in ("bundle-one", "bundle"))
for name in ("loss", "rewards/margins", "grad_norm"):
    print(f"{name}: largest |2-GPU - 1-GPU| over {len(two)} steps = {max(abs(a[name] - b[name]) for a, b in zip(one, two)):.2e}")
print(f"s/step median: 1 GPU {sorted(r['step_seconds'] for r in one)[len(one)//2]:.3f}, 2 GPUs {sorted(r['step_seconds'] for r in two)[len(two)//2]:.3f}")
EOF
else
  echo "== DDP skipped: $GPUS GPU"
fi

echo "== out of memory: the whole demo set in one DPO batch, on a GPU capped at OOM_FRACTION of its memory"
# The demo set is small, so a large batch alone fits an H100-class GPU: the cap makes it not fit
# (the model loads, the first batch's activations do not).
CUDA_VISIBLE_DEVICES=0 timeout 600 $PYTHON -c "
import sys, torch
torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))
from studio.cli import main
raise SystemExit(main(['train', sys.argv[2], '--method', 'dpo', '--set', 'batch_size=64', '--set', 'max_steps=4',
                       '--set', 'checkpoint_every=1', '--name', 'oom']))" "${OOM_FRACTION:-0.006}" "$WORK/project" > "$WORK/oom.log" 2>&1
echo "exit $? (expected non-zero, with the studio's message, no traceback):"; tail -n 4 "$WORK/oom.log"
$PYTHON -m studio runs "$WORK/project" | tail -n 3
echo "(the oom run must be 'failed' with a readable error, and \`studio train --resume ID\` must start it again)"

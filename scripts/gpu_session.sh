#!/usr/bin/env bash
# One prepared GPU call (H100/H200, <= 10 minutes): every measurement the open issues still need, each
# part under its own time limit so that one failure or overrun leaves the others' results.
#
#   OUT=/tmp/gpu bash scripts/gpu_session.sh                     # $OUT/results.tgz: <part>/ and <part>.log
#   PARTS="fftconv mqar" OUT=/tmp/gpu bash scripts/gpu_session.sh
#   PARTS=decode DECODE_RUN=runs/ts_hyena_2k-dl0.01 OUT=... bash scripts/gpu_session.sh
#
# PARTS (default "sweep fftconv lm_step", in that order; seconds are the limits, ~10 s of overhead):
#   sweep    140  scripts/gpu_kernel_sweep.py: launch settings of the Pallas kernels, the Mosaic GPU kernels
#                 (impl "mosaic") at 1K first (issue 9)
#   fftconv  250  scripts/gpu_check.py: correctness vs float64 at L 1K (every impl, Mosaic included: the
#                 table only takes impls that passed; ~60 s) and 16K + kernel table (issue 9 items 1-7)
#   lm_step  130  scripts/bench_lm_gpu.py: 153M Hyena train step with fftconv pallas/xla x layout hbl/blh,
#                 against cuDNN flash attention, at 4K then 16K (issue 9 item 8)
#   mqar     100  longconv mqar on configs/mqar/zoology.yaml, L 64/128, d_model 64-256, resuming from the
#                 committed $MQAR_DIR/results.jsonl (issue 10 item 4; resolved, so not in the default PARTS)
#   decode    60  scripts/bench_decode.py on $DECODE_RUN (issue 12 item 5; not in the default PARTS)
# Everything ends up in $OUT/results.tgz (the device tool returns at most 8 files).
set -u
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RES=$(mktemp -d)
MQAR_DIR=${MQAR_DIR:-results/mqar/zoology}

part() {  # part NAME SECONDS CMD...: run CMD with a time limit, log to $RES/NAME.log, note rc and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0))}" >>"$RES/parts.jsonl"
  tail -n 12 "$RES/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
  --format=csv >"$RES/nvidia-smi.csv" 2>&1
"$PY" -c "import jax, jaxlib, flax; print(jax.__version__, jaxlib.__version__, flax.__version__, jax.devices())" \
  >"$RES/versions.txt" 2>&1
cat "$RES/versions.txt"

for name in ${PARTS:-sweep fftconv lm_step}; do
  case $name in
    sweep) part sweep 140 env MOSAIC_GPU_DUMP_PTXAS=1 "$PY" scripts/gpu_kernel_sweep.py --budget-s 110 \
      --out "$RES/sweep" ;;  # ptxas -v of the Mosaic kernels (registers, spills) lands in sweep.log
    fftconv) part fftconv 250 "$PY" scripts/gpu_check.py --budget-s 210 --check-lens 1024 16384 --max-len 1048576 \
      --out "$RES/fftconv" --write-table --table "$RES/fftconv/tuned.json" ;;  # winners: copy to kernels/fftconv/
    lm_step) part lm_step 130 "$PY" scripts/bench_lm_gpu.py --models hyena,attention --seqlens 4096,16384 \
      --fftconv-impls pallas,xla --hyena-layouts hbl,blh --steps 5 --out "$RES/lm_step" ;;
    mqar)
      part mqar 100 "$PY" -m lm.cli mqar --config configs/mqar/zoology.yaml --out "$MQAR_DIR" --time-budget 85 \
        'grid.points=[{seq_len: 64, num_kv_pairs: 4, batch_size: 512}, {seq_len: 128, num_kv_pairs: 8, batch_size: 512}]' \
        'grid.d_models=[64, 128, 256]'
      # a cut group's checkpoint (up to ~100 MB at d_model 256) stays behind: it cannot come back
      mkdir -p "$RES/mqar" && tar -C "$MQAR_DIR" --exclude=checkpoints -cf - . | tar -C "$RES/mqar" -xf - ;;
    decode) part decode 60 "$PY" scripts/bench_decode.py --run "${DECODE_RUN:?set DECODE_RUN}" \
      --lengths 4096 16384 65536 --out "$RES/decode" --tag gpu ;;
    *) echo "unknown part $name" ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$RES" . && cp "$RES/parts.jsonl" "$OUT/" && echo "wrote $OUT/results.tgz"
cat "$RES/parts.jsonl"

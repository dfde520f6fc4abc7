#!/usr/bin/env bash
# From a source checkout, first the GPU parity of the path users run: Session.respond (streaming,
# offline, audio + image + video, a video's own audio), `omnistream generate` and batched sessions
# on CUDA give the transformers reference's greedy ids on the same device (fp32, TF32 off;
# OMNISTREAM_TEST_DEVICE in tests/helpers.py). Then the benchmark suite on one CUDA device with the
# 7B shapes in bf16 (token2wav in fp32), omnistream and the transformers reference side by side on
# shared random weights. A few minutes end to end on an H100 (7B thinker text: ~15 GB of bf16
# weights, held once).
#
#   bash src/omnistream/bench/gpu_bench.sh [extra `omnistream bench` args]   e.g. --compile --layers 14
#
# Env: OUT (JSON path, default bench_gpu.json), CONFIGS (default below), INT8=1 to also time the
# int8 weight-only decoders (on CUDA _weight_int8pack_mm may be missing: the fallback dequantizes
# per call and is slower than bf16 - that is a finding, not a bug).
set -euo pipefail
# from a source checkout, its virtual environment (an installed package: the python on PATH)
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
[ -f "$ROOT/.venv/bin/activate" ] && . "$ROOT/.venv/bin/activate"
OUT=${OUT:-bench_gpu.json}
CONFIGS=${CONFIGS:-7b-text,7b-talker,token2wav,audio-encoder,vision-encoder}
INT8_FLAG=--no-int8
[ "${INT8:-0}" = 1 ] && INT8_FLAG=
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
if [ -d "$ROOT/tests" ]; then
  OMNISTREAM_TEST_DEVICE=cuda python -m pytest -q -p no:warnings -p no:cacheprovider \
    "$ROOT/tests/test_talker.py::test_session_codes_match_reference_generate" \
    "$ROOT/tests/test_talker.py::test_cli_generate_codes_match_reference_generate" \
    "$ROOT/tests/test_batch.py" \
    "$ROOT/tests/test_token2wav.py::test_dit_rotary_built_on_meta_runs_where_the_weights_load" | tee "${OUT%.json}_parity.txt"
fi
python -m omnistream.bench --device cuda --dtype bfloat16 --config "$CONFIGS" \
  --prompt-len 512 --decode-tokens 128 --talker-tokens 128 --repeats 3 \
  --t2w-seconds 10 --audio-seconds 30 --image-size 448 $INT8_FLAG \
  --json-out "$OUT" "$@"
# The server under load with continuous batching: 1, 8 and 32 concurrent streams (text + speech,
# official openai client) at 7B shapes (random weights, written once; SERVE_ARGS to change, e.g.
# "--layers 8 --talker-layers 8" for a shorter run).
# Token2Wav is fp32 (as the release's), so there its DiT is bound by fp32 arithmetic: the second
# run lets its matmuls use TF32 (serve --tf32).
python -m omnistream.bench serve --shapes 7b --device cuda --dtype bfloat16 --clients 1 8 32 \
  --max-tokens 64 --max-speech-s 4 --timeout 600 ${SERVE_ARGS:-} | tee "${OUT%.json}_serve.txt"
python -m omnistream.bench serve --shapes 7b --device cuda --dtype bfloat16 --clients 1 8 32 \
  --max-tokens 64 --max-speech-s 4 --timeout 600 --tf32 ${SERVE_ARGS:-} \
  | tee -a "${OUT%.json}_serve.txt"
echo "wrote $OUT and ${OUT%.json}_serve.txt (and ${OUT%.json}_parity.txt from a checkout)"

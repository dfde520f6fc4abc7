# Two entry points: `make demo` (set up, ask the default model a question, reply.wav)
# and `make test` (set up, run the test suite). Both work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test lint bench codec mini

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve]'

setup-test: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,test,data,eval]'

tiny/config.json: | setup
	$(BIN)/omnistream make-tiny tiny

# the shipped omni-mini (models/omni-mini, trained here) hears a spoken question about an image
# and answers in streamed text and speech (reply.wav); without it, the tiny random checkpoint
# answers a text prompt (noise: it exercises the code paths)
demo: setup
	@if [ -f models/omni-mini/config.json ]; then \
		$(BIN)/omnistream generate --image assets/demo/shapes.png \
			--audio assets/demo/question.wav --out reply.wav; \
	else \
		$(MAKE) --no-print-directory tiny/config.json && \
		$(BIN)/omnistream generate --model tiny --prompt "Say hello in one sentence." \
			--out reply.wav --max-new-tokens 24 --talker-max-new-tokens 250; \
	fi

test: setup-test
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest tests

lint:
	$(BIN)/ruff check src tests

# omni-mini from scratch: task data, the paper's stages (configs/train/mini_*.json), DPO pairs,
# models/omni-mini and its evaluation (docs/MINI.md). Run it again to resume where it stopped.
CODEC ?= models/codec
MINI_OUT ?= artifacts/mini
mini: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,data,eval]'
	$(BIN)/python -m omnistream.train.mini --out $(MINI_OUT) --codec $(CODEC)

bench: setup-test
	$(BIN)/python -m omnistream.cli bench

# The speech codec from scratch (docs/CODEC.md): Piper corpus, then the codec stage (encoder + DiT)
# and the vocoder stage side by side (one core each), merged, then the DiT alone (codec_dit), the
# character CTC stage, and the DiT grown to 8 layers and trained alone (codec_dit8) into
# models/codec. Resumable.
CODEC_OUT ?= artifacts/codec
codec: setup-test
	$(BIN)/python -m omnistream.train.speech_corpus $(CODEC_OUT)/corpus --n 1000 --seed 0
	OMP_NUM_THREADS=1 $(BIN)/omnistream train --config configs/train/codec.json \
		--data $(CODEC_OUT)/corpus/corpus.jsonl --model configs/codec --out $(CODEC_OUT)/codec & \
	OMP_NUM_THREADS=1 $(BIN)/omnistream train --config configs/train/codec_vocoder.json \
		--data $(CODEC_OUT)/corpus/corpus.jsonl --model configs/codec --out $(CODEC_OUT)/vocoder & \
	wait
	$(BIN)/python -m omnistream.train.codec merge $(CODEC_OUT)/codec $(CODEC_OUT)/vocoder \
		$(CODEC_OUT)/merged
	$(BIN)/omnistream train --config configs/train/codec_dit.json \
		--data $(CODEC_OUT)/corpus/corpus.jsonl --model $(CODEC_OUT)/merged --out $(CODEC_OUT)/dit
	$(BIN)/python -m omnistream.train.speech_corpus $(CODEC_OUT)/corpus4k --n 4000 --seed 0
	$(BIN)/omnistream train --config configs/train/codec_ctc.json \
		--data $(CODEC_OUT)/corpus4k/corpus.jsonl --model $(CODEC_OUT)/dit --out $(CODEC_OUT)/ctc
	$(BIN)/python -m omnistream.train.codec grow $(CODEC_OUT)/ctc $(CODEC_OUT)/grown 8
	$(BIN)/omnistream train --config configs/train/codec_dit8.json \
		--data $(CODEC_OUT)/corpus4k/corpus.jsonl --model $(CODEC_OUT)/grown --out $(CODEC_OUT)/dit8
	mkdir -p models/codec && cp $(CODEC_OUT)/dit8/config.json $(CODEC_OUT)/dit8/spk_dict.pt \
		$(CODEC_OUT)/dit8/model.safetensors models/codec/
	$(BIN)/omnistream codec eval --model models/codec --n 100

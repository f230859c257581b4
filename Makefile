# Everything a fresh clone needs: `make demo` and `make test` create .venv and install what they use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ANP := $(VENV)/bin/anp-onnx
INSTALLED := $(VENV)/.installed
EXAMPLE := examples/badnets_resnet_bn
OUT := out
BENCH_JOBS ?= 2  # models measured side by side by make bench (one torch thread each on the 2-core machine)

.PHONY: install demo test test-slow fuzz lint format fashion-mnist examples keras-model many-label-models \
	bench bench-scale bench-speed clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	mkdir -p $(OUT)
	$(ANP) purify $(EXAMPLE)/model.onnx --data $(EXAMPLE)/clean.npz \
		--test-data $(EXAMPLE)/test.npz --poison-data $(EXAMPLE)/poison.npz \
		-o $(OUT)/demo.purified.onnx --report $(OUT)/demo-report.json --force
	$(ANP) evaluate $(OUT)/demo.purified.onnx --data $(EXAMPLE)/test.npz --poison-data $(EXAMPLE)/poison.npz

test: $(INSTALLED)
	$(PY) -m pytest -q

# The fuzz test with 10,000 mutated models and data files per case (a minute or two); `make test` runs 50.
fuzz: $(INSTALLED)
	ANP_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/test_fuzz.py -p no:cacheprovider -W error::RuntimeWarning

test-slow: $(INSTALLED)
	$(PY) -m pytest -q -m slow

lint: $(INSTALLED)
	$(VENV)/bin/ruff check anp_onnx tools tests
	$(VENV)/bin/ruff format --check anp_onnx tools tests

format: $(INSTALLED)
	$(VENV)/bin/ruff format anp_onnx tools tests
	$(VENV)/bin/ruff check --fix anp_onnx tools tests

# Fashion-MNIST ships as a Debian package; tools/ that train models need it.
fashion-mnist:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# Regenerates the committed examples from fixed seeds (a few minutes on 2 CPU cores).
examples: $(INSTALLED) fashion-mnist
	$(PY) tools/make_examples.py

# A small backdoored Keras CNN whose tf2onnx export ends in Softmax (issue 24), into cache/keras_softmax/
# (model.onnx, clean/test/poison.npz, meta.json; about two minutes on 2 CPU cores). TensorFlow lives in
# its own .venv-keras, installed once (the stamp file), never in .venv or `make test`'s install.
# KERAS_ATTACK=blend trains the blended-trigger variant into cache/keras_softmax_blend/.
KERAS_VENV := .venv-keras
KERAS_INSTALLED := $(KERAS_VENV)/.installed
KERAS_ATTACK ?= badnets
KERAS_OUT := cache/keras_softmax$(if $(filter badnets,$(KERAS_ATTACK)),,_$(KERAS_ATTACK))

$(KERAS_INSTALLED):
	test -x $(KERAS_VENV)/bin/python || $(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install --quiet tensorflow-cpu==2.15.1 tf2onnx==1.16.1 onnxruntime==1.19.2 'numpy<2'
	touch $(KERAS_INSTALLED)

keras-model: $(KERAS_INSTALLED) fashion-mnist
	$(KERAS_VENV)/bin/python tools/keras_softmax_model.py --attack $(KERAS_ATTACK) --out-dir $(KERAS_OUT)

# Backdoored 100-label models (issue 23, no 100-class image set can be downloaded): Fashion-MNIST pairs, two
# images side by side (28x56), label 10a+b; a flatten_cnn per attack (BadNets, Blend, and clean controls) and seed (0, 1, 2), the
# target drawn from the seed, into cache/many_labels/<attack>_s<seed>/ (model.onnx, clean/test/poison.npz,
# meta.json). 40 000 training pairs, 3 epochs, one torch thread: 221-253 s of training per model, 25 min in
# all on the shared 2-core machine (2026-12-07). Options: `$(PY) tools/many_label_models.py --help`.
many-label-models: $(INSTALLED) fashion-mnist
	$(PY) tools/many_label_models.py --attack badnets --attack blend --attack clean --seed 0 --seed 1 --seed 2 \
		--out-dir cache/many_labels

# The defence benchmark (issues 3, 5, 22): trains the grid's models once into cache/bench/ (41 min when trained
# one after another on 2 CPU cores; they train side by side within the cores), then anp-onnx's default
# (prune + repair, and the same run's pruning alone), Fine-Pruning and CLP through the same rewriters, and the
# scan, on every model; the Keras/tf2onnx Softmax models of `make keras-model` join as rows of their own where
# they have been made (cache/keras_softmax*/). Writes docs/RESULTS.md, docs/results.json and the threshold
# figure (66 min with BENCH_JOBS=2 on the 2-core machine, models already trained, 2026-12-07 21:52).
# Options: `$(PY) tools/bench_defense.py --help`.
EXTERNAL_MODELS := $(patsubst %/model.onnx,%,$(wildcard cache/keras_softmax*/model.onnx))
bench: $(INSTALLED) fashion-mnist
	$(PY) tools/bench_defense.py --jobs $(BENCH_JOBS) $(foreach dir,$(EXTERNAL_MODELS),--external $(dir))

# Scan and purify time and peak memory against labels (10, 43, 100, 1000; small ResNet, 28x28, every default),
# input size (torchvision ResNet-18 and MobileNetV2 at 28, 64, 224, --effort 0.02) and, on equal evidence,
# backdoored Fashion-MNIST rows with 10 against 100 (pairs) and 1,000 labels (triples), each a process of its
# own; writes docs/SCALING.md, docs/scaling.json and docs/scaling.png (issue 23). Models: tools/scale_models.py
# and tools/many_label_models.py, made once into cache/. Options: `$(PY) tools/bench_scale.py --help`; the
# committed page's command and times are on it.
bench-scale: $(INSTALLED) fashion-mnist
	$(PY) tools/bench_scale.py

# Cost of one ANP iteration in plain training steps, against a reference-style loop, and
# onnxruntime evaluation throughput (issue 6); prints ratios measured side by side.
bench-speed: $(INSTALLED)
	mkdir -p $(OUT)
	$(PY) tools/bench_speed.py --json $(OUT)/bench_speed.json

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache

# Two entry points (see README): `make demo` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without an NVIDIA driver, pin the CPU torch build.
CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

$(BIN)/.ready: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINT) -e ".[test]"
	touch $@

# The corpus libraries that import torchvision (tests/models/corpus.py), kept off the venv's path: PyPI's torchvision
# is a CUDA build whose ops do not load beside the CPU torch, and a torchvision that fails to import breaks
# transformers everywhere.  tests/conftest.py puts this folder on sys.path (after defining torchvision's schemas).
CORPUS_LIBS := $(VENV)/corpus-libs
TORCHVISION := $(if $(CONSTRAINT),torchvision==0.28.0,torchvision)

$(CORPUS_LIBS)/.ready: $(BIN)/.ready Makefile
	$(BIN)/pip install -q --no-deps --upgrade --target $(CORPUS_LIBS) $(TORCHVISION) "timm>=1.0.20" \
		"open_clip_torch>=3.0" "vit-pytorch>=1.26" "segment-anything>=1.0"
	touch $@

venv: $(BIN)/.ready

demo: $(BIN)/.ready
	$(BIN)/python examples/quickstart.py

# the HTML report's test renders the page in headless Chromium (Debian's package; CI runs as root)
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "attnfuse: could not install chromium (not root?); the HTML report's browser test skips outside CI"

INTERPRET_TESTS = $(sort $(shell find tests -name '*_interpret.py'))

test: $(BIN)/.ready $(CORPUS_LIBS)/.ready browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests --ignore-glob='*_interpret.py'
	# the Triton kernels on the CPU: their own tests (tests/**/*_interpret.py, beside each module's CPU and AOT
	# tests), the model tests, the matcher and soundness tests through them
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile $(INTERPRET_TESTS) tests/passes/test_match.py \
		tests/passes/test_soundness.py

bench: $(BIN)/.ready
	$(BIN)/python benchmarks/bench_models.py

# per-call time of a compiled tiny LLaMA decode step on CPU, stock torch.compile vs attnfuse (fresh process each)
bench-overhead: $(BIN)/.ready
	$(BIN)/python benchmarks/host_overhead.py

# compile-time memory: first-call peak RSS growth, attnfuse vs stock Inductor + SDPA, seq 8k and 32k (~5 min, ~6 GB)
bench-memory: $(BIN)/.ready
	$(BIN)/python benchmarks/compile_memory.py

.PHONY: bench-memory

.PHONY: venv demo test bench bench-overhead browser

# the differential fuzzer's long mode: 5,000 seeded cases with a progress bar, counts and wall time
fuzz-long: $(BIN)/.ready
	$(BIN)/python tests/passes/_fuzz.py --long

.PHONY: fuzz-long

# the GPU suite (benchmarks/gpu_suite.py, <= 8 min on an H100): attnfuse vs SDPA backends vs FlexAttention vs
# stock torch.compile, JSON + PNG in benchmarks/results/ ("--dry": tiny shapes on the CPU, what the tests run)
gpu-suite: $(BIN)/.ready
	$(BIN)/python benchmarks/gpu_suite.py

.PHONY: gpu-suite

# context parallelism on the CPU (gloo, 1/2/4 ranks, fresh processes): per-rank peak memory and time, JSON + PNG
bench-cp: $(BIN)/.ready
	$(BIN)/python benchmarks/bench_context_parallel.py --bwd-seqs 4096,16384 --reps 2 --timeout 900

.PHONY: bench-cp

# Tensor Product Attention (benchmarks/bench_tpa.py): a T6-style model as written vs attnfuse vs a plain MHA cache;
# prefill at 4k/16k, decode per token at 8k/32k/64k, peak memory; fresh processes; JSON + PNG in benchmarks/results/
bench-tpa: $(BIN)/.ready
	$(BIN)/python benchmarks/bench_tpa.py

.PHONY: bench-tpa

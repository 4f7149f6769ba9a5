PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch CI tests with; pyproject.toml accepts 2.11 to 2.13.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-fast test-gpu bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: nothing below may pull a different torch.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# The whole suite (what CI runs); GPU-marked tests skip without CUDA.
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" -n 2 tests experiments

# Everything not marked slow: a few minutes on 2 cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu and not slow" -n 2 tests experiments

# On a CUDA machine whose Python already has torch and triton (no venv): the GPU-marked tests with pinned
# tiles, and the dilated benchmark of docs/results.md (config A, 256K, both causal settings, with its anchors).
GPU_PY ?= python3
BENCH_OUT ?= benchmarks/out

# Nine pytest processes at once, so the kernels' compilation spreads over the machine's cores: each kernel file's
# every-tile test apart from the rest of that file (the dilated file split twice more), the Gluon tests, the
# distributed tests, and the model-level tests; logs, with the slowest tests, in $(BENCH_OUT).
DILATED_GPU := tests/lowering/dilated/test_gpu.py
BLOCK_SPARSE_GPU := tests/lowering/block_sparse/test_gpu.py
GLUON_GPU := tests/lowering/dilated/test_gluon.py tests/lowering/block_sparse/test_gluon.py
DILATED_REST := not every_tile and not nested and not offset and not two_shapes

test-gpu:
	mkdir -p $(BENCH_OUT)
	@run() { log=$$1; shift; DILATE_COMPILER_AUTOTUNE=0 PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q \
		-p no:cacheprovider --durations=5 -m gpu "$$@" > $(BENCH_OUT)/test-gpu-$$log.log 2>&1; }; \
	pids=""; \
	run 1 $(DILATED_GPU) -k every_tile & pids="$$pids $$!"; \
	run 2 $(DILATED_GPU) -k "not every_tile and (nested or offset or two_shapes)" & pids="$$pids $$!"; \
	run 6 $(DILATED_GPU) -k "$(DILATED_REST) and op_on_cuda" & pids="$$pids $$!"; \
	run 7 $(DILATED_GPU) -k "$(DILATED_REST) and not op_on_cuda" & pids="$$pids $$!"; \
	run 3 $(BLOCK_SPARSE_GPU) -k every_tile & pids="$$pids $$!"; \
	run 4 $(BLOCK_SPARSE_GPU) -k "not every_tile" & pids="$$pids $$!"; \
	run 5 $(GLUON_GPU) & pids="$$pids $$!"; \
	run 8 tests/distributed & pids="$$pids $$!"; \
	run 9 tests --ignore=$(DILATED_GPU) --ignore=$(BLOCK_SPARSE_GPU) --ignore=tests/distributed \
		$(patsubst %,--ignore=%,$(GLUON_GPU)) & pids="$$pids $$!"; \
	rc=0; for pid in $$pids; do wait $$pid || rc=1; done; \
	tail -n 2 $(BENCH_OUT)/test-gpu-*.log; exit $$rc

bench:
	mkdir -p $(BENCH_OUT)
	PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/bench_dilated.py --out $(BENCH_OUT) --configs A --ns 262144 \
		--causal both --methods ours,ours-triton,dense,gather --backward

clean:
	rm -rf $(VENV) build *.egg-info

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-gpu bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: nothing below may pull a different torch.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" -n 2 tests

# On a CUDA machine whose Python already has torch and triton (no venv): the GPU-marked tests with pinned
# tiles, and the dilated benchmark of RESULTS.md (config A, 256K, both causal settings, with its anchors).
GPU_PY ?= python3
BENCH_OUT ?= benchmarks/out

# Three pytest processes at once (the two kernel files, then everything else); logs in $(BENCH_OUT).
GPU_TEST_FILES := tests/lowering/test_dilated_gpu.py tests/lowering/test_block_sparse_gpu.py

test-gpu:
	mkdir -p $(BENCH_OUT)
	@pids=""; i=0; \
	for group in $(GPU_TEST_FILES) "tests $(foreach f,$(GPU_TEST_FILES),--ignore=$(f))"; do \
		i=$$((i + 1)); \
		(DILATE_COMPILER_AUTOTUNE=0 PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu \
			$$group > $(BENCH_OUT)/test-gpu-$$i.log 2>&1) & pids="$$pids $$!"; \
	done; \
	rc=0; for pid in $$pids; do wait $$pid || rc=1; done; \
	tail -n 2 $(BENCH_OUT)/test-gpu-*.log; exit $$rc

bench:
	mkdir -p $(BENCH_OUT)
	PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/bench_dilated.py --out $(BENCH_OUT) --configs A --ns 262144 \
		--causal both --methods ours,dense,gather --backward

clean:
	rm -rf $(VENV) build *.egg-info

# Two entry points: `make demo` and `make test`. Both build .venv from this
# project's own files first, so a fresh machine needs nothing else.
PYTHON ?= python3
# The torch requirement is a variable because the right build is machine
# specific (e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,train,plot

.PHONY: demo test install bench clean

$(VENV)/.installed-$(EXTRAS): setup.py Makefile shadowgraft/_native.c shadowgraft/_sums.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(VENV)/bin/shadowgraft demo

# The second run: the modules whose hot loops have a compiled kernel, on the
# TorchScript fallback that installs without a C compiler get.
test: install
	$(PY) -m pytest -q
	SHADOWGRAFT_NATIVE=0 $(PY) -m pytest -q tests/test_engine.py tests/test_fused.py tests/test_graft.py tests/test_stats.py tests/test_diff.py

bench: install
	$(PY) benchmarks/bench_apply.py
	$(PY) benchmarks/bench_stats.py

# mergekit lives in its own venv (it pins its own transformers); bench_apply.py
# adds its row whenever bench-out/mergekit-venv exists.
.PHONY: bench-mergekit
bench-mergekit: install
	TORCH="$(TORCH)" bash benchmarks/mergekit_venv.sh bench-out/mergekit-venv
	$(PY) benchmarks/bench_apply.py --scaling 1,2,4

# Beyond RAM, cold cache: a Qwen3-4B-shaped trio (24 GB of input, ~40 GB of
# disk with two outputs), the floor, shadowgraft and mergekit; dropping the
# page cache needs root. The trio is kept for the next run (--delete removes it).
.PHONY: bench-scale
bench-scale: install
	TORCH="$(TORCH)" bash benchmarks/mergekit_venv.sh bench-out/mergekit-venv
	$(PY) benchmarks/bench_scale.py --markdown bench-out/scale.md

# On a machine with an NVIDIA GPU and a CUDA build of torch: the CUDA tests
# (bit-identity with the CPU path) and the cpu/cuda/floor scaling benchmark.
.PHONY: gpu-check
gpu-check: install
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	$(PY) -m pytest -q -m cuda
	$(PY) benchmarks/bench_apply.py --size 1GB --scaling 1,2,4 --tools cpu,cuda,floor --markdown bench-out/cuda.md

# The compiled kernels under AddressSanitizer and UBSan (gcc): build them so,
# run the whole suite with the runtimes preloaded, then rebuild them normally.
.PHONY: sanitize
sanitize: install
	$(PY) -c "import sysconfig as s; print(s.get_config_var('EXT_SUFFIX'))" > .ext-suffix
	gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -ffp-contract=off -Wno-psabi -fPIC -shared \
		-I$$($(PY) -c "import sysconfig as s; print(s.get_paths()['include'])") \
		shadowgraft/_native.c -o shadowgraft/_native$$(cat .ext-suffix)
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(PY) -m pytest -q; \
		status=$$?; rm -f .ext-suffix; $(PY) setup.py -q build_ext --inplace --force; exit $$status

# The kernels built by clang (where it is installed) through the tests that cover them, then rebuilt
# normally: widths, bits and results must be those of gcc's build.
.PHONY: clang-check
clang-check: install
	rm -f shadowgraft/_native*.so
	CC=clang $(PY) setup.py -q build_ext --inplace --force
	$(PY) -c "from shadowgraft import native; assert native.available(), 'clang did not build the kernels'; print('widths', native.widths())" \
		&& $(PY) -m pytest -q tests/test_native.py tests/test_metrics.py tests/test_engine.py tests/test_diff.py tests/test_stats.py; \
		status=$$?; $(PY) setup.py -q build_ext --inplace --force; exit $$status

clean:
	rm -rf $(VENV) demo-out bench-out *.egg-info

# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Triton kernels run on the CPU through Triton's interpreter in the tests; on a machine with an
# NVIDIA GPU (nvidia-smi) they compile for it instead (the interpreted CPU tests then skip).
export TRITON_INTERPRET ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,1)

.PHONY: test demo install install-train bench wheels

# torch first, only when it does not import: the CI machines' registry serves 2.13.0 as the CPU
# build (a bare `torch` would pull a multi-GB CUDA build); elsewhere install the torch you want
# first and this line is skipped.
# The oldest Triton the kernels support and the GPU machine's (the release the launch table is
# tuned for), each installed apart (build/ is git-ignored) so that tests/test_triton_compile.py
# compiles every kernel with them as well as with the newest. (one folder per Python version:
# the compiled core fits one)
TRITON_OLDEST := 3.3.1
TRITON_GPU := 3.6.0
PYTAG := $(shell $(PYTHON) -c "import sys; print('py%d%d' % sys.version_info[:2])" 2>/dev/null)
export SPOT_TRITON_OLDEST ?= build/triton-$(TRITON_OLDEST)-$(PYTAG)
export SPOT_TRITON_GPU ?= build/triton-$(TRITON_GPU)-$(PYTAG)

# The oldest transformers the package supports (pyproject's `transformers>=` floor), installed
# apart with the hub, tokenizers and datasets of its day: the tests that touch transformers run a
# second time on it, so a change that breaks the floor fails here and not in a user's older setup.
TRANSFORMERS_OLDEST := 4.57.6
TRANSFORMERS_OLDEST_PINS := transformers==$(TRANSFORMERS_OLDEST) huggingface_hub==0.36.2 \
  tokenizers==0.22.2 datasets==4.8.5 httpx==0.28.1 httpcore==1.0.9
TRANSFORMERS_OLDEST_DIR := build/transformers-$(TRANSFORMERS_OLDEST)-$(PYTAG)
TRANSFORMERS_TESTS := tests/test_hf.py tests/test_spot_attention.py tests/test_spot_model.py \
  tests/test_spot_data.py tests/test_spot_train.py tests/test_spot_demo.py \
  tests/test_trl_interop.py tests/test_distributed.py tests/test_rectify_elicit.py \
  tests/test_rectify_filter.py tests/test_transformers_floor.py

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	SPOT_CUDA_ARCHS="$${SPOT_CUDA_ARCHS:-90}" $(PIP) install -q -e ".[dev]"  # one arch: ~4x faster nvcc
	@[ -f "$(SPOT_TRITON_OLDEST)/triton/__init__.py" ] || \
	  $(PIP) install -q --no-deps --target "$(SPOT_TRITON_OLDEST)" triton==$(TRITON_OLDEST)
	@[ -f "$(SPOT_TRITON_GPU)/triton/__init__.py" ] || \
	  $(PIP) install -q --no-deps --target "$(SPOT_TRITON_GPU)" triton==$(TRITON_GPU)
	@[ -f "$(TRANSFORMERS_OLDEST_DIR)/transformers/__init__.py" ] || \
	  $(PIP) install -q --no-deps --target "$(TRANSFORMERS_OLDEST_DIR)" $(TRANSFORMERS_OLDEST_PINS)

test: install
	$(PYTHON) -m pytest tests/ -q
	PYTHONPATH="$(CURDIR)/$(TRANSFORMERS_OLDEST_DIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
	  SPOT_TRANSFORMERS_OLDEST=$(TRANSFORMERS_OLDEST) $(PYTHON) -m pytest $(TRANSFORMERS_TESTS) -q

# the demo needs the package and its trainer extras only (no test tools, no second Triton);
# skipped when this checkout is already the installed one (-I: not found through the current
# folder) and the extras import
install-train:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PYTHON) -I -c "import sys, pathlib, spot, transformers, safetensors, tqdm, yaml, \
	  matplotlib; here = pathlib.Path('$(CURDIR)').resolve(); \
	  sys.exit(pathlib.Path(spot.__file__).resolve().parent.parent != here)" \
	  2>/dev/null || SPOT_CUDA_ARCHS="$${SPOT_CUDA_ARCHS:-90}" $(PIP) install -q -e ".[train]"

demo: install-train
	$(PYTHON) -m spot demo

bench: install
	$(PYTHON) -m pytest benchmarks/ -q

# Peers for benchmarks/gpu_suite.sh on a GPU machine without network: their wheels into the
# git-ignored wheels/ folder, which the suite installs first (without dependencies), for that
# machine's Python. trl's fused head imports trl.trainer.utils in its backward, which needs
# datasets (and its dill, multiprocess), missing from the GPU image. Pinned, so that runs on
# different days compare the same peers (the suite records their versions in ceilings.json).
WHEELS_PYTHON ?= 3.12
wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(WHEELS_PYTHON) -d wheels \
	  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
	  multiprocess==0.70.19

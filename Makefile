VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint fixtures clean

# One command: a virtual environment with CPU torch 2.13.0 and wurst with its test extras.
install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# Pinned first: an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"

# The whole suite, published-size parity included (the first run builds ~12 GB of random-weight checkpoints
# into ~/.cache/wurst/fixtures). pytest's exit code 5 ("no tests collected") is not a failure.
test: lint
	$(PY) -m pytest -m "slow or not slow"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The fast suite only (tiny fixtures), for the edit-test loop.
test-fast:
	$(PY) -m pytest -m "not slow"

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

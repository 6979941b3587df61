VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint demo bench clean

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

# Install check, offline: tiny random-weight checkpoints in the hub layout, one CLI run, one PNG. The image is
# noise-like (random weights); it shows that every stage loads and runs. Real images need the real weights.
demo:
	prior=$$($(PY) -m tools.hub_fixtures --size tiny --repo prior) && \
	decoder=$$($(PY) -m tools.hub_fixtures --size tiny --repo decoder) && \
	HF_HUB_OFFLINE=1 $(PY) -m wurst "Anthropomorphic cat dressed as a fire fighter" --prior "$$prior" \
		--decoder "$$decoder" --height 256 --width 256 --prior-steps 4 --decoder-steps 4 --seed 0 \
		--output install-check-random-weights.png --overwrite && \
	echo "install check passed: install-check-random-weights.png comes from random weights, not a real picture"

# wurst (its CPU default, low-memory, and resident) against diffusers on published-size random-weight checkpoints
# (builds ~12 GB of them on first use): 512x512 with 3 + 3 steps, then the default workload, 1024x1024 with the
# 29-step Stage C schedule and 12 Stage B steps, one run each (about half an hour on 2 cores).
bench:
	$(PY) tools/bench.py
	$(PY) tools/bench.py --default-workload

clean:
	rm -rf $(VENV) build *.egg-info

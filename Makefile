# make demo: the per-destination lab; make test: every test tier; make bench: docs/benchmarks.md. All set up first.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel test-container test-vm test-fresh image bench soak readme clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m lab.demo

test: setup
	$(PY) -m pytest tests -q -ra

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-kernel: setup
	$(PY) -m pytest tests/kernel -q -ra

test-container: setup
	$(PY) -m pytest tests/container -q -ra -s

# The sidecar/webhook image, with podman and no registry (see scripts/image.sh).
image: setup
	bash scripts/image.sh

# The daemon under probes and change churn, fds/RSS/classes/trie entries checked flat
# (make test runs 45 s of it); SHAPER_SOAK_S sets the length, 10 minutes by default.
soak: setup
	SHAPER_SOAK_S=$${SHAPER_SOAK_S:-600} $(PY) -m pytest tests/kernel/test_soak.py -q -ra -s

test-vm: setup
	$(PY) -m pytest tests/vm -q -ra -s

# Does setup install every program the code runs, on a fresh Debian 12 (debootstrap, cached)?
test-fresh: setup
	$(PY) -m pytest tests/fresh -q -ra -s

bench: setup
	$(PY) -m bench

# README.md's rule-field table, generated from shaper/core/fields.py (a unit test fails when it is stale).
readme: setup
	$(PY) scripts/readme_fields.py

clean:
	rm -rf .venv .venv-bench bench/results .pytest_cache *.egg-info

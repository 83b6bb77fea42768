# make demo: the per-destination lab; make test: every test tier; make bench: docs/benchmarks.md. All set up first.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel test-container test-vm test-fresh image bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m shaper.demo

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

test-vm: setup
	$(PY) -m pytest tests/vm -q -ra -s

# Does setup install every program the code runs, on a fresh Debian 12 (debootstrap, cached)?
test-fresh: setup
	$(PY) -m pytest tests/fresh -q -ra -s

bench: setup
	$(PY) -m bench

clean:
	rm -rf .venv .venv-bench bench/results .pytest_cache *.egg-info

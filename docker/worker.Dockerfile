# The GPU training worker: one Celery process that takes one job at a time from the train queue.
#   docker build -f docker/worker.Dockerfile -t sqakd-worker .
# Needs the NVIDIA Container Toolkit on the host (docker-compose.yml reserves the GPU).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The CUDA build: the default index's Linux wheel of this torch brings its own CUDA 13 libraries
# (nvidia-*-cu13), so the host driver must support CUDA 13 (the base image matches it). For
# another CUDA, set TORCH_INDEX_URL to that build's index and BASE_IMAGE to the same CUDA.
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SQAKD_DATA_DIR=/data \
    TRAIN_QUEUE=train

# gcc and the Python headers: torch.compile (the compile_model job option) builds its Triton
# launchers (CUDA) and C++ kernels (CPU) with them at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV"

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

WORKDIR /app
COPY . .
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /app sqakd \
    && mkdir -p /data && chown sqakd /data
USER sqakd

# One job at a time, in a fresh child each (GPU memory goes with it), as scripts/serve.py runs it.
CMD ["sh", "-c", "exec celery -A worker.app worker -Q \"$TRAIN_QUEUE\" --pool prefork --concurrency 1 --prefetch-multiplier 1 --max-tasks-per-child 1 --loglevel INFO"]

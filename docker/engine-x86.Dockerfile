# A TensorRT engine worker for an x86 NVIDIA GPU: one Celery process that takes the engine builds of
# one target from the queue engine.<ENGINE_TARGET> and builds each from the job's model_qdq.onnx on
# this GPU with TensorRT's Python API, one at a time.
#   docker build -f docker/engine-x86.Dockerfile -t sqakd-engine-x86 .
#   docker run --gpus all -e ENGINE_TARGET=x86-sm90 -e DATABASE_URL=... -e BROKER_URL=... \
#       -v artifacts:/data sqakd-engine-x86
# Like the training worker it uses the service's database, broker and artifact volume (mounted at
# SQAKD_DATA_DIR); docker-compose.yml's service environment is what it needs. An engine runs only
# on the GPU family and TensorRT version that built it: run one worker per kind of GPU and name its
# target after it (ENGINE_TARGET, e.g. x86-sm90 for an H100), as jobs do in export.tensorrt_targets.
# Needs the NVIDIA Container Toolkit on the host.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:24.08-py3
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# As in worker.Dockerfile: the default index's torch brings its own CUDA 13 libraries, so the host
# driver must support CUDA 13; for another CUDA, set TORCH_INDEX_URL to that build's index.
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SQAKD_DATA_DIR=/data \
    ENGINE_TARGET=

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV"

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# TensorRT's Python API for the venv's Python 3.11 (the image's own python3 is 3.10): the image
# ships a wheel per Python version in /opt/tensorrt/python, built on its TensorRT (24.08: 10.3.0).
# A base image without a cp311 wheel: `pip install tensorrt-cu12==<its TensorRT version>` instead
# (that brings its own copy of the libraries).
RUN pip install /opt/tensorrt/python/tensorrt-*-cp311-none-linux_x86_64.whl

WORKDIR /app
COPY . .
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /app sqakd \
    && mkdir -p /data && chown sqakd /data
USER sqakd

# One build at a time: TensorRT's builder takes the whole GPU while it tunes.
CMD ["sh", "-c", "exec celery -A worker.app worker -Q \"engine.${ENGINE_TARGET:?set ENGINE_TARGET, e.g. x86-sm90}\" --concurrency 1 --loglevel INFO"]

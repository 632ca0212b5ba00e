# The API: FastAPI under uvicorn. Migrates the database, then serves on 0.0.0.0:8000.
# Started through api/serve.py, which first refuses a keyless start (API_KEYS unset or '{}')
# on this non-loopback bind, and keys shorter than 32 characters.
# It imports torch to check uploaded models at upload time (CPU only); training runs elsewhere.
#   docker build -f docker/api.Dockerfile -t sqakd-api .
FROM python:3.11-slim

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The CPU build: the API never trains, and the default Linux wheel carries several GB of CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SQAKD_DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000

RUN pip install --index-url "$TORCH_INDEX_URL" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

WORKDIR /app
COPY . .
# Editable: core.db finds alembic.ini and migrations/ next to the package, in /app.
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /app sqakd \
    && mkdir -p /data && chown sqakd /data
USER sqakd

EXPOSE 8000
CMD ["python", "-m", "api.serve", "--migrate"]

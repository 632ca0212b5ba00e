# The TensorRT engine worker for a Jetson on JetPack 5 (Orin, Xavier): the device agent
# (worker/device_agent.py, the only file copied) on an L4T TensorRT image. It claims the engine
# builds of one target from the service over HTTP(S), builds each here with TensorRT's Python API
# and uploads the plan: the device needs no inbound connection, database or broker.
#   docker build -f docker/engine-jetson.Dockerfile -t sqakd-engine-jetson .    # on the Jetson
#   docker run --runtime nvidia --restart unless-stopped -e SQAKD_URL=https://your-server \
#       -e SQAKD_TARGET=jetson-orin-nano -e SQAKD_API_KEY=... sqakd-engine-jetson
# JetPack 4.6 devices (Jetson Nano: L4T R32, Python 3.6, TensorRT 8.2) run the same agent without
# Docker, on the system's Python and TensorRT: the rest of our stack needs Python 3.11, the agent
# only Python 3.6's standard library. Copy worker/device_agent.py over and run
#   python3 device_agent.py --url https://your-server --target jetson-nano --api-key ...
# The base image's L4T release must match the host's JetPack (r8.5.2: JetPack 5.1, L4T R35.2.1).
# If it lacks TensorRT's Python module, use its -devel tag, or run the agent with --builder trtexec
# (the agent finds /usr/src/tensorrt/bin/trtexec).
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-tensorrt:r8.5.2-runtime
FROM ${BASE_IMAGE}

# Set at `docker run`, read by the agent:
#   SQAKD_URL      the service's base URL, e.g. https://sqakd.example.com (required)
#   SQAKD_TARGET   the target this device builds, as jobs name it in export.tensorrt_targets,
#                  e.g. jetson-orin-nano (required); engines run only on the device family and
#                  TensorRT version that built them, so name one target per kind of device
#   SQAKD_API_KEY  a key the service accepts (its API_KEYS); unset for a service without keys.
#                  Pass it at run time: never bake it into the image.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SQAKD_URL= \
    SQAKD_TARGET=

# python3 is usually there already; the agent needs nothing else (standard library only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY worker/device_agent.py worker/device_agent.py
# The GPU's device nodes on a Jetson (/dev/nvhost-*, /dev/nvmap) belong to the group video.
RUN useradd --system --uid 10001 --groups video --home-dir /app sqakd
USER sqakd

CMD ["sh", "-c", "exec python3 worker/device_agent.py --url \"$SQAKD_URL\" --target \"$SQAKD_TARGET\" --builder tensorrt"]

#!/usr/bin/env python3
"""SQAKD device agent: builds a job's TensorRT engine on the device the engine is for.

A job that asks for ``"export": {"tensorrt_targets": ["jetson-nano"]}`` waits until something
that serves the target builds its engine. Devices that cannot run the service's Python 3.11
stack (a Jetson Nano: JetPack 4.6, Python 3.6, TensorRT 8.2), or that sit behind NAT, run this
script: it pulls work from the service over HTTP(S), so the device needs no inbound connection.
In a loop it

1. claims a waiting build for ``--target`` (``POST /v1/engine-builds/claim``), which hands it
   a lease token,
2. downloads the job's ``model_qdq.onnx``,
3. builds an int8+fp16 engine with ``trtexec`` or TensorRT's Python API, renewing the build's
   lease (``POST /v1/engine-builds/{id}/lease``) from a thread meanwhile, so that a slow build
   is not handed to a second builder,
4. uploads the plan and a report (TensorRT version, device, compute capability, JetPack/L4T,
   build flags, timings) to ``/v1/engine-builds/{id}/result``, or the error to ``/failure``.

Renewals, result and failure carry the claim's token (header ``X-Lease-Token``): the server
takes them from the builder that claimed the build only.

On a Jetson, copy this one file over and run:

    python3 device_agent.py --url https://your-server --target jetson-nano --api-key KEY

It is standard-library-only Python 3.6 (plus JetPack's ``tensorrt`` module or ``trtexec``
binary) and imports nothing from the SQAKD project. ``--once`` claims once and exits.
"""

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid

LOG = logging.getLogger("device_agent")
PRECISION = "int8+fp16"
LEASE_TOKEN_HEADER = "X-Lease-Token"
ERROR_CHARS = 2000  # the most of a builder's output that a failure report carries
TRTEXEC_JETSON = "/usr/src/tensorrt/bin/trtexec"  # where JetPack installs it, outside PATH
# Jetson GPUs by SoC (/proc/device-tree/compatible): JetPack 4 and 5 have no nvidia-smi.
TEGRA_COMPUTE_CAPABILITY = {
    "tegra210": "5.3",
    "tegra186": "6.2",
    "tegra194": "7.2",
    "tegra234": "8.7",
}
# JetPack releases by L4T release, for when the nvidia-jetpack package is absent (containers).
JETPACK_BY_L4T = {
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2",
    "35.5.0": "5.1.3", "35.6.0": "5.1.4", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2",
}  # fmt: skip


class BuildError(Exception):
    """The engine could not be built; the message is the end of the builder's output."""


class ApiError(Exception):
    """The server answered with an HTTP error (``{"error": {"code", "message"}}``)."""

    def __init__(self, status, code, message):
        Exception.__init__(self, f"HTTP {status} {code}: {message}")
        self.status = status


class Server:
    """The SQAKD API at ``base_url``, with the API key if one is given."""

    def __init__(self, base_url, api_key=None, timeout=120):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def open(self, path, body=None, content_type=None, extra_headers=None):
        """GET ``path`` (POST ``body`` if given); return the response, raise ApiError on 4xx/5xx."""
        url = path if "://" in path else self.base_url + "/" + path.lstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "sqakd-device-agent"}
        headers.update(extra_headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        method = "GET" if body is None else "POST"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        if self.api_key:
            # Not sent on after a redirect: a download may answer 307 to a presigned URL of
            # the service's bucket, which must not see the key (and refuses a second auth).
            request.add_unredirected_header("Authorization", "Bearer " + self.api_key)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                error = json.loads(text)["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", text[:200]
            raise ApiError(exc.code, code, message) from None

    def post(self, path, body, content_type, extra_headers=None):
        """POST and return the decoded JSON answer (None for an empty one, such as 204)."""
        with self.open(path, body, content_type, extra_headers) as response:
            data = response.read()
        return json.loads(data.decode("utf-8")) if data else None

    def post_json(self, path, payload, extra_headers=None):
        """POST ``payload`` as JSON and return the decoded answer."""
        body = json.dumps(payload).encode("utf-8")
        return self.post(path, body, "application/json", extra_headers)

    def download(self, path, destination):
        """Save the file at ``path`` to ``destination``."""
        with self.open(path) as response, open(destination, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)


def encode_multipart(fields, files):
    """A ``multipart/form-data`` body of text ``fields`` ({name: str}) and ``files``
    ({name: (filename, bytes)}); returns (content type, body)."""
    boundary = "sqakd-" + uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        chunks += [head.encode("utf-8"), value.encode("utf-8"), b"\r\n"]
    for name, (filename, content) in files.items():
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        chunks += [head.encode("utf-8"), content, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return "multipart/form-data; boundary=" + boundary, b"".join(chunks)


def tail(text, limit=ERROR_CHARS):
    """The last whole lines of ``text`` that fit in ``limit`` characters."""
    text = text.strip()
    if len(text) <= limit:
        return text
    text = text[-limit:]
    return text[text.find("\n") + 1 :] if "\n" in text[:-1] else text


def error_message(headline, output):
    """``headline`` and the end of the builder's ``output``, in ERROR_CHARS at most."""
    return headline + "\n" + tail(output, ERROR_CHARS - len(headline) - 1)


def version_from_number(number):
    """``8.2.1`` from trtexec's ``[TensorRT v8201]`` (``10.3.0`` from ``v100300``)."""
    major_unit = 10000 if number >= 100000 else 1000
    return f"{number // major_unit}.{number % major_unit // 100}.{number % 100}"


def parse_trtexec_output(text):
    """TensorRT version, device, compute capability and mean GPU compute time (ms) from
    trtexec's output; None for what it does not say."""
    found = {"tensorrt_version": None, "device_name": None, "compute_capability": None}
    version = re.search(r"TensorRT version:\s*([\d.]+)", text)
    if version:
        value = version.group(1).strip(".")
        found["tensorrt_version"] = value if "." in value else version_from_number(int(value))
    else:
        number = re.search(r"\[TensorRT v(\d+)\]", text)
        if number:
            found["tensorrt_version"] = version_from_number(int(number.group(1)))
    device = re.search(r"Selected Device:\s*(.+)", text)
    if device:
        found["device_name"] = device.group(1).strip()
    capability = re.search(r"Compute Capability:\s*(\d+\.\d+)", text)
    if capability:
        found["compute_capability"] = capability.group(1)
    means = re.findall(r"GPU Compute Time:.*?\bmean\s*[=:]\s*([\d.]+)\s*ms", text)
    found["gpu_compute_mean_ms"] = float(means[-1]) if means else None
    return found


def parse_nv_tegra_release(text):
    """The L4T release, ``32.7.1`` from ``# R32 (release), REVISION: 7.1, GCID: ...``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return match.group(1) + "." + match.group(2).strip(".") if match else None


def read_text(path):
    """The file's text, or None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def command_output(command):
    """stdout of ``command`` when it exits 0, else None (missing programs included)."""
    try:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def detect_device():
    """Name, compute capability, JetPack and L4T releases of this machine (None if unknown)."""
    device = {"device_name": None, "compute_capability": None, "jetpack": None, "l4t": None}
    compatible = (read_text("/proc/device-tree/compatible") or "").split("\x00")
    socs = [entry.split(",")[-1] for entry in compatible if "tegra" in entry]
    if socs:  # a Jetson
        device["device_name"] = (read_text("/proc/device-tree/model") or "").strip("\x00 \n")
        known = [TEGRA_COMPUTE_CAPABILITY[soc] for soc in socs if soc in TEGRA_COMPUTE_CAPABILITY]
        device["compute_capability"] = known[0] if known else None
    else:
        query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        lines = (command_output(query) or "").strip().splitlines()
        if lines and "," in lines[0]:
            name, capability = lines[0].rsplit(",", 1)
            device["device_name"], device["compute_capability"] = name.strip(), capability.strip()
    device["l4t"] = parse_nv_tegra_release(read_text("/etc/nv_tegra_release") or "")
    jetpack = command_output(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]) or ""
    match = re.match(r"\d+(\.\d+)*", jetpack.strip())
    device["jetpack"] = match.group(0) if match else JETPACK_BY_L4T.get(device["l4t"])
    return device


def profile_flags(shapes, max_batch):
    """trtexec's profile flags for ``--shapes name:NxCxHxW[,...]``: batch 1 to ``max_batch``,
    tuned for the given shape."""
    low, high = [], []
    for spec in shapes.split(","):
        name, _, dims = spec.rpartition(":")
        sample = dims.split("x", 1)[1]
        low.append(f"{name}:1x{sample}")
        high.append(f"{name}:{max_batch}x{sample}")
    return [
        "--minShapes=" + ",".join(low),
        "--optShapes=" + shapes,
        "--maxShapes=" + ",".join(high),
    ]


def build_with_trtexec(options, onnx_path, engine_path):
    """Build (and time) the engine with the trtexec binary; raise BuildError on failure."""
    flags = ["--int8", "--fp16"] + list(options.trtexec_arg)
    if options.shapes:
        flags += profile_flags(options.shapes, options.max_batch)
    command = [options.trtexec, "--onnx=" + onnx_path, "--saveEngine=" + engine_path] + flags
    LOG.info("running %s", " ".join(command))
    started = time.time()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0 or not os.path.exists(engine_path):
        raise BuildError(error_message(f"trtexec exited with {done.returncode}:", output))
    found = parse_trtexec_output(output)
    timings = {"build_seconds": round(time.time() - started, 3)}  # the timing runs included
    mean_ms = found.pop("gpu_compute_mean_ms")
    if mean_ms is not None:
        timings["gpu_compute_mean_ms"] = mean_ms
    found.update(builder="trtexec", build_flags=flags, timings=timings)
    return found


def build_with_tensorrt(options, onnx_path, engine_path):
    """Build the engine with TensorRT's Python API; raise BuildError on failure."""
    import tensorrt as trt

    class CollectingLogger(trt.ILogger):
        """Logs TensorRT's warnings and errors and keeps them for a failure report."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                LOG.warning("TensorRT: %s", msg)
                self.lines.append(str(msg))

    logger = CollectingLogger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as model_file:
        if not parser.parse(model_file.read()):
            errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
            raise BuildError(error_message("cannot parse the ONNX model:", "\n".join(errors)))
    config = builder.create_builder_config()
    workspace = options.workspace_mib << 20
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT 8.4 and later
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:
        config.max_workspace_size = workspace
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    flags = ["INT8", "FP16", f"workspace={options.workspace_mib}MiB"]
    profile, dynamic = builder.create_optimization_profile(), False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if -1 in shape[1:]:
            raise BuildError(f"input {tensor.name} {shape}: only the batch may be dynamic")
        if shape[0] == -1:
            sample = tuple(shape[1:])
            batches = (1,) + sample, (1,) + sample, (options.max_batch,) + sample
            profile.set_shape(tensor.name, *batches)
            dynamic = True
            flags.append(f"profile {tensor.name}: batch 1 (opt 1) to {options.max_batch}")
    if dynamic:
        config.add_optimization_profile(profile)
    started = time.time()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.time() - started
    if serialized is None:
        raise BuildError(error_message("TensorRT built no engine:", "\n".join(logger.lines)))
    with open(engine_path, "wb") as engine_file:
        engine_file.write(serialized)
    return {
        "tensorrt_version": trt.__version__,
        "builder": "tensorrt-python",
        "build_flags": flags,
        "timings": {"build_seconds": round(seconds, 3)},
    }


class LeaseKeeper:
    """Renews a claimed build's lease from a thread every ``interval`` seconds, inside a
    ``with`` block. ``lost`` is set once the server says the claim is over (the build finished,
    or its lease expired and another builder took it); network errors are retried."""

    def __init__(self, server, build_id, lease_headers, interval):
        self.server = server
        self.path = f"/v1/engine-builds/{build_id}/lease"
        self.lease_headers = lease_headers
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease-" + build_id)
        self._thread.daemon = True  # never keeps the agent alive on its own

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        return False

    def _renew(self):
        while not self._stop.wait(self.interval):
            try:
                self.server.post(self.path, b"", None, self.lease_headers)
            except ApiError as exc:
                if exc.status in (404, 409):
                    LOG.error("the lease is lost (%s): the build is no longer ours", exc)
                    self.lost.set()
                    return
                LOG.warning("lease renewal failed (retrying): %s", exc)
            except OSError as exc:  # network errors, urllib's URLError included
                LOG.warning("lease renewal failed (retrying): %s", exc)


def upload_result(server, build_id, engine_path, report, lease_headers, attempts=3):
    """Send the plan and its report; retry network errors a few times (not HTTP errors)."""
    with open(engine_path, "rb") as engine_file:
        files = {"engine": ("engine.plan", engine_file.read())}
    content_type, body = encode_multipart({"report": json.dumps(report)}, files)
    path = f"/v1/engine-builds/{build_id}/result"
    for attempt in range(1, attempts + 1):
        try:
            return server.post(path, body, content_type, lease_headers)
        except OSError as exc:  # network errors (urllib's URLError included), not ApiError
            if attempt == attempts:
                raise
            LOG.warning("upload of build %s failed (%s); retrying", build_id, exc)
            time.sleep(10 * attempt)


def handle_claim(server, claim, options, provenance):
    """Download, build and upload one claimed build, renewing its lease meanwhile; report a
    failed build to the server. ``provenance``: this machine's TensorRT version, device,
    JetPack and L4T."""
    build_id = claim["build"]["id"]
    failure_path = f"/v1/engine-builds/{build_id}/failure"
    lease_headers = {LEASE_TOKEN_HEADER: claim["lease_token"]}
    renew_seconds = options.renew_seconds or claim["lease_seconds"] / 4.0
    LOG.info("claimed build %s of job %s", build_id, claim["build"].get("job_id"))
    workdir = tempfile.mkdtemp(prefix="sqakd-engine-")
    try:
        with LeaseKeeper(server, build_id, lease_headers, renew_seconds) as lease:
            onnx_path = os.path.join(workdir, "model.onnx")
            engine_path = os.path.join(workdir, "engine.plan")
            try:
                server.download(claim["model_url"], onnx_path)
            except ApiError as exc:  # the server refuses it: it will not come later either
                if exc.status >= 500:
                    raise
                message = f"cannot download {claim['model_url']}: {exc}"
                payload = {"code": "build_failed", "message": message}
                server.post_json(failure_path, payload, lease_headers)
                return
            try:
                if options.builder == "tensorrt":
                    built = build_with_tensorrt(options, onnx_path, engine_path)
                else:
                    built = build_with_trtexec(options, onnx_path, engine_path)
            except Exception as exc:
                message = str(exc) if isinstance(exc, BuildError) else tail(traceback.format_exc())
                LOG.error("build %s failed: %s", build_id, message)
                payload = {"code": "build_failed", "message": message}
                server.post_json(failure_path, payload, lease_headers)
                return
            if lease.lost.is_set():
                LOG.error("build %s: lease lost while building; not uploading", build_id)
                return
            report = dict(provenance, precision=PRECISION)
            for key, value in built.items():  # what this machine says first, then the builder
                if report.get(key) is None:
                    report[key] = value
            upload_result(server, build_id, engine_path, report, lease_headers)
        LOG.info("build %s uploaded: %s", build_id, report["timings"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv):
    """Command-line options; the URL, target and key default to SQAKD_URL, _TARGET, _API_KEY."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    environ = os.environ.get
    parser.add_argument("--url", default=environ("SQAKD_URL"), help="e.g. http://server:8000")
    parser.add_argument("--target", default=environ("SQAKD_TARGET"), help="e.g. jetson-nano")
    parser.add_argument("--api-key", default=environ("SQAKD_API_KEY"))
    parser.add_argument("--agent", default=platform.node() + " device_agent")
    parser.add_argument("--builder", choices=["auto", "trtexec", "tensorrt"], default="auto")
    parser.add_argument("--trtexec", default="trtexec", help="the trtexec binary")
    parser.add_argument(
        "--trtexec-arg", action="append", default=[], help="e.g. --trtexec-arg=--workspace=1024"
    )
    parser.add_argument("--shapes", help="trtexec profile, e.g. input:1x3x224x224")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--workspace-mib", type=int, default=1024, help="Python API builder")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument(
        "--renew-seconds",
        type=float,
        help="renew a build's lease this often (default: a quarter of the lease granted)",
    )
    parser.add_argument("--once", action="store_true", help="claim once, then exit")
    options = parser.parse_args(argv)
    if not options.url or not options.target:
        parser.error("--url and --target (or SQAKD_URL and SQAKD_TARGET) are required")
    return options


def choose_builder(options):
    """Resolve ``--builder auto`` and the trtexec path; return the TensorRT version (or None)."""
    if options.builder in ("auto", "tensorrt"):
        try:
            import tensorrt

            options.builder = "tensorrt"
            return tensorrt.__version__
        except ImportError:
            if options.builder == "tensorrt":
                raise SystemExit("--builder tensorrt: no tensorrt module") from None
    options.builder = "trtexec"
    found = shutil.which(options.trtexec)
    if not found and options.trtexec == "trtexec" and os.path.exists(TRTEXEC_JETSON):
        found = TRTEXEC_JETSON
    if not found:
        raise SystemExit(f"no tensorrt module and no {options.trtexec} binary")
    options.trtexec = found
    probe = subprocess.run(
        [found, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60
    )
    return parse_trtexec_output(probe.stdout.decode("utf-8", "replace"))["tensorrt_version"]


def main(argv=None):
    """Claim, build and upload engines until stopped (or once, with ``--once``)."""
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    provenance = dict(detect_device(), tensorrt_version=choose_builder(options))
    claim_body = {
        "target": options.target,
        "agent": options.agent,
        "tensorrt_version": provenance["tensorrt_version"],
        "device": dict(provenance, machine=platform.machine(), builder=options.builder),
    }
    LOG.info("serving %s from %s: %s", options.target, options.url, claim_body)
    server = Server(options.url, options.api_key)
    while True:
        claim, failed = None, False
        try:
            claim = server.post_json("/v1/engine-builds/claim", claim_body)
            if claim:
                handle_claim(server, claim, options, provenance)
        except (ApiError, OSError) as exc:  # OSError: urllib's URLError, timeouts
            failed = True
            LOG.error("server error (retrying at the next poll): %s", exc)
        except Exception:
            failed = True
            LOG.exception("unexpected error (retrying at the next poll)")
        if options.once:
            return 1 if failed else 0
        if not claim or failed:
            time.sleep(options.poll_seconds)


if __name__ == "__main__":
    raise SystemExit(main())

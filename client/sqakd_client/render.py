"""How the SDK and the ``sqakd`` command line show things to a person: numbers with their
units, and rich tables of jobs, metrics, artifacts, events and sweeps, built from the API's JSON
(``.data``).

Only formatting lives here; ``sqakd_client.cli`` decides what to show and when. Every function
takes plain dicts, so the tables read the same fields a ``--json`` user sees.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

MISSING = "-"
SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
EVENT_SUMMARY_CHARS = 200  # a metrics event with its learning rates and probe fits on one line


# Numbers ----------------------------------------------------------------------------------------


def size_text(size: Optional[float]) -> str:
    """Bytes in binary units: ``512 B``, ``13.8 KiB``, ``1.2 MiB``."""
    if size is None:
        return MISSING
    value, unit = float(size), SIZE_UNITS[0]
    for unit in SIZE_UNITS:
        if abs(value) < 1024 or unit == SIZE_UNITS[-1]:
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def percent(fraction: Optional[float]) -> str:
    return MISSING if fraction is None else f"{100 * fraction:.1f}%"


def seconds_text(seconds: Optional[float]) -> str:
    """``0.4 s``, ``12.0 s``, ``2 min 05 s``, ``1 h 03 min``."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    """An API timestamp as an aware UTC datetime (Python 3.8's fromisoformat takes no ``Z``)."""
    if not value:
        return None
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:  # the API's timestamps are UTC
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc)


def between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    """Seconds from ``start`` to ``end`` (now when ``end`` is None)."""
    began = parse_time(start)
    if began is None:
        return None
    ended = parse_time(end) or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (ended - began).total_seconds())


def time_text(value: Optional[str]) -> str:
    """``2026-12-06 09:00:04 UTC (3 min 05 s ago)``."""
    moment = parse_time(value)
    if moment is None:
        return MISSING
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({age_text(value)})"


def age_text(created_at: Optional[str]) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``: how old, roughly."""
    seconds = between(created_at, None)
    if seconds is None:
        return MISSING
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def compact_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    if value is None:
        return "null"
    return json.dumps(value, separators=(",", ":"))


def flatten(data: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    """Nested dicts as dotted keys: ``{"probe": {"kl": 0.1}}`` -> ``[("probe.kl", 0.1)]``."""
    pairs: List[Tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            pairs.extend(flatten(value, f"{name}."))
        else:
            pairs.append((name, value))
    return pairs


# Jobs -------------------------------------------------------------------------------------------


def config_text(config: Optional[Mapping[str, Any]], length: bool = True) -> str:
    """``W4A4 lsq, 12 steps``: what a person compares jobs by (``length``: the steps or
    epochs)."""
    config = config or {}
    text = f"W{config.get('weight_bits', '?')}A{config.get('activation_bits', '?')}"
    if config.get("method"):
        text += f" {config['method']}"
    if not length:
        return text
    if config.get("steps"):
        text += f", {config['steps']} steps"
    elif config.get("epochs"):
        text += f", {config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}"
    return text


def status_text(job: Mapping[str, Any]) -> str:
    """``succeeded``; ``running: training 40/66``; ``failed: bad_image``."""
    status = str(job.get("status"))
    if status == "running" and job.get("stage"):
        progress = job.get("progress") or {}
        step, total = progress.get("step"), progress.get("total_steps")
        where = f" {step}/{total}" if step is not None and total else ""
        return f"{status}: {job['stage']}{where}"
    error = job.get("error") or {}
    if error.get("code"):
        return f"{status}: {error['code']}"
    return status


def job_duration(job: Mapping[str, Any]) -> Optional[float]:
    return between(job.get("started_at"), job.get("finished_at"))


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=36)  # cut the others on a narrow terminal
    for header in ("status", "config"):
        table.add_column(header, no_wrap=True)
    for header in ("agree", "top-1", "packed", "age", "took"):
        table.add_column(header, justify="right", no_wrap=True)
    for job in jobs:
        metrics = job.get("metrics") or {}
        table.add_row(
            str(job["id"]),
            status_text(job),
            config_text(job.get("config"), length=False),
            percent(metrics.get("agreement")),
            percent(metrics.get("student_top1")),
            size_text(metrics.get("packed_bytes")),
            age_text(job.get("created_at")),
            seconds_text(job_duration(job)),
        )
    return table


def key_value_table(rows: Sequence[Tuple[str, str]], title: Optional[str] = None) -> Table:
    table = Table(box=None, pad_edge=False, show_header=False, title=title, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, value)
    return table


def job_table(job: Mapping[str, Any]) -> Table:
    """One job at a glance: status, configuration, where its time went, its error."""
    progress = job.get("progress") or {}
    stages = job.get("stage_seconds") or {}
    rows = [
        ("id", str(job["id"])),
        ("status", status_text(job)),
        ("config", config_text(job.get("config"))),
    ]
    if job.get("status") == "running" and progress:
        rows.append(("progress", progress_text(progress)))
    if job.get("metadata"):
        rows.append(("metadata", compact_value(job["metadata"])))
    if job.get("sweep_id"):
        rows.append(("sweep", str(job["sweep_id"])))
    rows += [
        ("created", time_text(job.get("created_at"))),
        ("took", seconds_text(job_duration(job))),
    ]
    if stages:
        rows.append(
            ("stages", ", ".join(f"{name} {seconds_text(sec)}" for name, sec in stages.items()))
        )
    error = job.get("error")
    if error:
        rows.append(("error", f"{error.get('code')}: {error.get('message')}"))
    return key_value_table(rows)


def progress_text(progress: Mapping[str, Any]) -> str:
    parts = [f"step {progress.get('step')}/{progress.get('total_steps')}"]
    if progress.get("epochs"):
        parts.append(f"epoch {progress.get('epoch')}/{progress['epochs']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {seconds_text(progress['eta_seconds'])}")
    return ", ".join(parts)


# Metrics ----------------------------------------------------------------------------------------


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def kl_text(value: Any) -> str:
    number = _number(value)
    if number is None:
        return MISSING
    return f"{number:.4f}" if number >= 1e-3 or number == 0 else f"{number:.1e}"


def metrics_table(metrics: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None) -> Group:
    """A succeeded job's ``metrics`` (README, Artifacts and metrics): the scores trained against
    calibrated, then sizes, training speed, ONNX parity, the TensorRT rule check, CPU latency."""
    calibrated = metrics.get("calibrated") or {}
    source = "held-out" if metrics.get("eval_source") == "held_out" else "eval_data"
    title = f"metrics ({metrics.get('eval_images')} {source} images, {config_text(config)})"
    scores = Table(box=None, pad_edge=False)
    scores.add_column("", no_wrap=True)
    scores.add_column("trained", justify="right", no_wrap=True)
    scores.add_column("calibrated", justify="right", no_wrap=True)
    for key, name, shown in (
        ("agreement", "teacher/student agreement", percent),
        ("kl", "KL(teacher || student)", kl_text),
        ("teacher_top1", "teacher top-1", percent),
        ("student_top1", "student top-1", percent),
    ):
        scores.add_row(name, shown(metrics.get(key)), shown(calibrated.get(key)))
    return Group(Text(title, style="bold"), scores, key_value_table(_outcome_rows(metrics)))


def _outcome_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, str]]:
    rows: List[Tuple[str, str]] = []
    fp32, packed = metrics.get("fp32_bytes"), metrics.get("packed_bytes")
    if fp32 and packed:
        sizes = f"{size_text(fp32)} -> {size_text(packed)} ({fp32 / packed:.1f}x smaller)"
        rows.append(("size fp32 -> packed", sizes))
    if metrics.get("int_checkpoint_bytes"):
        rows.append(("model_int.safetensors", size_text(metrics["int_checkpoint_bytes"])))
    train = metrics.get("train") or {}
    if train.get("images_per_second") is not None:
        rows.append(
            (
                "training",
                f"{train['images_per_second']:,.0f} images/s, {train.get('steps')} steps "
                f"in {seconds_text(train.get('seconds'))}",
            )
        )
    parity = metrics.get("onnx_parity")
    if parity:
        rows.append(
            (
                "ONNX parity (model_qdq.onnx)",
                f"{percent(parity.get('top1_agreement'))} same top-1, max |logit diff| "
                f"{parity.get('max_abs_diff', 0):.1e} ({parity.get('images')} images)",
            )
        )
    rules = metrics.get("tensorrt_rules")
    if rules:
        rows.append(("TensorRT rules", _rules_text(rules)))
    latency = _cpu_latency_text(metrics.get("inference"))
    if latency:
        rows.append(("CPU latency, batch 1 (OpenVINO)", latency))
    for warning in metrics.get("warnings") or []:
        rows.append(("warning", f"{warning.get('code')}: {warning.get('message')}"))
    return rows


def _rules_text(rules: Mapping[str, Any]) -> str:
    if rules.get("follows_rules"):
        return "follows them (0 violations)"
    violations = rules.get("violations") or [{}]
    first = violations[0]
    return (
        f"{rules.get('violation_count')} violations, first: {first.get('rule')} at "
        f"{first.get('node')}"
    )


def _cpu_latency_text(inference: Any) -> Optional[str]:
    """Float upload against ``model_qdq_cpu.onnx`` at batch 1 under OpenVINO, if measured."""
    openvino = inference.get("openvino") if isinstance(inference, Mapping) else None
    if not isinstance(openvino, Mapping):
        return None
    float_ms = _number((openvino.get("float_ms") or {}).get("1"))
    int8_ms = _number((openvino.get("qdq_cpu_ms") or {}).get("1"))
    if float_ms is None or int8_ms is None:
        return None
    return f"fp32 {float_ms:.2f} ms -> int8 {int8_ms:.2f} ms ({float_ms / int8_ms:.2f}x)"


# Files, events, sweeps --------------------------------------------------------------------------


def artifacts_table(artifacts: Iterable[Mapping[str, Any]]) -> Table:
    """Artifacts (the API's listing, or the files downloaded) with their size and sha256."""
    table = Table(box=None, pad_edge=False)
    table.add_column("artifact", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    for artifact in artifacts:
        name, size = str(artifact.get("name")), size_text(artifact.get("size"))
        table.add_row(name, size, str(artifact.get("sha256")))
    return table


def event_line(event_id: int, event_type: str, data: Mapping[str, Any], created_at: str) -> str:
    """``  7  09:00:04  stage     calibrating previous=validating previous_seconds=0.5``: the
    field named like the type (status, stage) comes first and bare; nulls are left out."""
    pairs = [(key, value) for key, value in flatten(data) if value is not None]
    lead = [compact_value(value) for key, value in pairs if key == event_type]
    rest = [f"{key}={compact_value(value)}" for key, value in pairs if key != event_type]
    summary = " ".join(lead + rest)
    if len(summary) > EVENT_SUMMARY_CHARS:
        summary = summary[: EVENT_SUMMARY_CHARS - 3] + "..."
    moment = parse_time(created_at)
    clock = moment.strftime("%H:%M:%S") if moment else MISSING
    return f"{event_id:>4}  {clock}  {event_type:<8}  {summary}"


def sweep_table(sweep: Mapping[str, Any]) -> Table:
    """One row per job, the Pareto front starred, the recommended job marked."""
    metric = metric_label(sweep.get("pareto_metric"))
    recommended = sweep.get("recommended_job_id")
    counts = ", ".join(f"{n} {status}" for status, n in (sweep.get("counts") or {}).items() if n)
    title = f"sweep {sweep.get('id')}: {sweep.get('status')} ({counts}); front on {metric}"
    table = Table(box=None, pad_edge=False, title=title, title_justify="left")
    table.add_column("", no_wrap=True)  # "*": on the Pareto front
    table.add_column("config", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for header in ("agreement", "top-1", "packed", "CPU int8"):  # int8: batch 1, OpenVINO
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("job", no_wrap=True)
    table.add_column("", no_wrap=True)
    for row in sweep.get("rows") or []:
        latency = _number(row.get("int8_latency_ms"))
        error = row.get("error") or {}
        status = str(row.get("status"))
        table.add_row(
            "*" if row.get("pareto") else "",
            str(row.get("label")),
            f"{status}: {error['code']}" if error.get("code") else status,
            percent(row.get("agreement")),
            percent(row.get("student_top1")),
            size_text(row.get("packed_bytes")),
            MISSING if latency is None else f"{latency:.2f} ms",
            str(row.get("job_id")),
            "<- recommended" if recommended and row.get("job_id") == recommended else "",
        )
    return table


def as_text(renderable: RenderableType, width: int = 200) -> str:
    """A table as plain text (no colour), each line without trailing spaces."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, markup=False, highlight=False, color_system=None).print(
        renderable
    )
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def metric_label(pareto_metric: Optional[str]) -> str:
    """The accuracy a sweep's front is on, as its table's column names it."""
    return "top-1" if pareto_metric == "student_top1" else "agreement"


def recommended_row(sweep: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    recommended = sweep.get("recommended_job_id")
    for row in sweep.get("rows") or []:
        if recommended and row.get("job_id") == recommended:
            return dict(row)
    return None

"""A sweep's jobs as a table: one row per job with its swept values and metrics, the Pareto
front of packed size against accuracy, and the recommended row. It reads rows; it writes none.

``core.sweeps`` builds the table for the API's answers and the report, and ``core.sweep_report``
draws it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.jobs import JobStatus
from core.models import Job, Sweep

BITS_KEYS = ("weight_bits", "activation_bits", "method")  # what a label always shows
# The recommendation: the smallest front point within this much accuracy of the best one.
RECOMMEND_WITHIN = 0.01


def lookup(config: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of ``config``; None where it has none."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def swept_keys(request: Mapping[str, Any]) -> list[str]:
    """The config fields a sweep chose per job: its grid's keys, or each configuration's
    top-level keys, in order of first appearance."""
    if request.get("grid"):
        return list(request["grid"])
    keys: dict[str, None] = {}
    for config in request.get("configs") or []:
        keys.update(dict.fromkeys(config))
    return list(keys)


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def label(config: Mapping[str, Any], swept: Mapping[str, Any]) -> str:
    """A configuration's short name: "W4A4 lsq", then any other swept value ("epochs=3")."""
    parts = [
        f"W{config.get('weight_bits', '?')}A{config.get('activation_bits', '?')}",
        str(config.get("method", "?")),
    ]
    parts += [
        f"{key.rsplit('.', 1)[-1]}={_value_text(value)}"
        for key, value in swept.items()
        if key not in BITS_KEYS
    ]
    text = " ".join(parts)
    return text if len(text) <= 60 else text[:59] + "…"


@dataclass
class SweepRow:
    job_id: str
    label: str
    config: dict[str, Any]  # the swept values of this job
    status: str
    agreement: float | None = None
    student_top1: float | None = None
    packed_bytes: int | None = None
    int8_latency_ms: float | None = None
    error: dict[str, str] | None = None
    pareto: bool = False

    def accuracy(self, metric: str) -> float | None:
        value = getattr(self, metric)
        return None if value is None else float(value)


@dataclass
class SweepTable:
    status: str  # running | completed | canceled
    counts: dict[str, int]
    rows: list[SweepRow]
    pareto_metric: str  # student_top1 or agreement
    recommended: SweepRow | None = None

    @property
    def final(self) -> bool:
        return self.counts[JobStatus.QUEUED] == 0 and self.counts[JobStatus.RUNNING] == 0


def int8_latency_ms(metrics: Mapping[str, Any]) -> float | None:
    """Milliseconds per image of ``model_qdq_cpu.onnx`` at batch 1 under OpenVINO on the
    worker's CPU (``metrics.inference``): OpenVINO fuses Q/DQ into int8 kernels as TensorRT
    does, where ONNX Runtime's CPU int8 kernels are often slower than its float ones."""
    inference = metrics.get("inference")
    if not isinstance(inference, Mapping):
        return None
    ms = lookup(inference, "openvino.qdq_cpu_ms")
    value = ms.get("1") if isinstance(ms, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def row_of(job: Job, keys: Sequence[str]) -> SweepRow:
    swept = {key: lookup(job.config, key) for key in keys}
    metrics = job.metrics or {}
    packed = metrics.get("packed_bytes")
    return SweepRow(
        job_id=job.id,
        label=label(job.config, swept),
        config=swept,
        status=job.status,
        agreement=_number(metrics.get("agreement")),
        student_top1=_number(metrics.get("student_top1")),
        packed_bytes=int(packed) if _number(packed) is not None else None,
        int8_latency_ms=int8_latency_ms(metrics),
        error=job.error,
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the (size, accuracy) points no other point beats: smaller-or-equal size and
    greater-or-equal accuracy, strictly better in one. Equal points are all on the front."""

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return {i for i, point in enumerate(points) if not any(beats(other, point) for other in points)}


def comparable(rows: Iterable[SweepRow], metric: str) -> list[SweepRow]:
    """Succeeded rows with a size and an accuracy: the ones on the plot."""
    return [
        row
        for row in rows
        if row.status == JobStatus.SUCCEEDED
        and row.packed_bytes is not None
        and row.accuracy(metric) is not None
    ]


def pareto_metric(rows: Sequence[SweepRow]) -> str:
    """student_top1 where every succeeded row has it (labels existed), else agreement."""
    succeeded = [row for row in rows if row.status == JobStatus.SUCCEEDED]
    if succeeded and all(row.student_top1 is not None for row in succeeded):
        return "student_top1"
    return "agreement"


def recommend(rows: Sequence[SweepRow], metric: str) -> SweepRow | None:
    """The smallest front row within ``RECOMMEND_WITHIN`` of the best accuracy."""
    front = [row for row in rows if row.pareto]
    if not front:
        return None
    best = max(row.accuracy(metric) or 0.0 for row in front)
    near = [row for row in front if (row.accuracy(metric) or 0.0) >= best - RECOMMEND_WITHIN]
    return min(near, key=lambda row: (row.packed_bytes or 0, -(row.accuracy(metric) or 0.0)))


def build_table(
    rows: list[SweepRow], *, cancel_requested: bool = False, counts: dict[str, int] | None = None
) -> SweepTable:
    """Flag the Pareto front of ``rows`` and summarise them."""
    if counts is None:
        counts = {str(status): 0 for status in JobStatus}
        for row in rows:
            counts[row.status] += 1
    metric = pareto_metric(rows)
    plotted = comparable(rows, metric)
    front = pareto_front([(row.packed_bytes or 0, row.accuracy(metric) or 0.0) for row in plotted])
    for index, row in enumerate(plotted):
        row.pareto = index in front
    active = counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING]
    status = "canceled" if cancel_requested else "running" if active else "completed"
    table = SweepTable(status=status, counts=counts, rows=rows, pareto_metric=metric)
    table.recommended = recommend(rows, metric)
    return table


def sweep_table(sweep: Sweep) -> SweepTable:
    keys = swept_keys(sweep.request)
    return build_table(
        [row_of(job, keys) for job in sweep.jobs], cancel_requested=sweep.cancel_requested
    )


@dataclass
class SweepView:
    """A sweep with its table, read in one go (the API's answer is built from it)."""

    sweep: Sweep
    table: SweepTable
    names: dict[str, str | None] = field(default_factory=dict)  # model/data/eval_data filenames

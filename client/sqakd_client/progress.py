"""Progress bars (rich) on stderr, so that stdout stays the caller's: bytes of an upload or a
download, a sweep's finished jobs, and a training job (stage, step/total, epoch, loss, ETA)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Dict, Optional, Type

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .events import FINAL_JOB_STATUSES, Event


class Bar:
    """One rich task, live while the ``with`` block runs; nothing at all unless ``enabled``."""

    def __init__(
        self,
        enabled: bool,
        description: str,
        total: Optional[float],
        *columns: ProgressColumn,
        **fields: Any,
    ) -> None:
        self._progress: Optional[Progress] = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description:<12}"), *columns, console=Console(stderr=True)
            )
        self._start = {"description": description, "total": total, **fields}
        self._task = TaskID(0)

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(**self._start)
        return self

    def update(self, **changes: Any) -> None:
        """``completed``, ``total``, ``description`` or a field of the columns."""
        if self._progress is not None:
            self._progress.update(self._task, **changes)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


def byte_bar(enabled: bool, description: str, total: Optional[int]) -> Bar:
    """Bytes sent or received: ``update(completed=position)``."""
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    return Bar(enabled, description, total, *columns)


def count_bar(enabled: bool, description: str, total: int) -> Bar:
    """Things done out of ``total`` (a sweep's jobs)."""
    return Bar(enabled, description, total, BarColumn(), MofNCompleteColumn())


class JobBar:
    """A job's bar, fed its events: the stage (or final status), step/total of the stage's
    progress, and epoch, loss and the service's ETA."""

    def __init__(self, enabled: bool) -> None:
        self._bar = Bar(
            enabled,
            "queued",
            1,  # until the first progress event; rich 12.0's bar cannot draw an unknown total
            BarColumn(),
            TextColumn("{task.fields[steps]}"),
            TextColumn("{task.fields[detail]}"),
            steps="",
            detail="",
        )

    def __enter__(self) -> JobBar:
        self._bar.__enter__()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self._bar.__exit__(exc_type, exc, traceback)

    def show(self, event: Event) -> None:
        data = event.data
        if event.type == "stage" and data.get("stage"):
            self._bar.update(description=str(data["stage"]))
        elif event.type == "status" and data.get("status") in FINAL_JOB_STATUSES:
            self._bar.update(description=str(data["status"]))
        elif event.type == "progress":
            self._bar.update(**_progress_fields(data))


def _progress_fields(progress: Dict[str, Any]) -> Dict[str, Any]:
    """The bar's state from a progress event: ``step``, ``total_steps``, ``epoch``,
    ``epochs``, ``loss``, ``eta_seconds``."""
    step, total = progress.get("step"), progress.get("total_steps")
    fields: Dict[str, Any] = {"steps": f"{step}/{total}" if total else ""}
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        fields.update(completed=step, total=total)
    detail = []
    if progress.get("epoch") is not None:
        epochs = progress.get("epochs")
        detail.append(f"epoch {progress['epoch']}" + (f"/{epochs}" if epochs else ""))
    if isinstance(progress.get("loss"), (int, float)):
        detail.append(f"loss {progress['loss']:.4f}")
    if isinstance(progress.get("eta_seconds"), (int, float)):
        detail.append(f"ETA {progress['eta_seconds']:.0f}s")
    fields["detail"] = "  ".join(detail)
    return fields

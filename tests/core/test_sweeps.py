"""core.sweeps and core.sweep_report: grid expansion, the Pareto front, the report, completion."""

from __future__ import annotations

import hashlib
import threading
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import jobs, sweep_table, sweeps
from core.db import session_factory
from core.errors import InputError
from core.models import Sweep, Webhook, WebhookMessage, utcnow
from core.settings import Settings
from core.storage import LocalStorage
from core.sweep_report import render_html, render_svg
from core.sweep_table import SweepRow, SweepView, build_table, pareto_front
from core.sweeps import expand, grid_points
from tests.factories import make_job
from tests.utils import SettingsFactory

SVG = "{http://www.w3.org/2000/svg}"
BASE = {"epochs": 1, "preprocessing": {"input_size": [16, 16], "augment": False}}


def realistic_metrics(agreement: float, top1: float | None, packed: int, ms: float) -> dict:
    """A succeeded job's metrics as core.pipeline writes them (the parts a sweep reads)."""
    return {
        "agreement": agreement,
        "kl": 0.004,
        "teacher_top1": None if top1 is None else 0.99,
        "student_top1": top1,
        "fp32_bytes": 97_384,
        "packed_bytes": packed,
        "eval_images": 360,
        "inference": {
            "threads": 2,
            "batches": [1, 32],
            "openvino": {
                "float_ms": {"1": 0.31, "32": 2.9},
                "qdq_ms": {"1": ms * 1.1, "32": 2.4},
                "qdq_cpu_ms": {"1": ms, "32": 2.2},
                "qdq_layers": {"u8": 3, "f32": 1},
            },
            "onnxruntime": {"float_ms": {"1": 0.2, "32": 2.0}, "qdq_cpu_ms": {"1": 0.9}},
        },
    }


# ---------------------------------------------------------------------------------------------
# Grid expansion


def test_tied_bits_zip_and_other_keys_multiply() -> None:
    grid = {"weight_bits": [8, 4, 2], "activation_bits": [8, 4, 2], "method": ["lsq", "ewgs"]}

    configs = expand(BASE, grid=grid, tie=None, configs=None, max_jobs=24)

    assert [(c["weight_bits"], c["activation_bits"], c["method"]) for c in configs] == [
        (8, 8, "lsq"),
        (8, 8, "ewgs"),
        (4, 4, "lsq"),
        (4, 4, "ewgs"),
        (2, 2, "lsq"),
        (2, 2, "ewgs"),
    ]
    assert all(c["preprocessing"] == BASE["preprocessing"] and c["epochs"] == 1 for c in configs)


def test_an_empty_tie_is_the_cartesian_product_first_key_slowest() -> None:
    points = grid_points({"weight_bits": [8, 4], "activation_bits": [8, 4, 2]}, [], 24)

    assert [(p["weight_bits"], p["activation_bits"]) for p in points] == [
        (8, 8),
        (8, 4),
        (8, 2),
        (4, 8),
        (4, 4),
        (4, 2),
    ]


def test_dotted_grid_keys_and_configs_deep_merge_over_the_base() -> None:
    by_grid = expand(
        BASE, grid={"preprocessing.augment": [True, False]}, tie=None, configs=None, max_jobs=4
    )
    by_configs = expand(
        BASE,
        grid=None,
        tie=None,
        configs=[{"weight_bits": 2, "preprocessing": {"augment": True}}],
        max_jobs=4,
    )

    assert [c["preprocessing"] for c in by_grid] == [
        {"input_size": [16, 16], "augment": True},
        {"input_size": [16, 16], "augment": False},
    ]
    assert by_configs == [
        {"epochs": 1, "weight_bits": 2, "preprocessing": {"input_size": [16, 16], "augment": True}}
    ]


@pytest.mark.parametrize(
    ("grid", "tie", "configs", "code", "words"),
    [
        ({"weight_bits": [8, 4], "activation_bits": [8]}, None, None, "invalid_sweep", "length"),
        ({"weight_bits": [8, 4]}, ["weight_bits", "seed"], None, "invalid_sweep", "seed"),
        ({"weight_bits": []}, None, None, "invalid_sweep", "non-empty"),
        ({"weight_bits": 4}, None, None, "invalid_sweep", "non-empty"),
        ({}, None, None, "invalid_sweep", "empty"),
        (None, None, None, "invalid_sweep", "either"),
        ({"weight_bits": [4]}, None, [{"weight_bits": 4}], "invalid_sweep", "either"),
        (None, None, [], "invalid_sweep", "empty"),
        (None, ["weight_bits"], [{"weight_bits": 4}], "invalid_sweep", "grid only"),
        ({"weight_bits": [4, 4]}, None, None, "invalid_sweep", "same job config"),
        ({"seed": list(range(5)), "epochs": list(range(1, 6))}, [], None, "sweep_too_large", "25"),
        (None, None, [{"seed": n} for n in range(25)], "sweep_too_large", "24"),
    ],
)
def test_bad_grids_are_422_with_a_reason(
    grid: Any, tie: Any, configs: Any, code: str, words: str
) -> None:
    with pytest.raises(InputError) as caught:
        expand(BASE, grid=grid, tie=tie, configs=configs, max_jobs=24)

    assert (caught.value.status_code, caught.value.code) == (422, code)
    assert words in caught.value.message


def test_a_huge_grid_is_refused_before_it_is_materialised() -> None:
    grid = {f"k{n}": list(range(10)) for n in range(9)}  # 10**9 points

    with pytest.raises(InputError, match="1000000000 configurations"):
        grid_points(grid, [], 24)


def test_labels_name_the_bits_the_method_and_other_swept_values() -> None:
    config = {"weight_bits": 4, "activation_bits": 2, "method": "ewgs", "epochs": 3}

    assert sweep_table.label(config, {"weight_bits": 4, "activation_bits": 2}) == "W4A2 ewgs"
    assert sweep_table.label(config, {"weight_bits": 4, "epochs": 3}) == "W4A2 ewgs epochs=3"
    assert sweep_table.label(config, {"preprocessing.augment": False}) == "W4A2 ewgs augment=false"


# ---------------------------------------------------------------------------------------------
# Pareto front


def test_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    points = [(100, 0.90), (50, 0.90), (50, 0.80), (25, 0.70), (200, 0.95), (200, 0.95)]

    # (100, .90) loses to (50, .90): same accuracy, smaller; (50, .80) to (50, .90).
    assert pareto_front(points) == {1, 3, 4, 5}  # equal points are both on the front
    assert pareto_front([(10, 0.5)]) == {0}
    assert pareto_front([]) == set()


def row(label: str, status: str = "succeeded", **metrics: Any) -> SweepRow:
    return SweepRow(job_id=str(uuid.uuid4()), label=label, config={}, status=status, **metrics)


def test_table_flags_the_front_of_succeeded_rows_and_recommends_the_smallest_near_the_best() -> (
    None
):
    rows = [
        row("W8A8 lsq", agreement=0.99, student_top1=0.950, packed_bytes=50_000),
        row("W4A4 lsq", agreement=0.98, student_top1=0.945, packed_bytes=27_000),
        row("W4A2 lsq", agreement=0.90, student_top1=0.900, packed_bytes=27_000),
        row("W2A2 lsq", agreement=0.80, student_top1=0.700, packed_bytes=15_000),
        row("W1A1 lsq", status="failed", error={"code": "internal_error", "message": "x"}),
        row("W3A3 lsq", status="canceled"),
    ]

    table = build_table(rows)

    assert [r.label for r in rows if r.pareto] == ["W8A8 lsq", "W4A4 lsq", "W2A2 lsq"]
    assert table.pareto_metric == "student_top1"
    assert table.recommended is rows[1]  # 0.5 points below the best, half the size
    assert table.status == "completed"
    assert table.counts == {
        "queued": 0,
        "running": 0,
        "succeeded": 4,
        "failed": 1,
        "canceled": 1,
    }


def test_agreement_is_the_metric_unless_every_succeeded_row_has_top1() -> None:
    rows = [
        row("W8A8 lsq", agreement=0.99, student_top1=None, packed_bytes=50_000),
        row("W4A4 lsq", agreement=0.97, student_top1=0.9, packed_bytes=27_000),
        row("W2A2 lsq", status="queued"),
    ]

    table = build_table(rows, cancel_requested=False)

    assert table.pareto_metric == "agreement"
    assert table.status == "running" and not table.final
    assert build_table(rows, cancel_requested=True).status == "canceled"


def test_int8_latency_is_openvino_qdq_cpu_at_batch_1_or_none() -> None:
    assert sweep_table.int8_latency_ms(realistic_metrics(0.9, None, 1, 0.42)) == 0.42
    assert sweep_table.int8_latency_ms({"inference": {"error": "fixed batch"}}) is None
    assert sweep_table.int8_latency_ms({}) is None


# ---------------------------------------------------------------------------------------------
# The report


def report_rows() -> list[SweepRow]:
    return [
        row("W8A8 lsq", agreement=0.99, student_top1=0.95, packed_bytes=200_000, int8_latency_ms=1),
        row("W4A4 lsq", agreement=0.98, student_top1=0.94, packed_bytes=110_000),
        row("W4A2 lsq", agreement=0.90, student_top1=0.90, packed_bytes=110_000),
        row("W2A2 lsq", agreement=0.80, student_top1=0.70, packed_bytes=40_000),
        row("W1A1 lsq", status="failed", error={"code": "bad<code>", "message": "<b>x</b>"}),
    ]


def test_svg_parses_with_a_labelled_point_per_succeeded_job_and_the_front_path() -> None:
    table = build_table(report_rows())

    root = ET.fromstring(render_svg(table))

    points = [g for g in root.iter(f"{SVG}g") if "point" in g.get("class", "").split()]
    labels = {t.get("data-job-id"): t.text for t in root.iter(f"{SVG}text") if t.get("class")}
    assert len(points) == 4
    assert {labels[g.get("data-job-id")] for g in points} == {
        "W8A8 lsq",
        "W4A4 lsq",
        "W4A2 lsq",
        "W2A2 lsq",
    }
    assert sum("pareto" in g.get("class", "") for g in points) == 3
    fronts = [p for p in root.iter(f"{SVG}path") if p.get("class") == "front"]
    assert len(fronts) == 1 and fronts[0].get("d", "").startswith("M")
    axis_titles = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "log scale" in axis_titles  # 40 KB .. 200 KB spans more than 4x
    assert "student top-1" in axis_titles


def test_svg_without_a_succeeded_job_says_so() -> None:
    table = build_table([row("W1A1 lsq", status="failed")])

    root = ET.fromstring(render_svg(table))

    assert "no succeeded job to plot" in "".join(root.itertext())


def test_html_escapes_what_users_wrote() -> None:
    table = build_table(report_rows())
    sweep = Sweep(
        id=str(uuid.uuid4()),
        tenant="local",
        request={},
        user_metadata={"note": "<script>alert(1)</script>", "<img src=x>": "ok"},
        cancel_requested=False,
        artifacts=[],
        created_at=utcnow(),
    )
    view = SweepView(sweep, table, {"model": "<svg onload=alert(2)>.onnx", "data": "d&d.zip"})

    html = render_html(view, render_svg(table), generated_at=utcnow())

    assert "<script>" not in html and "<img" not in html and "<svg onload" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;svg onload=alert(2)&gt;.onnx" in html and "d&amp;d.zip" in html
    assert "bad&lt;code&gt;" in html  # a failed row shows its error code
    assert "Recommended: W4A4 lsq" in html


# ---------------------------------------------------------------------------------------------
# Completion


def make_sweep(session: Session, jobs_of: list[dict[str, Any]], tenant: str = "local") -> Sweep:
    sweep = Sweep(
        id=str(uuid.uuid4()),
        tenant=tenant,
        request={"grid": {"weight_bits": [8, 4], "activation_bits": [8, 4]}},
        user_metadata={},
        cancel_requested=False,
        artifacts=[],
    )
    session.add(sweep)
    session.commit()
    for index, values in enumerate(jobs_of):
        bits = {"weight_bits": 8 >> index, "activation_bits": 8 >> index, "method": "lsq"}
        make_job(session, tenant, sweep_id=sweep.id, config=bits, **values)
    return sweep


def run_to_end(session: Session, job_id: str, metrics: dict[str, Any] | None) -> None:
    """What a worker does: claim the job, then succeed it (or fail it without metrics)."""
    assert jobs.claim_job(session, job_id, "test-worker", 60) is not None
    if metrics is None:
        assert jobs.fail(session, job_id, "test-worker", "internal_error", "boom")
    else:
        assert jobs.succeed(session, job_id, "test-worker", metrics)


def test_a_sweep_completes_once_when_its_last_job_is_final(
    session: Session, settings: Settings
) -> None:
    sweep = make_sweep(session, [{}, {}])
    first, second = (job.id for job in sweep.jobs)

    run_to_end(session, first, realistic_metrics(0.99, 0.95, 25_000, 0.3))
    assert not sweeps.complete_if_final(session, settings, sweep.id)  # one still queued
    run_to_end(session, second, None)

    assert sweeps.complete_if_final(session, settings, sweep.id)
    assert not sweeps.complete_if_final(session, settings, sweep.id)  # once
    assert sweeps.complete_finished(session, settings) == 0
    stored = session.get(Sweep, sweep.id, populate_existing=True)
    assert stored is not None and stored.completed_at is not None
    storage = LocalStorage(settings.data_dir)
    folder = storage.absolute(storage.sweep_artifact_key(sweep.id, "report.html")).parent
    assert sorted(a["name"] for a in stored.artifacts) == ["pareto.svg", "report.html"]
    for artifact in stored.artifacts:
        content = (folder / artifact["name"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
        assert len(content) == artifact["size"]
    assert sorted(p.name for p in folder.iterdir()) == ["pareto.svg", "report.html"]


def test_the_catch_all_completes_sweeps_whose_jobs_ended_elsewhere(
    session: Session, settings: Settings
) -> None:
    done = make_sweep(session, [{"status": "canceled"}, {"status": "failed"}])
    busy = make_sweep(session, [{"status": "canceled"}, {"status": "running"}])

    assert sweeps.complete_finished(session, settings) == 1

    session.expire_all()
    assert session.get(Sweep, done.id).completed_at is not None  # type: ignore[union-attr]
    assert session.get(Sweep, busy.id).completed_at is None  # type: ignore[union-attr]


def test_completion_announces_sweep_completed_to_subscribed_webhooks(
    session: Session, settings: Settings
) -> None:
    session.add(
        Webhook(
            id=str(uuid.uuid4()),
            tenant="local",
            url="http://127.0.0.1:9/hook",
            events=["sweep.completed"],
            secret="whsec_" + "A" * 32,
        )
    )
    session.commit()
    sweep = make_sweep(session, [{"status": "canceled"}])

    assert sweeps.complete_if_final(session, settings, sweep.id)

    types = session.scalars(select(WebhookMessage.type)).all()
    assert types == ["sweep.completed"]


def test_two_processes_completing_at_once_store_the_report_once(
    make_settings: SettingsFactory, postgres_url: str
) -> None:
    """PostgreSQL, two sessions in two threads: one claim wins, the other writes nothing."""
    settings = make_settings(database_url=postgres_url)
    factory = session_factory(settings)
    with factory() as session:
        sweep = make_sweep(
            session, [{"status": "succeeded", "metrics": realistic_metrics(0.99, 0.9, 1_000, 0.2)}]
        )
    results: list[bool] = []
    start = threading.Barrier(2)

    def complete() -> None:
        with factory() as session:
            start.wait()
            results.append(sweeps.complete_if_final(session, settings, sweep.id))

    threads = [threading.Thread(target=complete) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(results) == [False, True]
    with factory() as session:
        stored = session.get(Sweep, sweep.id)
        assert stored is not None and stored.completed_at is not None
        storage = LocalStorage(settings.data_dir)
        folder = storage.absolute(storage.sweep_artifact_key(sweep.id, "report.html")).parent
        for artifact in stored.artifacts:
            content = (folder / artifact["name"]).read_bytes()
            assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
        assert session.scalar(select(func.count()).select_from(Sweep)) == 1

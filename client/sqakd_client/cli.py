"""The ``sqakd`` command line: quantize a model in one line, follow and fetch jobs, run sweeps.

A thin layer over the SDK (``sqakd_client.Client``): argparse reads the command, a few SDK calls
do the work, ``render`` shows the result. Tables go to stdout, progress bars and errors to
stderr; ``--json`` prints one JSON document on stdout instead, and nothing else there
(``jobs events -f --json``: one per line, as the events come).

Exit codes: 0 success; 1 an API error, a missing local file, or a waited job (or sweep job)
that ended failed or canceled; 2 a usage error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rich.console import Console

from sqakd_client import ApiError, Client, Job, Sweep, render

SUCCESS, FAILURE = 0, 1  # argparse itself exits 2 on a usage error
LIST_PAGE_SIZE = 100  # the API's largest page


class UsageError(Exception):
    """A value argparse could not check alone (``--config``'s JSON, say): exit 2."""


class CommandFailed(Exception):
    """An outcome the caller must see as a failure (a waited job that failed): exit 1, after
    the command printed what it had to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Output:
    """Where things go: tables to stdout, bars and errors to stderr, or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # Piped output is not cut at 80 columns: job ids alone take 36.
        width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
        self.out = Console(markup=False, highlight=False, width=width)
        self.err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)

    @property
    def progress(self) -> bool:
        """Progress bars for people only: a --json caller reads stdout, not a bar."""
        return not self.as_json

    def show(self, *renderables: Any) -> None:
        if not self.as_json:
            # a line of text is left to the terminal to wrap (a path or an id stays whole)
            self.out.print(*renderables, soft_wrap=all(isinstance(r, str) for r in renderables))

    def document(self, value: Any) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")

    def json_line(self, value: Any) -> None:
        """One JSON value on one line, sent at once (``jobs events -f --json``)."""
        sys.stdout.write(json.dumps(value, default=str) + "\n")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        """A line a person wants to see at once (the new job's id): stderr under --json."""
        (self.err if self.as_json else self.out).print(text)

    def error(self, code: str, message: str, status: int) -> None:
        self.err.print(f"error: {code}: {message}")
        self.document({"error": {"code": code, "message": message, "status": status}})


# Arguments --------------------------------------------------------------------------------------


def bits_list(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of bit-widths: {text!r}"
        ) from None


def names_list(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def key_value(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def load_config(text: Optional[str]) -> Dict[str, Any]:
    """``--config``: a JSON object, or ``@file`` holding one (a missing file: file_not_found)."""
    if text is None:
        return {}
    source = "--config"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(2, "no such file", str(path))
        source, text = str(path), path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{source} must be a JSON object, like '{{\"epochs\": 3}}'")
    return config


def job_config(args: argparse.Namespace) -> Dict[str, Any]:
    """``--config`` with the explicit flags merged over it (a sweep's --bits and --method are
    its grid, not its base config)."""
    config = load_config(args.config)
    flags = [("epochs", args.epochs), ("steps", args.steps)]
    if args.command == "quantize":
        flags += [
            ("weight_bits", args.bits),
            ("activation_bits", args.bits),
            ("weight_bits", args.weight_bits),  # later flags win
            ("activation_bits", args.activation_bits),
            ("method", args.method),
        ]
    for key, value in flags:
        if value is not None:
            config[key] = value
    return config


# Commands ---------------------------------------------------------------------------------------


def cmd_quantize(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.jobs.create(
        model=args.model,
        data=args.data,
        eval_data=args.eval,
        config=job_config(args),
        metadata=dict(args.metadata) or None,
        progress=out.progress,
    )
    if not args.wait:
        out.show(f"job {job.id} {job.status}")
        out.show(f"follow it: sqakd jobs events {job.id} -f")
        out.document(job.data)
        return SUCCESS
    out.note(f"job {job.id} {job.status}")
    job = job.wait(progress=out.progress, timeout=args.timeout)
    if job.status != "succeeded":
        out.show(render.job_table(job.data))
        out.document(job.data)
        error = job.error or {}
        raise CommandFailed(
            error.get("code") or f"job_{job.status}",
            error.get("message") or f"job {job.id} ended {job.status}",
        )
    out.show(render.job_table(job.data))
    out.show("", render.metrics_table(job.metrics or {}, job.config))
    downloaded = download(job, args.output or job.id, None, out)
    out.document({**job.data, "downloaded": downloaded})
    return SUCCESS


def download(job: Job, directory: str, names: Optional[List[str]], out: Output) -> Dict[str, Any]:
    """The artifacts into ``directory`` (sha256 checked by the SDK), listed with their sizes."""
    paths = [Path(path) for path in job.download(directory, names=names, progress=out.progress)]
    listing = {artifact["name"]: artifact for artifact in job.artifacts}
    where = Path(directory).resolve()
    files = [
        {
            "name": path.name,
            "path": str(path.resolve()),
            "size": path.stat().st_size,
            "sha256": listing.get(path.name, {}).get("sha256"),
        }
        for path in paths
    ]
    out.show("", render.artifacts_table(files))
    plural = "" if len(files) == 1 else "s"
    out.show(f"{len(files)} artifact{plural} in {where} (sha256 checked)")
    return {"directory": str(where), "files": files}


def cmd_download(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.jobs.get(args.job_id)
    out.document(download(job, args.output or job.id, args.name, out))
    return SUCCESS


def cmd_jobs_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    jobs = client.jobs.list(
        status=args.status,
        metadata=dict(args.metadata) or None,
        page_size=min(args.limit, LIST_PAGE_SIZE),
    )
    found = [job.data for job in itertools.islice(jobs, args.limit)]
    out.show(render.jobs_table(found) if found else "no jobs")
    out.document(found)
    return SUCCESS


def cmd_jobs_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.jobs.get(args.job_id)
    out.show(render.job_table(job.data))
    if job.metrics:
        out.show("", render.metrics_table(job.metrics, job.config))
    if job.artifacts:
        out.show("", render.artifacts_table(job.artifacts))
    out.document(job.data)
    return SUCCESS


def cmd_jobs_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.jobs.get(args.job_id).cancel()
    stopping = "" if job.is_final else " (it stops at its next step)"
    out.show(f"job {job.id} {job.status}{stopping}")
    out.document(job.data)
    return SUCCESS


def cmd_jobs_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.jobs.get(args.job_id).delete()
    out.show(f"job {args.job_id} deleted")
    out.document({"id": args.job_id, "deleted": True})
    return SUCCESS


def cmd_jobs_events(client: Client, args: argparse.Namespace, out: Output) -> int:
    """One line per event as it comes. With --json: the list once the events end, or, when
    following, one JSON object per line as each event comes (JSON Lines: a pipe into ``jq``
    sees them live, not when the job ends)."""
    job = client.jobs.get(args.job_id)
    events = []
    for event in job.events(follow=args.follow, after=args.after):
        if out.as_json:
            document = {
                "id": event.id,
                "type": event.type,
                "data": event.data,
                "created_at": event.created_at,
            }
            if args.follow:
                out.json_line(document)
            else:
                events.append(document)
        else:
            line = render.event_line(event.id, event.type, event.data, event.created_at)
            out.out.print(line, soft_wrap=True)  # one line per event, however wide
    if not args.follow:
        out.document(events)
    return SUCCESS


def cmd_sweep(client: Client, args: argparse.Namespace, out: Output) -> int:
    grid: Dict[str, List[Any]] = {"weight_bits": args.bits, "activation_bits": args.bits}
    if args.method:
        grid["method"] = args.method
    sweep = client.sweeps.create(
        model=args.model,
        data=args.data,
        eval_data=args.eval,
        grid=grid,
        base_config=job_config(args),
        metadata=dict(args.metadata) or None,
    )
    if not args.wait:
        out.show(f"sweep {sweep.id} {sweep.status}: {len(sweep.rows)} jobs")
        out.show(f"its table: sqakd sweeps get {sweep.id}")
        out.document(sweep.data)
        return SUCCESS
    out.note(f"sweep {sweep.id} {sweep.status}: {len(sweep.rows)} jobs")
    sweep = sweep.wait(progress=out.progress, timeout=args.timeout)
    document = dict(sweep.data)
    show_sweep(sweep, out)
    if args.output:
        document["downloaded"] = [str(Path(p).resolve()) for p in sweep.download(args.output)]
        out.show(f"report: {', '.join(document['downloaded'])}")
    out.document(document)
    failed = [row for row in sweep.rows if row.get("status") != "succeeded"]
    if failed:
        error = failed[0].get("error") or {}
        raise CommandFailed(
            error.get("code") or f"job_{failed[0].get('status')}",
            f"{len(failed)} of {len(sweep.rows)} jobs did not succeed; first: "
            f"{failed[0].get('label')}: {error.get('message') or failed[0].get('status')}",
        )
    return SUCCESS


def show_sweep(sweep: Sweep, out: Output) -> None:
    out.show(render.sweep_table(sweep.data))
    row = render.recommended_row(sweep.data)
    if row:
        out.show(
            f"recommended: {row['label']} (job {row['job_id']}): the smallest front point within "
            f"1 point of the best {render.metric_label(sweep.pareto_metric)}"
        )


def cmd_sweeps_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    sweep = client.sweeps.get(args.sweep_id)
    show_sweep(sweep, out)
    out.document(sweep.data)
    return SUCCESS


# The parser -------------------------------------------------------------------------------------


def common_options(defaults: bool) -> argparse.ArgumentParser:
    """--url, --api-key and --json, accepted before the command and after it: the top level
    holds the defaults, the commands SUPPRESS theirs so they never overwrite a value given
    before them."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Callable[[Any], Any] = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    parser.add_argument(
        "--url",
        default=default(None),
        help="the service (default: $SQAKD_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key", default=default(None), help="the API key (default: $SQAKD_API_KEY)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document on stdout, nothing else",
    )
    return parser


def add_training_options(parser: argparse.ArgumentParser, sweep: bool) -> None:
    """What quantize and sweep share; a sweep takes lists of bit-widths and methods."""
    parser.add_argument("model", metavar="MODEL", help="an .onnx file, or a stored model's id")
    parser.add_argument(
        "data",
        metavar="DATA",
        help="an image archive, a stored dataset's id, or s3://bucket/key of an archive that "
        "the service registers from its object storage",
    )
    if sweep:
        parser.add_argument(
            "--bits",
            type=bits_list,
            required=True,
            metavar="B[,B...]",
            help="bit-widths, weights and activations tied: 8,4,2",
        )
        parser.add_argument(
            "--method",
            type=names_list,
            metavar="M[,M...]",
            help="quantizers to sweep, e.g. lsq,pact",
        )
    else:
        parser.add_argument(
            "--bits", type=int, metavar="N", help="weight and activation bits, 1..8 (default 4)"
        )
        parser.add_argument("--weight-bits", type=int, metavar="N", help="wins over --bits")
        parser.add_argument("--activation-bits", type=int, metavar="N", help="wins over --bits")
        parser.add_argument("--method", help="lsq, ewgs, pact, dorefa or ste (default: lsq)")
    parser.add_argument(
        "--eval", metavar="EVAL", help="labelled images (file, id or s3:// URL) for top-1"
    )
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--steps", type=int, help="training steps (instead of epochs)")
    parser.add_argument(
        "--config", metavar="JSON|@FILE", help="more job config fields; the flags win over it"
    )
    parser.add_argument(
        "--metadata",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata pair (repeatable)",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the end, show the results")
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long"
    )
    parser.add_argument("-o", "--output", metavar="DIR", help="where to download the results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqakd",
        description="Quantize vision models with the SQAKD service.",
        parents=[common_options(defaults=True)],
    )
    common = [common_options(defaults=False)]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    quantize = commands.add_parser(
        "quantize",
        parents=common,
        help="train a low-bit student of MODEL on DATA",
        description="Start a job; with --wait, follow it, show its metrics and download its "
        "artifacts to DIR (default ./<job id>).",
    )
    add_training_options(quantize, sweep=False)
    quantize.set_defaults(run=cmd_quantize)

    sweep = commands.add_parser(
        "sweep",
        parents=common,
        help="one job per bit-width (and method); the Pareto table",
        description="Start a sweep over --bits (weights and activations tied: 8,4 is W8A8 and "
        "W4A4) and --method; with --wait, show its Pareto table; with -o, download its report.",
    )
    add_training_options(sweep, sweep=True)
    sweep.set_defaults(run=cmd_sweep)

    download_cmd = commands.add_parser(
        "download", parents=common, help="download a job's artifacts (sha256 checked)"
    )
    download_cmd.add_argument("job_id", metavar="ID")
    download_cmd.add_argument("-o", "--output", metavar="DIR", help="default: ./<job id>")
    download_cmd.add_argument(
        "--name", action="append", metavar="NAME", help="only this artifact (repeatable)"
    )
    download_cmd.set_defaults(run=cmd_download)

    jobs = commands.add_parser("jobs", help="list, show, cancel, delete jobs; their events")
    job_commands = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    listing = job_commands.add_parser("list", parents=common, help="your jobs, newest first")
    listing.add_argument(
        "--status",
        type=names_list,
        metavar="S[,S...]",
        help="queued, running, succeeded, failed, canceled",
    )
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument(
        "--metadata",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only jobs with this metadata (repeatable)",
    )
    listing.set_defaults(run=cmd_jobs_list)
    for name, run, text in (
        ("get", cmd_jobs_get, "one job: status, metrics, artifacts"),
        ("cancel", cmd_jobs_cancel, "cancel a job (a running one stops at its next step)"),
        ("delete", cmd_jobs_delete, "delete a queued or finished job with its files"),
        ("events", cmd_jobs_events, "a job's event log, one line per event"),
    ):
        action = job_commands.add_parser(name, parents=common, help=text)
        action.add_argument("job_id", metavar="ID")
        action.set_defaults(run=run)
        if name == "events":
            action.add_argument(
                "-f", "--follow", action="store_true", help="follow live until the job ends"
            )
            action.add_argument(
                "--after", type=int, default=0, metavar="N", help="start after event N"
            )

    sweeps = commands.add_parser("sweeps", help="show a sweep")
    sweep_commands = sweeps.add_subparsers(dest="sweeps_command", metavar="ACTION", required=True)
    sweep_get = sweep_commands.add_parser("get", parents=common, help="a sweep's Pareto table")
    sweep_get.add_argument("sweep_id", metavar="ID")
    sweep_get.set_defaults(run=cmd_sweeps_get)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.json)
    try:
        with Client(url=args.url, api_key=args.api_key) as client:
            return int(args.run(client, args, out))
    except UsageError as exc:
        parser.error(f"{args.command}: {exc}")
    except CommandFailed as exc:
        out.err.print(f"error: {exc.code}: {exc.message}")
    except FileNotFoundError as exc:
        out.error("file_not_found", f"{exc.strerror or 'no such file'}: {exc.filename}", 0)
    except ApiError as exc:  # the SDK's every error: HTTP, connection, wait timeout, checksum
        out.error(exc.code, exc.message, exc.status_code)
    except KeyboardInterrupt:
        out.err.print("interrupted")
        return 130
    return FAILURE


if __name__ == "__main__":
    sys.exit(main())

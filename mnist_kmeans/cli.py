"""Command line: argument parsing only. Maps UserError -> exit 2, ClusterError -> 3, interrupt and Cancelled -> 130."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from mnist_kmeans import __version__
from mnist_kmeans.config import default_source, default_store, scheduler_address
from mnist_kmeans.errors import Cancelled, ClusterError, UserError, one_line, to_stderr

EXIT_OK, EXIT_USER, EXIT_CLUSTER, EXIT_INTERRUPTED = 0, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _scheduler_option(text: str) -> str:
    """``--scheduler``: checked at the edge like the cluster file's ``scheduler``, so a typo is exit 2, not 3."""
    try:
        return scheduler_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _job_arguments(parser: argparse.ArgumentParser, resume: str) -> None:
    """The arguments ``run`` and ``submit`` share: a job and where it runs, reads and writes."""
    parser.add_argument("job", help="job file (jobs/*.yaml)")
    parser.add_argument("--cluster", default=None, help="cluster file (default: ./cluster.yaml if present)")
    parser.add_argument(
        "--scheduler", default=None, type=_scheduler_option, help="scheduler address; overrides the cluster file"
    )
    parser.add_argument("--store", default=None, help="store path or URL; overrides the job file")
    parser.add_argument("--out", default=None, help="run directory (default runs/<job-name>-<UTC timestamp>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help=resume)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mnist-kmeans", description="Mini-batch k-means over a K grid on a Dask cluster.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ing = sub.add_parser("ingest", help="IDX files -> chunked Zarr store")
    ing.add_argument("--source", default=None, help=f"directory or http(s) base URL (default {default_source()})")
    ing.add_argument("--store", default=None, help=f"store path or URL (default {default_store()})")
    ing.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default 10000)")
    ing.add_argument("--force", action="store_true", help="rebuild a complete store")
    ing.add_argument(
        "--classes", default=None, metavar="FILE", help="class names, one per line (default: SOURCE/classes if any)"
    )
    ing.add_argument("--cluster", default=None, help="cluster file: its storage: section (default ./cluster.yaml)")

    run = sub.add_parser("run", help="the distributed K-grid job, then the report")
    _job_arguments(run, resume="continue an interrupted run")
    submit = sub.add_parser("submit", help="run a job on a running cluster without staying connected (then: wait)")
    _job_arguments(submit, resume="continue an interrupted or cancelled run")
    for name, text in (
        ("status", "the state of a job, from its run directory alone"),
        ("wait", "block until a job is done; print its report's path (exit codes as run)"),
        ("cancel", "stop a job, keeping its finished epochs"),
    ):
        sub.add_parser(name, help=text).add_argument("run_dir")

    rep = sub.add_parser("report", help="render report.html again from a run directory, no cluster")
    rep.add_argument("run_dir")

    cmp = sub.add_parser("compare", help="finished runs of the same data side by side on one HTML page, no cluster")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    cmp.add_argument("--out", default=None, metavar="FILE", help="the page to write (default ./compare.html)")

    aug = sub.add_parser("augment", help="a larger training set of deformed digits, written by the cluster")
    aug.add_argument("--store", required=True, help="source store")
    aug.add_argument("--out", required=True, help="new store")
    aug.add_argument("--rows", required=True, type=int, help="training rows of the new store")
    aug.add_argument("--seed", type=int, default=0)
    aug.add_argument("--scheduler", default=None, type=_scheduler_option)
    aug.add_argument("--cluster", default=None)
    return p


# One function per command. Imports are local so that `--help` and bad arguments answer fast, without importing dask.


def _ingest(args: argparse.Namespace) -> None:
    from mnist_kmeans.config import load_cluster, refuse_memory_store
    from mnist_kmeans.data.ingest import ingest

    source, store = args.source or default_source(), args.store or default_store()
    refuse_memory_store(store)
    options = load_cluster(args.cluster).storage  # credentials of a remote store, if the cluster file has them
    ingest(
        source,
        store,
        chunk_rows=args.chunk_rows,
        force=args.force,
        log=to_stderr,
        classes=args.classes,
        storage_options=options,
    )


def _run(args: argparse.Namespace) -> None:
    from mnist_kmeans.config import load_cluster, load_job

    # Validate the files before importing the numeric stack: a typo answers in a fraction of a second.
    load_job(args.job)
    if args.cluster is not None:
        load_cluster(args.cluster)
    from mnist_kmeans.pipeline import run_job

    report = run_job(
        args.job,
        cluster_file=args.cluster,
        scheduler=args.scheduler,
        store=args.store,
        out=args.out,
        resume=args.resume,
        argv=sys.argv,
    )
    print(report)


def _submit(args: argparse.Namespace) -> None:
    from mnist_kmeans.config import load_job

    load_job(args.job)  # before importing the numeric stack, as run does
    from mnist_kmeans.submit import submit_job

    submitted = submit_job(
        args.job,
        cluster_file=args.cluster,
        scheduler=args.scheduler,
        store=args.store,
        out=args.out,
        resume=args.resume,
        argv=sys.argv,
    )
    print("\n".join(submitted.lines()))


def _status(args: argparse.Namespace) -> None:
    from mnist_kmeans.submit import job_status

    print(job_status(args.run_dir).line())


def _wait(args: argparse.Namespace) -> None:
    from mnist_kmeans.submit import wait_job

    print(wait_job(args.run_dir))


def _cancel(args: argparse.Namespace) -> None:
    from mnist_kmeans.submit import cancel_job

    print(cancel_job(args.run_dir).line())


def _report(args: argparse.Namespace) -> None:
    from mnist_kmeans.report import render_report

    print(render_report(args.run_dir))


def _compare(args: argparse.Namespace) -> None:
    from mnist_kmeans.report.compare import compare

    print(compare(args.run_dirs, out=args.out))


def _augment(args: argparse.Namespace) -> None:
    from mnist_kmeans.data.augment import augment_command

    augment_command(args)


_COMMANDS = {
    "ingest": _ingest,
    "run": _run,
    "submit": _submit,
    "status": _status,
    "wait": _wait,
    "cancel": _cancel,
    "report": _report,
    "compare": _compare,
    "augment": _augment,
}


def _dispatch(args: argparse.Namespace) -> int:
    _COMMANDS[args.command](args)
    return EXIT_OK


REDELIVER_AFTER_S = 0.05


def _redeliver_interrupt(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a command's process: a Ctrl-C that lands in a finalizer (a Dask future's ``__del__``
    while the run unwinds) would be printed as "Exception ignored" and lost; it is raised again in the main thread,
    where ``main`` turns it into exit 130 and one line. Anything else is shown as Python shows it. The signal is sent
    again to the main thread (which wakes it from a wait) by a timer, once this hook has returned: raised here, it
    would land in the hook and be dropped again."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        main_thread = threading.main_thread().ident
        timer = threading.Timer(REDELIVER_AFTER_S, signal.pthread_kill, (main_thread, signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:  # this process is the command
        sys.unraisablehook = _redeliver_interrupt
    if not (sys.argv[1:] if argv is None else argv):
        # no command at all: the usage with the commands (argparse's convention: stderr, exit 2)
        sys.stderr.write(parser.format_help())
        return EXIT_USER
    try:
        args = parser.parse_args(argv)
        return _dispatch(args)
    except UserError as exc:
        to_stderr(f"error: {one_line(exc)}")
        return EXIT_USER
    except ClusterError as exc:
        to_stderr(f"cluster error: {one_line(exc)}")
        return EXIT_CLUSTER
    except Cancelled as exc:  # `run` (or `wait` for a job) stopped by `cancel`
        to_stderr(one_line(exc) or "cancelled")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        if argv is None:  # this process is the command and now exits: a second Ctrl-C changes nothing of that
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # An interrupt inside zarr's sync leaves its coroutines unawaited and its tasks pending; their
            # RuntimeWarnings and asyncio's "Task was destroyed but it is pending!" at exit would add lines to the
            # one line of exit 130.
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        # `run` says how to resume in the exception; ingest and augment leave no partial store behind
        to_stderr(one_line(exc) or "interrupted")
        return EXIT_INTERRUPTED

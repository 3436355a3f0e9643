"""Referring-segmentation evaluation of the served model: the paper's cIoU / gIoU table.

    python -m clients.evaluate --url 127.0.0.1:8001 --dataset-dir DIR --split 'refcoco|unc|val' \\
        --output results.json [--protocol grpc] [--concurrency 8] [--limit 500]

`DIR` holds `refer_seg/` as for upstream's `eval.py --dataset_dir` (see `clients.refcoco` for the
layout and for how images, prompts and targets are read).  Every (image, expression) goes through the
server, `--concurrency` requests in flight, and is scored as upstream scores it (`clients.metrics`:
cIoU = summed foreground intersection / summed union; gIoU = mean per-expression IoU, an expression
with empty prediction and empty target counting 1.0).

Each expression's result is appended to `<output>.progress.jsonl` as it arrives, so an interrupted run
(Ctrl-C, a crash, a lost connection) resumes where it stopped when the same command is run again
(`--restart` starts over).  The first Ctrl-C (or SIGTERM) stops sending, waits for the requests in
flight and saves them; a second one stops at once.  The finished run writes `<output>` (keys `ciou`,
`giou`, `count`, ..., throughput included), prints a table and removes the progress file.  Exit
codes as `clients.errors`, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from .aio import AsyncSegmentationClient
from .contract import DEFAULT_SPEC, Segmentation, spec_for_model
from .errors import ClientError, ContractMismatch, InvalidInput, OutputError, ServerError
from .metrics import ExpressionScore, IoUAccumulator, score_expression
from .progress import ProgressLog
from .refcoco import Job, ReferSplit, read_image_bytes
from .transport import DEFAULT_TIMEOUT_S, PROTOCOLS

EVAL_CONCURRENCY = 8
INTERRUPTED_EXIT_CODE = 130
DEFINITION = (
    "upstream eval.py: iou_i = I_i / (U_i + 1e-10) + (1 if U_i == 0); "
    "ciou = sum(I) / (sum(U) + 1e-10); giou = sum(iou_i) / (count + 1e-5); "
    "I, U = foreground intersection / union of (mask == 1) and (target == 1), target 255 ignored"
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the server's gRPC or HTTP endpoint")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--dataset-dir", required=True, help="the folder that holds refer_seg/")
    parser.add_argument("--split", required=True, help="dataset|split_by|split, e.g. 'refcoco|unc|val'")
    parser.add_argument("--output", required=True, help="results JSON to write")
    parser.add_argument("--limit", type=int, default=None, help="only the first N expressions")
    parser.add_argument("--concurrency", type=int, default=EVAL_CONCURRENCY, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--model", default=DEFAULT_SPEC.name, help="served model name (its contract is EVF_SAM's)")
    parser.add_argument("--restart", action="store_true", help="ignore the saved progress of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@dataclass
class RunStats:
    evaluated: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class Evaluation:
    """One split's evaluation: the jobs still to run, their saved results, and the run's timing."""

    split: ReferSplit
    jobs: List[Job]
    log: ProgressLog
    show_progress: bool = True
    stats: RunStats = field(default_factory=RunStats)
    stop_requested: bool = False

    @classmethod
    def prepare(cls, dataset_dir: str, split: str, output: str, limit: Optional[int] = None,
                restart: bool = False, show_progress: bool = True) -> "Evaluation":
        refer = ReferSplit(dataset_dir, split)
        jobs = refer.jobs()[: _checked_limit(limit)]
        log = ProgressLog(progress_path(output), str(refer.name)).open(jobs, restart)
        return cls(refer, jobs, log, show_progress)

    @property
    def todo(self) -> List[Job]:
        return [job for job in self.jobs if job.index not in self.log.scores]

    async def run(self, client: Any) -> None:
        """Send every job without a saved result through `client.segment_many` and score it."""
        todo = self.todo
        started = time.perf_counter()
        with tqdm(total=len(self.jobs), initial=len(self.jobs) - len(todo), unit="expr",
                  desc=str(self.split.name), disable=not self.show_progress, file=sys.stderr) as bar, \
                _stop_signals(self.request_stop):
            results = client.segment_many(self._requests(todo))
            async with contextlib.aclosing(results):  # a failure drains the requests in flight now
                async for job, result in _paired(todo, results):
                    self.log.record(job, self._score(job, result), result.score)
                    self.stats.evaluated += 1
                    bar.update()
        self.stats.seconds = time.perf_counter() - started
        self.stats.images = len({job.image.image_id for job in todo[: self.stats.evaluated]})

    def request_stop(self) -> None:
        """First call: send nothing more, finish what is in flight.  Second call: stop now."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True

    def _requests(self, jobs: Sequence[Job]) -> Iterator[Tuple[bytes, str]]:
        """(image bytes, prompt) per job until a stop is requested; each image is read once."""
        image_id, data = None, b""
        for job in jobs:
            if self.stop_requested:
                return
            if job.image.image_id != image_id:
                image_id, data = job.image.image_id, read_image_bytes(job.image)
            yield data, job.expression.text

    def summary(self, server: Dict[str, Any]) -> Dict[str, Any]:
        accumulator = IoUAccumulator()
        for job in self.jobs:
            if job.index in self.log.scores:
                accumulator.add(self.log.scores[job.index])
        return {
            "split": str(self.split.name),
            **accumulator.as_dict(),
            "images": len({job.image.image_id for job in self.jobs if job.index in self.log.scores}),
            "split_expressions": self.split.expression_count,
            "complete": accumulator.count == self.split.expression_count,
            "throughput": _throughput(self.stats),
            "server": server,
            "definition": DEFINITION,
        }

    def _score(self, job: Job, result: Segmentation) -> ExpressionScore:
        expected = (job.image.height, job.image.width)
        if result.mask.shape != expected:
            raise ContractMismatch(
                f"the server returned a {result.mask.shape[1]}x{result.mask.shape[0]} mask for image "
                f"{job.image.image_id} ({job.image.path}), annotated as {expected[1]}x{expected[0]}"
            )
        return score_expression(result.mask, self.split.target(job.image, job.expression))


def progress_path(output: str) -> str:
    return output + ".progress.jsonl"


def write_results(path: str, results: Dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    temporary = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(f"cannot write results to {path}: {exc.strerror or exc}") from None


def format_table(results: Dict[str, Any]) -> str:
    header = f"{'split':<22}{'count':>8}{'cIoU (%)':>10}{'gIoU (%)':>10}{'expr/s':>9}"
    row = (
        f"{results['split']:<22}{results['count']:>8}{100 * results['ciou']:>10.2f}"
        f"{100 * results['giou']:>10.2f}{results['throughput']['expressions_per_s']:>9.2f}"
    )
    return f"{header}\n{row}"


async def evaluate(args: argparse.Namespace, evaluation: Evaluation) -> Dict[str, Any]:
    spec = spec_for_model(args.model)
    client = AsyncSegmentationClient(args.url, args.protocol, args.timeout, args.concurrency, spec)
    async with client:
        await evaluation.run(client)
    if evaluation.stop_requested:
        raise KeyboardInterrupt
    server = {"url": args.url, "protocol": args.protocol, "model": client.spec.name, "concurrency": args.concurrency}
    return evaluation.summary(server)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    evaluation: Optional[Evaluation] = None
    try:
        evaluation = Evaluation.prepare(
            args.dataset_dir, args.split, args.output, args.limit, args.restart, not args.no_progress
        )
        results = asyncio.run(evaluate(args, evaluation))
        write_results(args.output, results)
        evaluation.log.remove()
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(_interrupted_message(evaluation), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        if evaluation is not None:
            evaluation.log.close()
    print(format_table(results))
    print(f"wrote {args.output}")
    return 0


@contextlib.contextmanager
def _stop_signals(handler: Any) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `handler` while the event loop runs (main thread only)."""
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, handler)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def _paired(jobs: Sequence[Job], results: Any) -> Any:
    """(job, result) pairs; a server error names the image and expression it failed on."""
    position = 0
    try:
        async for result in results:
            yield jobs[position], result
            position += 1
    except ServerError as exc:
        job = jobs[position]
        where = f" (image {job.image.image_id}, {job.image.path}, expression {job.expression.text!r})"
        raise ServerError(str(exc) + where, exc.server_message, exc.status) from None


def _throughput(stats: RunStats) -> Dict[str, float]:
    seconds = max(stats.seconds, 1e-9)
    return {
        "evaluated_this_run": stats.evaluated,
        "seconds": stats.seconds,
        "expressions_per_s": stats.evaluated / seconds if stats.evaluated else 0.0,
        "images_per_s": stats.images / seconds if stats.images else 0.0,
    }


def _checked_limit(limit: Optional[int]) -> Optional[int]:
    if limit is not None and limit < 1:
        raise InvalidInput(f"--limit must be a positive number of expressions, got {limit}")
    return limit


def _interrupted_message(evaluation: Optional[Evaluation]) -> str:
    if evaluation is None:
        return "error: interrupted"
    saved = len(evaluation.log.scores)
    return (
        f"error: interrupted; {saved} of {len(evaluation.jobs)} expressions are saved in "
        f"{evaluation.log.path}: run the same command again to resume"
    )


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation's per-expression results, appended as JSON lines and flushed one at a time.

The first line names the split; each further line is one expression: its position in evaluation
order, its `ref_id/sent_id` key, the foreground intersection and union, and the server's score.
A run killed at any moment leaves at worst a torn last line, which the next run drops before it
resumes with the expressions that have no line yet.
"""
from __future__ import annotations

import json
import os
from typing import IO, Dict, List, Optional, Sequence

from .errors import DatasetError, OutputError
from .metrics import ExpressionScore
from .refcoco import Job

FORMAT_VERSION = 1


class ProgressLog:
    def __init__(self, path: str, split: str):
        self.path = path
        self.split = split
        self.scores: Dict[int, ExpressionScore] = {}
        self._handle: Optional[IO[str]] = None

    def open(self, jobs: Sequence[Job], restart: bool = False) -> "ProgressLog":
        """Read what an earlier run of the same split saved (unless `restart`) and get ready to append."""
        try:
            if restart or not os.path.exists(self.path):
                self._start_new()
            else:
                self._resume(jobs)
        except OSError as exc:
            raise OutputError(f"cannot use progress file {self.path}: {exc.strerror or exc}") from None
        return self

    def record(self, job: Job, score: ExpressionScore, model_score: float) -> None:
        line = {
            "index": job.index,
            "key": job.expression.key,
            "intersection": score.intersection,
            "union": score.union,
            "score": model_score,
        }
        if self._handle is None:
            raise RuntimeError("open() the progress log before recording into it")
        try:
            self._handle.write(json.dumps(line) + "\n")
            self._handle.flush()
        except OSError as exc:
            raise OutputError(f"cannot write progress file {self.path}: {exc.strerror or exc}") from None
        self.scores[job.index] = score

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def _start_new(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")
        self._handle.write(json.dumps({"split": self.split, "format": FORMAT_VERSION}) + "\n")
        self._handle.flush()

    def _resume(self, jobs: Sequence[Job]) -> None:
        lines = _complete_lines(self.path)
        self._check_header(lines[0] if lines else "")
        for number, line in enumerate(lines[1:], start=2):
            try:
                self._load_record(json.loads(line), jobs)
            except DatasetError:
                raise
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"line {number} of progress file {self.path} is corrupt; pass --restart") from None
        self._handle = open(self.path, "a", encoding="utf-8")

    def _check_header(self, line: str) -> None:
        header = _json_or_none(line)
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise DatasetError(f"{self.path} is not an evaluation progress file; pass --restart to overwrite it")
        if header.get("split") != self.split:
            raise DatasetError(
                f"progress file {self.path} is for split {header.get('split')!r}, not {self.split!r}; "
                "pass --restart or choose another --output"
            )

    def _load_record(self, record: dict, jobs: Sequence[Job]) -> None:
        index = record["index"]
        if index >= len(jobs):
            return  # saved by a run with a larger --limit
        if jobs[index].expression.key != record["key"]:
            raise DatasetError(
                f"progress file {self.path} does not match the dataset (expression {index} is "
                f"{jobs[index].expression.key}, saved as {record['key']}); pass --restart"
            )
        self.scores[index] = ExpressionScore(record["intersection"], record["union"])


def _complete_lines(path: str) -> List[str]:
    """The file's complete lines; a torn last line (no newline) is cut off the file."""
    with open(path, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)
    return [line for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def _json_or_none(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None

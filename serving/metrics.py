"""Read Triton's Prometheus metrics endpoint (text exposition format 0.0.4).

Used by the launcher (requests in flight before a graceful stop), the benchmarks (what the server
did during a measurement) and the tests (the embedding cache's counters).
"""
from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

SAMPLE_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
LABEL_PAIR = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


class MetricsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Tuple[Tuple[str, str], ...]
    value: float

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        own = dict(self.labels)
        return self.name == name and all(own.get(k) == v for k, v in labels.items())


def parse(text: str) -> List[Sample]:
    samples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = SAMPLE_LINE.match(line)
        if match is None:
            raise MetricsFormatError(f"line {number} is not a Prometheus sample: {line[:120]!r}")
        labels = tuple((m["key"], m["value"]) for m in LABEL_PAIR.finditer(match["labels"] or ""))
        try:
            value = float(match["value"])
        except ValueError:
            raise MetricsFormatError(f"line {number}: value {match['value']!r} is not a number") from None
        samples.append(Sample(match["name"], labels, value))
    return samples


def scrape(url: str, timeout: float = 5.0) -> List[Sample]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8"))


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of `name` over every sample whose labels include `labels` (0.0 if there is none)."""
    return sum(s.value for s in samples if s.matches(name, labels))


def totals(samples: Iterable[Sample], names: Iterable[str], **labels: str) -> Dict[str, float]:
    samples = list(samples)
    return {name: total(samples, name, **labels) for name in names}

"""How much to measure at each model size: enough repeats to be stable, few enough to finish.

`tiny` is what `make bench` runs (minutes on 2 CPU cores).  On such a machine one SAM ViT-B encoder pass
takes 6 s (ONNX Runtime) to 11 s (eager PyTorch), a ViT-H pass minutes, so `vit-b` and `full` measure
far fewer points (see benchmarks/README.md for measured run times).  The same budgets serve both
families (`vit-b` is SAM ViT-B or SAM-2 Hiera-B+; `full` SAM ViT-H or SAM-2 Hiera-L).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Budget:
    warmup: int  # untimed calls before each in-process measurement
    repeats: int  # timed passes over all samples for the side-by-side (a) / (b)
    stage_repeats: int  # passes over all samples for the per-stage breakdown
    samples: int  # (image, prompt) pairs used (the first N)
    concurrency: Tuple[int, ...]  # perf_analyzer sweep of evf_sam
    level_seconds: float  # perf_analyzer: aim for this long per concurrency level ...
    min_requests_per_stream: int  # ... but at least this many requests per concurrent stream
    batch_sizes: Tuple[int, ...]  # in-process, per graph (capped at each graph's max batch)
    batch_repeats: int
    prompt_counts: Tuple[int, ...]  # N prompts on one image
    prompt_repeats: int
    served_prompt_seconds: float  # evf_sam_prompts sweep: aim for this long per (mode, N) point
    served_prompt_counts: Tuple[int, ...] = (1, 4, 16)  # prompts per request in that sweep
    engine_concurrency: Tuple[int, ...] = (1, 2)  # perf_analyzer sweep of each engine model alone (() skips it)
    max_requests: int = 400

    def requests(self, concurrency: int, latency_s: float, seconds: Optional[float] = None) -> int:
        """A fixed request count for one perf_analyzer level: about `seconds` (default `level_seconds`)
        of work at a measured single-request latency, at least `min_requests_per_stream` per stream."""
        estimate = (self.level_seconds if seconds is None else seconds) / max(latency_s, 1e-3)
        return int(min(self.max_requests, max(self.min_requests_per_stream * concurrency, estimate)))

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


BUDGETS: Dict[str, Budget] = {
    "tiny": Budget(warmup=1, repeats=5, stage_repeats=3, samples=4, concurrency=(1, 2, 4), level_seconds=20,
                   min_requests_per_stream=6, batch_sizes=(1, 2, 4), batch_repeats=5, prompt_counts=(1, 4, 16),
                   prompt_repeats=2, served_prompt_seconds=10, engine_concurrency=(1, 2, 4)),
    "vit-b": Budget(warmup=1, repeats=1, stage_repeats=1, samples=2, concurrency=(1, 2), level_seconds=60,
                    min_requests_per_stream=2, batch_sizes=(1, 2), batch_repeats=1, prompt_counts=(1, 4),
                    prompt_repeats=1, served_prompt_seconds=30),
    "full": Budget(warmup=1, repeats=1, stage_repeats=1, samples=2, concurrency=(1, 2), level_seconds=300,
                   min_requests_per_stream=1, batch_sizes=(1, 2), batch_repeats=1, prompt_counts=(1, 4),
                   prompt_repeats=1, served_prompt_seconds=300),
}

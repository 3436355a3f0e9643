"""summary.md and plots/ of a `benchmarks.cluster` results folder (redraw: python -m benchmarks.cluster --render DIR)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plots import save_figure  # noqa: E402

COLOURS = {True: "tab:blue", False: "tab:orange"}


def _by_routing(points: List[Dict]) -> Dict[bool, List[Dict]]:
    return {affinity: sorted((p for p in points if p["affinity"] == affinity), key=lambda p: p["replicas"])
            for affinity in (True, False)}


def _bars(results: Dict, key: str, ylabel: str, title: str, path: Path, percent: bool = False) -> str:
    groups = _by_routing(results["routing"])
    counts = [p["replicas"] for p in groups[True]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for offset, affinity in ((-width / 2, True), (width / 2, False)):
        values = [(p[key] or 0) * (100 if percent else 1) for p in groups[affinity]]
        bars = ax.bar([c + offset for c in counts], values, width, color=COLOURS[affinity],
                      label=groups[affinity][0]["routing"] if groups[affinity] else "")
        ax.bar_label(bars, fmt="%.0f%%" if percent else "%.1f", fontsize=8)
    ax.set(xlabel="replicas", ylabel=ylabel, title=title, xticks=counts)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def remap_plot(results: Dict, path: Path) -> str:
    remap = results["remap"]
    names = list(remap)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bars = ax.bar(names, [100 * remap[n]["remapped_fraction"] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.axhline(25, color="gray", linestyle="--", label="ideal 1/4")
    ax.set(ylabel="keys remapped (%)", title="Replicas 3 -> 4: keys that change replica")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def kill_plot(results: Dict, path: Path) -> str:
    kill = results["kill"]
    finished = sorted((end, ok) for _, end, ok in kill["timeline"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([end for end, _ in finished], range(1, len(finished) + 1), color="tab:blue", label="requests completed")
    failed = [(end, i + 1) for i, (end, ok) in enumerate(finished) if not ok]
    if failed:
        ax.scatter(*zip(*failed), color="red", zorder=3, label="failed at the client")
    ax.axvline(kill["killed_at_s"], color="red", linestyle="--", label=f"{kill['killed']} SIGKILLed")
    if kill["seconds_until_envoy_marks_unhealthy"] is not None:
        ax.axvline(kill["killed_at_s"] + kill["seconds_until_envoy_marks_unhealthy"], color="gray", linestyle=":",
                   label="Envoy marks it unhealthy")
    ax.set(xlabel="seconds", ylabel="requests completed", title=f"{kill['replicas']} replicas, one killed mid-run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _images(point: Dict) -> str:
    owned = point.get("images_per_replica")
    return "all, in turn" if owned is None else ", ".join(str(v) for _, v in sorted(owned.items()))


def summary_markdown(results: Dict, plots: List[str]) -> str:
    meta, workload = results["meta"], results["meta"]["workload"]
    git = meta["git"]
    lines = [
        "# Replicas behind Envoy: image affinity vs round robin",
        "",
        f"{meta['date']}, {meta['machine']['cpu_model']} ({meta['machine']['vcpus']} vCPUs, "
        f"{meta['machine']['memory_gib']} GiB), git {git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}, "
        f"Envoy {meta['versions'].get('envoy')}, tritonserver from nvidia-pytriton {meta['versions'].get('nvidia-pytriton')}.",
        f"Command: `{meta['command']}`; {meta['wall_seconds']['total'] / 60:.1f} min.",
        "",
        f"Workload: {workload['images']} images x {workload['prompts_per_image']} prompts, {workload['order']}; "
        f"{workload['request']}; {workload['concurrency']} requests in flight; tiny random-weight model; each replica's "
        f"embedding cache holds {workload['cache_images_per_replica']} images.",
        "",
        "| replicas | routing | cache hit rate | served prompts/s | p50 ms | failed | requests per replica | images per replica |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in sorted(results["routing"], key=lambda p: (p["replicas"], not p["affinity"])):
        spread = ", ".join(f"{v}" for _, v in sorted(p["requests_per_replica"].items()))
        lines.append(f"| {p['replicas']} | {p['routing']} | {100 * (p['hit_rate'] or 0):.0f}% | {p['prompts_per_s']} | "
                     f"{p['latency_p50_ms']} | {p['failed']} | {spread} | {_images(p)} |")
    lines += ["", "Two vCPUs are shared by every replica, Envoy and the client: throughput cannot grow with the "
              "replica count here, and more replicas mean more processes on the same cores.  The hit rates are the "
              "point: with affinity the replicas' caches add up; with round robin every replica caches the same images.",
              ""]
    remap = results["remap"]
    lines += ["## Replicas 3 -> 4: keys remapped", "",
              "| hash | keys remapped | ideal | of those, to the new replica | largest share with 4 / ideal |",
              "| --- | --- | --- | --- | --- |"]
    for name, r in remap.items():
        lines.append(f"| {name} | {100 * r['remapped_fraction']:.1f}% | 25% | {100 * r['moved_to_new_replica']:.0f}% | "
                     f"{r['max_share_over_ideal_4']:.2f} |")
    kill = results["kill"]
    if kill:
        lines += ["", f"## {kill['killed']} SIGKILLed mid-run ({kill['replicas']} replicas, affinity)", "",
                  f"- requests: {kill['requests']}, the kill after {kill['killed_after_requests']} had completed; "
                  f"{kill['in_flight_at_victim_when_killed']} were in flight at that replica",
                  f"- failed at the client: **{kill['failed_at_client']}**; Envoy retries: {kill['envoy_retries']} "
                  f"(refused by the retry circuit breaker: {kill.get('envoy_retry_overflows')})",
                  f"- Envoy marked it unhealthy after {kill['seconds_until_envoy_marks_unhealthy']} s "
                  f"(flags {kill['unhealthy_flags']}; health checks every {kill['health_check_interval_s']} s, "
                  f"{kill['unhealthy_threshold']} failures); "
                  + ("no request was routed to it after the kill (the ones in flight there were retried elsewhere)"
                     if kill["last_request_to_victim_after_kill_s"] is None else
                     f"last request routed to it {kill['last_request_to_victim_after_kill_s']} s after the kill"),
                  f"- cache hit rate before the kill {100 * (kill['hit_rate_before_kill'] or 0):.0f}%, after it on the "
                  f"survivors {100 * (kill['hit_rate_after_kill'] or 0):.0f}% (the victim's images are encoded again "
                  "where they now map)",
                  f"- images owned per replica before the kill: {kill['images_owned_per_replica']}"]
    lines += ["", "## Plots", ""] + [f"![{name}](plots/{name})" for name in plots]
    busy = {k: v for k, v in meta["other_jobs_cpu_share"].items() if v and v > 0.05}
    if busy:
        lines += ["", "Other jobs shared the machine during: " + ", ".join(f"{k} ({100 * v:.0f}% of the CPUs)"
                                                                          for k, v in busy.items()) + "."]
    return "\n".join(lines) + "\n"


def render(out_dir: Path) -> None:
    results = json.loads((out_dir / "results.json").read_text())
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = [
        _bars(results, "hit_rate", "embedding cache hit rate (%)", "Cache hit rate", plots_dir / "hit_rate.png", True),
        _bars(results, "prompts_per_s", "served prompts / s", "Throughput (2 vCPUs shared)", plots_dir / "throughput.png"),
        remap_plot(results, plots_dir / "remap.png"),
    ]
    if results.get("kill"):
        written.append(kill_plot(results, plots_dir / "replica_killed.png"))
    (out_dir / "summary.md").write_text(summary_markdown(results, written))

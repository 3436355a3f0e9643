"""summary.md and the PNG plots of a reliability results.json."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .rss import SERVER_LABEL, growth  # noqa: E402

RSS_GOAL_MIB = 50.0


def save_figure(fig, path: Path) -> str:
    # benchmarks/plots.py has the same helper, but that module does not import on main at the time of
    # writing (benchmarks/inprocess.py asks serving.repository for names it no longer has).
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def rss_plot(soak: Dict, title: str, path: Path) -> str:
    rss = soak["rss"]
    minutes = [t / 60 for t in rss["t_s"]]
    fig, ax = plt.subplots(figsize=(10, 5))
    for index, (label, column) in enumerate(sorted(rss["rss_mib"].items())):
        style = "-" if label == SERVER_LABEL else ("--" if index % 2 else ":")
        ax.plot(minutes, column, style, linewidth=2.2 if label == SERVER_LABEL else 1.2, label=label)
    for kind in ("anon", "shmem"):
        column = rss.get("server_kinds_mib", {}).get(kind)
        if column and any(v for v in column):
            ax.plot(minutes, column, "-.", color="black", alpha=0.6 if kind == "anon" else 0.3, linewidth=1.2,
                    label=f"{SERVER_LABEL} {SERVER_KIND_NAMES[kind].split(' (')[0]}")
    ax.axvline(soak["plan"]["warmup_s"] / 60, color="gray", linewidth=0.8)
    ax.text(soak["plan"]["warmup_s"] / 60, ax.get_ylim()[1], " end of warm-up", va="top", fontsize=7, color="gray")
    ax.set(xlabel="minutes", ylabel="resident memory, MiB", yscale="log", title=title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def fuzz_plot(fuzz: Dict, path: Path) -> str:
    categories = list(fuzz["by_category"])
    kinds = ("ok", "4xx", "5xx", "no_answer")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    left = [0] * len(categories)
    for index, kind in enumerate(kinds):
        values = [fuzz["by_category"][c].get(kind, 0) for c in categories]
        ax.barh(categories, values, left=left, color=f"C{index}", label=kind)
        left = [a + b for a, b in zip(left, values)]
    ax.set(xlabel="requests", title=f"Fuzz: {fuzz['requests']} requests, answers by category")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def write_plots(results: Dict, out_dir: Path) -> List[str]:
    written = []
    for key, soak in results.get("soak", {}).items():
        if "rss" in soak:
            written.append(rss_plot(soak, f"RSS over time, soak on the {key} model", out_dir / f"rss_{key}.png"))
    if "requests" in results.get("fuzz", {}):
        written.append(fuzz_plot(results["fuzz"], out_dir / "fuzz_answers.png"))
    return written


# ---- summary.md ---------------------------------------------------------------------------------------

def _table(header: List[str], rows: List[List[object]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _mark(good: Optional[bool]) -> str:
    return "n/a" if good is None else ("**yes**" if good else "**NO**")


def header_lines(results: Dict) -> List[str]:
    meta = results["meta"]
    machine = meta["machine"]
    lines = [f"# Reliability suite — {meta['date']}", "",
             f"Machine: {machine['cpu_model']}, {machine['vcpus']} vCPUs, {machine['memory_gib']} GiB, GPU: "
             f"{machine['gpu'] or 'none'}; {machine['os']}, Python {machine['python']}.  ",
             f"Git commit: `{meta['git_commit']}`.  Command: `{meta['command']}`.  ",
             f"Wall time: {meta.get('wall_seconds', {}).get('total', 0) / 60:.1f} min.", "",
             "Shared machine: the share of all CPUs that *other* jobs used while each phase ran "
             "(benchmarks/machine.py CpuShare), and the phase's wall time:", ""]
    runs = meta.get("phase_runs", {})
    rows = [[phase, f"{seconds:.0f} s", f"{100 * (meta['cpu_share_others'].get(phase) or 0):.0f}%",
             f"`{runs.get(phase, {}).get('git_commit', meta['git_commit'])}`"]
            for phase, seconds in meta["wall_seconds"].items() if phase != "total"]
    lines += _table(["phase", "wall", "other jobs' CPU share", "commit"], rows) + [""]
    reruns = sorted({run["command"] for run in runs.values() if run["command"] != meta["command"]})
    return lines + ([f"Phases run again later: `{command}`." for command in reruns] + [""] if reruns else [])


def soak_lines(name: str, soak: Dict, plot: Optional[str]) -> List[str]:
    if "error" in soak:
        return [f"## Soak ({name})", "", f"Failed: `{soak['error']}`", ""]
    lines = [f"## Soak ({name} model)", "",
             f"perf_analyzer at concurrency {soak['plan']['concurrency']} on each of `evf_sam` and "
             f"`evf_sam_prompts` (4 prompts per request) for {soak['seconds'] / 60:.1f} min, {soak['images']} images "
             f"in turn (JPEG / PNG / WebP, 160-960 px) against a feature cache of a few images; RSS sampled every "
             f"{soak['plan']['sample_interval_s']:.0f} s, growth measured from the end of the "
             f"{soak['plan']['warmup_s'] / 60:.0f}-min warm-up (medians of the first and last tenth).", ""]
    rows = []
    for model, m in soak["models"].items():
        stats = m["server_stats"]
        rows.append([model, stats["inference_count"], m["throughput_mean"], m["p99_ms_max"],
                     len(m["perf_analyzer_errors"]), m["server_failures"]])
    lines += _table(["model", "requests executed", "mean req/s", "worst round p99, ms", "perf_analyzer errors",
                     "Triton failures (rejected/cancelled/backend)"], rows) + [""]
    cache = soak["cache"]
    lines += [f"Feature cache over the soak: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
              f"{cache.get('evictions', 0)} evictions.  Readiness polls not 200: {soak['readiness']['not_ready']} of "
              f"{soak['readiness']['polls']}.  Processes that vanished: {soak['stub_restarts_or_deaths'] or 'none'}.", ""]
    lines += growth_lines(soak)
    lines += server_kinds_lines(soak.get("server_kinds_growth"), soak["rss"].get("server_region_mappings"))
    lines += later_warmup_lines(soak)
    if plot:
        lines += [f"![RSS over time]({plot})", ""]
    return lines


REGIONS_LABEL = "python-backend /dev/shm regions (RAM, each page once)"


def growth_lines(soak: Dict) -> List[str]:
    """Per process: VmRSS growth, and the goal judged on its private memory (RssAnon) where sampled;
    the stubs' shared-memory regions as one more row, counted once."""
    growth, private = soak["rss_growth"], soak.get("private_growth")
    order = sorted(growth, key=lambda label: (label == "total", label))
    if not private:  # results from before the private split: VmRSS only
        rows = [[label, growth[label]["after_warmup_mib"], growth[label]["end_mib"], growth[label]["growth_mib"],
                 growth[label]["peak_mib"], _below_goal(growth[label])] for label in order]
        return _table(["process", "RSS after warm-up, MiB", "RSS at end, MiB", "growth, MiB", "peak, MiB",
                       f"growth < {RSS_GOAL_MIB:.0f} MiB"], rows) + [""]
    regions = soak["server_kinds_growth"]["shm_regions"]
    rows = [[label, growth[label]["after_warmup_mib"], growth[label]["end_mib"], growth[label]["growth_mib"],
             private[label]["after_warmup_mib"], private[label]["end_mib"], private[label]["growth_mib"],
             _below_goal(private[label]) if label != "total" else ""] for label in order if label in private]
    rows.insert(-1, [REGIONS_LABEL, "", "", "", regions["after_warmup_mib"], regions["end_mib"],
                     regions["growth_mib"], _below_goal(regions)])
    return ["Growth is judged on memory each process holds alone (RssAnon), and on the stubs' /dev/shm "
            "regions counted once: VmRSS counts a region's page once per mapping of it (the python backend "
            "maps a region again, whole, each time it grows), so tritonserver's VmRSS climbs while the regions "
            "grow to their peaks.", "",
            *_table(["process", "VmRSS after warm-up, MiB", "VmRSS at end, MiB", "VmRSS growth, MiB",
                     "private after warm-up, MiB", "private at end, MiB", "private growth, MiB",
                     f"growth < {RSS_GOAL_MIB:.0f} MiB"], rows), ""]


LATER_WARMUPS_S = (600.0, 900.0)


def later_warmup_lines(soak: Dict) -> List[str]:
    """The same private / regions growth measured from later ends of the warm-up: memory settles per
    request, and a slow model (ViT-B on 2 CPUs) serves few requests in the first minutes."""
    rss = soak["rss"]
    if "private_mib" not in rss:
        return []
    rows = []
    for warmup_s in (soak["plan"]["warmup_s"], *LATER_WARMUPS_S):
        if warmup_s > 0.6 * rss["t_s"][-1]:
            continue
        private = growth(rss["t_s"], rss["private_mib"], warmup_s)
        regions = growth(rss["t_s"], {"regions": rss["server_kinds_mib"]["shm_regions"]}, warmup_s)["regions"]
        stubs = {label: v["growth_mib"] for label, v in private.items() if label not in (SERVER_LABEL, "total")}
        worst = max(stubs, key=lambda label: stubs[label] if stubs[label] is not None else float("-inf"))
        done = sum(r["requests"] for m in soak["models"].values() for r in m["rounds"]
                   if not r.get("error") and r["t_s"] + r["seconds"] <= warmup_s)
        every = [private[SERVER_LABEL], private[worst], regions]
        rows.append([f"{warmup_s / 60:.0f} min", done, private[SERVER_LABEL]["growth_mib"],
                     f"{worst}: {stubs[worst]}", regions["growth_mib"],
                     _mark(all(v["growth_mib"] is not None and v["growth_mib"] < RSS_GOAL_MIB for v in every))])
    return ["Growth measured from later ends of the warm-up (same samples):", "",
            *_table(["warm-up", "requests in rounds finished by then (both models)", "tritonserver private growth, MiB",
                     "stub with the most private growth, MiB", "regions growth, MiB",
                     f"all < {RSS_GOAL_MIB:.0f} MiB"], rows), ""]


def _below_goal(window: Dict) -> str:
    return _mark(window["growth_mib"] is not None and window["growth_mib"] < RSS_GOAL_MIB)


SERVER_KIND_NAMES = {"anon": "private (RssAnon)", "file": "mapped files (RssFile)",
                     "shmem": "shared memory it touched (RssShmem)",
                     "shm_regions": "its stubs' /dev/shm regions (RAM held, not part of its RSS)"}


def server_kinds_lines(kinds: Optional[Dict], mappings: Optional[List[Optional[int]]]) -> List[str]:
    """tritonserver's RSS growth by kind: the shared part is the stubs' regions growing to their peaks."""
    if not kinds:
        return []
    rows = [[SERVER_KIND_NAMES[kind], v["after_warmup_mib"], v["end_mib"], v["growth_mib"], v["peak_mib"]]
            for kind, v in kinds.items()]
    counted = [m for m in mappings or [] if m is not None]
    maps = (f"  It held {counted[0]} mappings of the regions at the start and {counted[-1]} at the end."
            if counted else "")
    return ["tritonserver's VmRSS by kind, and the RAM its stubs' shared-memory regions hold:" + maps, "",
            *_table(["memory", "after warm-up, MiB", "at end, MiB", "growth, MiB", "peak, MiB"], rows), ""]


def overload_lines(o: Dict) -> List[str]:
    if "error" in o:
        return ["## Overload", "", f"Failed: `{o['error']}`", ""]
    rejected = o["outcomes"].get("rejected", 0)
    answered = o["outcomes"].get("answered", 0)
    other = {k: v for k, v in o["outcomes"].items() if k not in ("rejected", "answered")}
    return ["## Overload", "",
            f"{o['in_flight']} `evf_sam` requests at once over gRPC (10x max_queue_size {o['max_queue_size']}; "
            f"{o['front_instances']} front instances): {answered} answered, {rejected} rejected "
            f"({', '.join(o['rejection_status'])}, \"Exceeds maximum queue size\"), other outcomes: {other or 'none'}.  "
            f"Rejection latency as the client saw it (one process sending all of them): p50 "
            f"{o['rejection_latency_ms'].get('p50')} ms, p99 {o['rejection_latency_ms'].get('p99')} ms, max "
            f"{o['rejection_latency_ms'].get('max')} ms; answered requests p50 {o['answered_latency_ms'].get('p50')} ms, "
            f"p99 {o['answered_latency_ms'].get('p99')} ms.  {_probe_text(o)}Burst over in {o['burst_seconds']} s.  "
            f"Ready right after: "
            f"{_mark(o['ready_after'])}; a new request right after: mask {o['good_request_after']['mask_shape']} in "
            f"{o['good_request_after']['seconds']} s.  Readiness polls not 200 during the burst: "
            f"{o['readiness']['not_ready']} of {o['readiness']['polls']}.", ""]


def _probe_text(o: Dict) -> str:
    probe = o.get("probes")
    if not probe:
        return ""
    latency = probe["rejection_latency_ms"]
    return (f"Requests sent one at a time while the queue was full: {probe['outcomes']}, rejected in p50 "
            f"{latency.get('p50')} ms, p99 {latency.get('p99')} ms.  ")


def goodput_lines(profiles: Dict) -> List[str]:
    lines = ["## Goodput under client deadlines", ""]
    for profile, g in profiles.items():
        lines += [f"### {profile.replace('_', ' ')}", ""]
        if "error" in g:
            lines += [f"Failed: `{g['error']}`", ""]
            continue
        plan, server, single = g["plan"], g["server"], g["single_stream"]
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(g["outcomes"].items(), key=lambda kv: -kv[1]))
        lines += [f"Repository options: `{g['repository_options'] or 'the generated defaults'}`.  {plan['clients']} raw "
                  f"tritonclient gRPC clients, {g['seconds']:.0f} s, each `evf_sam` call with `client_timeout` uniform "
                  f"in {plan['min_deadline_s']}-{plan['max_deadline_s']} s, retried at once; every request a new image "
                  f"(the encoder runs once per request that gets that far).", "",
                  f"* single-stream capacity (one client, no deadline, {single['seconds']:.0f} s): **{single['per_s']} "
                  f"req/s** (p50 {single['p50_ms']} ms)",
                  f"* with deadlines: {g['requests']} requests: {outcomes}",
                  f"* successes: **{g['successes_per_s']} req/s = {g['fraction_of_single_stream']} x single-stream** "
                  f"(goal >= 0.5: {_mark(g['goal_met'])}); success latency p50 {g['success_latency_ms']['p50']} ms, "
                  f"p99 {g['success_latency_ms']['p99']} ms",
                  f"* server side: `evf_sam` executed {server['executed_by_evf_sam']} requests, dropped "
                  f"{server['dropped_in_queue_canceled']} in its queue (client gone: CANCELED, never executed), refused "
                  f"{server['rejected_queue_full']} (queue full or waited too long); executed for clients already gone: "
                  f"{server['executed_for_gone_clients']}; SAM image encoder ran {server['encoder_runs']} times, "
                  f"{server['encoder_runs_for_gone_clients']} of them for clients that had gone",
                  f"* tritonserver crashed / restarted: {_mark(g['tritonserver_restarted'])} (launcher restarts: "
                  f"{g['launcher_restarts']}); readiness polls not 200: {g['readiness']['not_ready']} of "
                  f"{g['readiness']['polls']}; ready after: {_mark(g['server_ready_after'])}", ""]
    return lines


def _outcomes(tally: Dict) -> str:
    return "; ".join(f"{n['count']}x {k} (<= {n['max_s']} s)" for k, n in tally.items())


def faults_lines(f: Dict) -> List[str]:
    if "error" in f:
        return ["## Faults", "", f"Failed: `{f['error']}`", ""]
    lines = ["## Faults", "", "### SIGKILL of one python-backend stub, bare tritonserver 2.51", "",
             "Six `evf_sam` requests in flight, the stub killed, then eight more requests one by one.", ""]
    rows = []
    for r in f["stub_kill_bare"]:
        ready = r["readiness_after"]
        rows.append([r["target"], _outcomes(r["in_flight"]), _outcomes(r["follow_up"]),
                     "200" if ready["server"] else "not ready",
                     "all 200" if all(ready.values()) else ", ".join(k for k, v in ready.items() if not v),
                     _mark(r["stub_restarted_by_triton"]), ", ".join(r["launcher_check_sees"]) or "nothing",
                     f"{r['sigterm_to_exit_s']} s{' (killed)' if r['killed_after_sigterm'] else ''}"])
    lines += _table(["stub killed", "requests in flight", "later requests", "server ready", "model ready",
                     "Triton restarts the stub", "launcher's stub check sees", "SIGTERM to exit"], rows) + [""]
    lines += ["### Under `python -m serving.server` (make serve)", ""]
    rows = [[r["target"], _outcomes(r["in_flight"]), r["new_tritonserver_ready_s"], r["first_success_s"],
             _mark(r["readiness_went_down"])] for r in f["stub_kill_launcher"] + [f["server_kill_launcher"]]]
    lines += _table(["killed", "requests in flight", "new tritonserver ready after, s", "first success after, s",
                     "readiness went down meanwhile"], rows) + [""]
    evaluation = f.get("evaluation_resume")
    if evaluation:
        lines += ["### `clients.evaluate` SIGKILLed and resumed", "",
                  f"Split {evaluation['split']} ({evaluation['expressions']} expressions, concurrency 2): killed with "
                  f"{evaluation['killed_after_saved']} saved, the same command again evaluated "
                  f"{evaluation['evaluated_after_resume']}; final JSON identical to an uninterrupted run (timing aside): "
                  f"{_mark(evaluation['identical_results'])}; nothing lost, nothing counted twice: "
                  f"{_mark(evaluation['nothing_lost_nothing_twice'])}.", ""]
    return lines


def fuzz_lines(z: Dict, plot: Optional[str]) -> List[str]:
    if "error" in z:
        return ["## Fuzz", "", f"Failed: `{z['error']}`", ""]
    totals = z["totals"]
    lines = ["## Fuzz", "",
             f"{z['requests']} generated requests (seed {z['seed']}, {z['workers']} at a time, {z['seconds']:.0f} s), "
             f"HTTP {totals.get('http', 0)} / gRPC {totals.get('grpc', 0)}: {totals.get('ok', 0)} answered, "
             f"{totals.get('4xx', 0)} 4xx / INVALID_ARGUMENT, {totals.get('5xx', 0)} 5xx / INTERNAL, "
             f"{totals.get('no_answer', 0)} without an answer; {totals.get('unexpected', 0)} not as expected, "
             f"{totals.get('leaks', 0)} messages with a traceback or a file path.  Readiness polls not 200: "
             f"{z['readiness']['not_ready']} of {z['readiness']['polls']}; ready after: {_mark(z['ready_after'])}; "
             f"dead stubs after: {z['dead_stubs_after'] or 'none'}.", ""]
    rows = [[c, v.get("requests", 0), v.get("ok", 0), v.get("4xx", 0), v.get("5xx", 0), v.get("no_answer", 0),
             v.get("unexpected", 0), v.get("leaks", 0)] for c, v in z["by_category"].items()]
    lines += _table(["category", "requests", "ok", "4xx", "5xx", "no answer", "not as expected", "leaks"], rows) + [""]
    if plot:
        lines += [f"![fuzz answers]({plot})", ""]
    if z["problems"]:
        lines += ["Answers not as expected (first of each kind):", ""]
        seen = set()
        for p in z["problems"]:
            key = (p["category"], p["kind"], p["status"])
            if key not in seen:
                seen.add(key)
                lines.append(f"* {p['category']}/{p['kind']} over {p['protocol']} -> {p['status']}: `{p['message'][:160]}`")
        lines.append("")
    return lines


def cobatch_lines(c: Dict) -> List[str]:
    if "error" in c:
        return ["## Co-batching", "", f"Failed: `{c['error']}`", ""]
    rows = [[engine, r["bad_kind"], r["counts"]["execution_count"], r["counts"]["inference_count"],
             r["counts"]["batch_sizes"], _mark(r["one_batch"]), _mark(r["goods_correct"]),
             max(e for e in r["good_max_abs_error"] if e is not None) if all(
                 e is not None for e in r["good_max_abs_error"]) else "missing",
             r["bad"].get("error") or f"answered (all NaN: {r['bad'].get('all_nan')})"]
            for engine, r in c.items()]
    return ["## Co-batching", "",
            "Four requests (one bad, in second position) sent together to each engine Triton batches, in a "
            "repository whose batchers wait for a batch of four (max_queue_delay 3 s, preferred size 4).", ""] + \
        _table(["engine", "bad request", "executions", "inferences", "batch sizes", "one batch", "good ones correct",
                "good max |error| vs ORT alone", "the bad one got"], rows) + [""]


def write_summary(results: Dict, out_dir: Path, plots: List[str]) -> Path:
    lines = header_lines(results)
    for name, soak in results.get("soak", {}).items():
        lines += soak_lines(name, soak, f"rss_{name}.png" if f"rss_{name}.png" in plots else None)
    sections = (("overload", overload_lines), ("goodput", goodput_lines), ("faults", faults_lines),
                ("cobatch", cobatch_lines))
    for key, render in sections:
        if key in results:
            lines += render(results[key])
    if "fuzz" in results:
        lines += fuzz_lines(results["fuzz"], "fuzz_answers.png" if "fuzz_answers.png" in plots else None)
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path

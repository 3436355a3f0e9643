"""What the numbers were measured on: CPU, cores, memory, GPU, package versions, machine load."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, Optional, Tuple

PACKAGES = ("torch", "onnxruntime", "onnx", "numpy", "tritonclient", "nvidia-pytriton", "transformers",
            "opencv-python-headless", "pillow", "tokenizers", "matplotlib")


def lscpu() -> Dict[str, str]:
    if not shutil.which("lscpu"):
        return {}
    output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in output.splitlines() if ":" in line)}


def memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def gpu_name() -> Optional[str]:
    """The first CUDA device's name, or None (no torch CUDA build and no nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    return None


def machine_info() -> Dict[str, object]:
    cpu = lscpu()
    return {
        "cpu_model": cpu.get("Model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{cpu.get('CPU family', '?')}/{cpu.get('Model', '?')}",
        "vcpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "isa": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu.get("Flags", "").split()),
        "memory_gib": memory_gib(),
        "gpu": gpu_name(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }


def versions() -> Dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def load_average() -> Optional[tuple]:
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def slug(info: Dict[str, object]) -> str:
    """A folder-name-safe machine label: the GPU's name, else the CPU model and its core count."""
    if info.get("gpu"):
        base = str(info["gpu"])
    else:
        base = f"{info['cpu_model']}-{info['vcpus']}cpu"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def busy_cpu_seconds() -> Optional[float]:
    """CPU seconds the whole machine spent busy since boot (all processes, steal included)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_table() -> Dict[int, Tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and its reaped children) from /proc."""
    ticks, table = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        table[int(entry)] = (int(fields[1]), (utime + stime + cutime + cstime) / ticks)
    return table


def own_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, live (tritonserver, its python-backend
    stubs) or reaped (perf_analyzer runs)."""
    if not os.path.isdir("/proc"):
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system
    table = _process_table()
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier += children
    return sum(table[pid][1] for pid in ours if pid in table)


class CpuShare:
    """How much of the machine other jobs used while a phase ran: (busy - ours) / (wall x CPUs)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds())

    def others(self) -> Optional[float]:
        wall0, busy0, own0 = self.start
        wall, busy = time.perf_counter() - wall0, busy_cpu_seconds()
        if busy is None or busy0 is None or wall <= 0:
            return None
        share = (busy - busy0 - (own_cpu_seconds() - own0)) / (wall * (os.cpu_count() or 1))
        return round(min(max(share, 0.0), 1.0), 3)

    def own_seconds(self) -> float:
        """CPU seconds this process tree (the server, its python-backend stubs, perf_analyzer) used meanwhile:
        the work itself, which other jobs slow down but do not add to."""
        return own_cpu_seconds() - self.start[2]

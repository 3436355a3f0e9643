"""The processes of a running tritonserver, read from Linux's /proc: its python-backend stubs (one per
model instance) and their resident memory.

Triton 2.51 starts one `triton_python_backend_stub` process per python-backend model instance and
never restarts one that dies: the instance then fails every request it is given while the server's
and the model's readiness stay 200.  Watching these processes is the only way to notice.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

STUB_BINARY = "triton_python_backend_stub"
# The stub's argv (python_backend 2.51 stub_launcher): binary, model.py, shm region, shm size, shm growth,
# parent pid, python lib dir, ipc handle, *instance name*, model dir.
STUB_SHM_ARG = 2
STUB_INSTANCE_ARG = 8
SHM_DIR = "/dev/shm"


def children(pid: int) -> List[int]:
    """The live child processes of `pid` (started by any of its threads)."""
    found: List[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as handle:
                found += [int(child) for child in handle.read().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(found))


def state(pid: int) -> Optional[str]:
    """The process's one-letter state (R, S, D, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _stub_argv(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [arg.decode(errors="replace") for arg in handle.read().split(b"\0")]
    except OSError:
        return None
    if len(argv) <= STUB_INSTANCE_ARG or not argv[0].endswith(STUB_BINARY):
        return None
    return argv


def stub_instance(pid: int) -> Optional[str]:
    """The model instance a python-backend stub serves (e.g. 'evf_sam_0_1'), None for other processes."""
    argv = _stub_argv(pid)
    return None if argv is None else argv[STUB_INSTANCE_ARG]


def stub_shm_regions(server_pid: int) -> List[str]:
    """The shared-memory regions (/dev/shm names) of the live stubs of tritonserver `server_pid`.
    Triton unlinks a region when its stub stops cleanly, never after a SIGKILL of the stub or of
    tritonserver: they stay in /dev/shm (RAM) until someone removes them."""
    regions = []
    for pid in stub_processes(server_pid).values():
        argv = _stub_argv(pid)
        if argv is not None:
            regions.append(argv[STUB_SHM_ARG])
    return regions


def remove_shm_regions(names: List[str]) -> List[str]:
    """Unlink those of `names` still in /dev/shm (only names a stub was started with: never another's);
    returns what was removed."""
    removed = []
    for name in names:
        if "/" in name or not name:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            continue
    return removed


def stub_processes(server_pid: int) -> Dict[str, int]:
    """instance name -> pid of every live python-backend stub of the tritonserver `server_pid` (a killed
    stub that Triton has not reaped is a zombie with no command line: it is not listed)."""
    stubs = {}
    for pid in children(server_pid):
        if state(pid) in (None, "Z"):
            continue
        instance = stub_instance(pid)
        if instance is not None:
            stubs[instance] = pid
    return stubs


# /proc/<pid>/status fields that VmRSS is the sum of: private memory, mapped files, and shared memory
# (for tritonserver: the pages of its stubs' /dev/shm regions it has touched).
RSS_KINDS = {"anon": "RssAnon:", "file": "RssFile:", "shmem": "RssShmem:"}


def rss_kinds_bytes(pid: int) -> Optional[Dict[str, int]]:
    """VmRSS of `pid` split by kind (anon, file, shmem), or None when it is gone."""
    found: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                for kind, field in RSS_KINDS.items():
                    if line.startswith(field):
                        found[kind] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return found if len(found) == len(RSS_KINDS) else None


def shm_regions_bytes(server_pid: int) -> int:
    """RAM held by the /dev/shm regions of the live stubs of `server_pid` (tmpfs pages allocated)."""
    held = 0
    for name in stub_shm_regions(server_pid):
        try:
            held += os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512
        except OSError:
            continue
    return held


def shm_region_mappings(pid: int) -> Optional[int]:
    """How many mappings of python-backend /dev/shm regions `pid` holds.  The python backend maps a
    region again, whole and from offset 0, each time it grows, and keeps the earlier mappings: a page
    touched through several of them counts once per mapping in VmRSS (RssShmem)."""
    try:
        with open(f"/proc/{pid}/maps") as handle:
            return sum(1 for line in handle if f"{SHM_DIR}/triton_python_backend_shm_region_" in line)
    except OSError:
        return None


"""Where a benchmark ran: device, versions, threads, date and command (every row and env.json carry it)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """E.g. 'NVIDIA H100 80GB HBM3' or 'Intel(R) Xeon(R) Processor, 2 cores'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_cores()} cores"


def device_slug(device: torch.device) -> str:
    """A folder-friendly device name: 'nvidia-h100-80gb-hbm3', 'cpu-2cores'."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{cpu_cores()}cores"


def package_version(name: str) -> str | None:
    """The installed version of ``name``, read from its metadata (never imports it), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(repo: Path) -> str | None:
    """'<short hash>' of ``repo``'s HEAD, with '+dirty' when the tree has changes; None outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        revision = git("rev-parse", "--short", "HEAD").strip()
        return revision + ("+dirty" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine skews CPU timings), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def describe(device: torch.device, threads: int, argv: list[str]) -> dict:
    """The facts every row carries (device, versions, threads, date) and, for env.json, a few more."""
    import fastattn  # noqa: PLC0415
    from fastattn import info  # noqa: PLC0415

    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "threads": threads,
        "torch": torch.__version__,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        "fastattn": fastattn.__version__,
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastattn_git": git_revision(Path(fastattn.__file__).resolve().parents[1]),
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "load_average_at_start": load_average(),
        "command": " ".join(["python", "-m", "bench", *argv]),
        "fastattn_info": info.report(),
    }

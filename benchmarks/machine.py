"""The machine a benchmark ran on, as one header line printed before its tables.

Contract: `describe()` returns one line: the date and time (UTC), the CPU model, the cores this
process may use (and the machine's count when they differ), total memory, the 1-minute load
average (a busy machine slows every figure), the OS, the llama-cpp-python version and llama.cpp's
own build summary (`llama_print_system_info`: SIMD features, OpenMP, ...). `print_header()` prints
it. Everything is read, nothing is changed; a field that cannot be read says "unknown".
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    found = re.search(r"model name\s*:\s*(.+)", _read("/proc/cpuinfo"))
    return found.group(1).strip() if found else (platform.processor() or platform.machine()
                                                 or "unknown")


def cores() -> str:
    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    return f"{usable} cores" if usable == total else f"{usable} of {total} cores"


def memory() -> str:
    found = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    return f"{int(found.group(1)) / 2**20:.1f} GiB" if found else "unknown memory"


def load() -> str:
    try:
        return f"load {os.getloadavg()[0]:.2f}"
    except OSError:
        return "load unknown"


def llama_build() -> str:
    import llama_cpp

    # "CPU : SSE3 = 1 | AVX2 = 1 | ..." (compile-time flags): kept as the names switched on
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    flags = []
    for part in (p.strip() for p in info.split("|")):
        name, _, value = part.rpartition(" = ")
        if part and value.strip() != "0":
            flags.append(name.replace("CPU : ", "CPU: ") if value.strip() == "1" else part)
    return f"llama-cpp-python {llama_cpp.__version__} ({' '.join(flags)})"


def describe() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distro = ""
    system = f"{platform.system()} {platform.release()}" + (f" ({distro})" if distro else "")
    return (f"machine: {now}; {cpu_name()}, {cores()}, {memory()}, {load()}; {system}; "
            f"Python {platform.python_version()}; {llama_build()}")


def print_header() -> None:
    print(describe(), flush=True)


if __name__ == "__main__":
    print_header()

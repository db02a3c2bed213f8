"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import platform

__all__ = ["cpu_model"]


def cpu_model() -> str:
    """The CPU's model name and its wide-vector features (Linux ``/proc/cpuinfo``): the shared reference box has
    been more than one kind of CPU, and virtual machines often hide the model behind a generic name."""
    name, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if x in have]
                    break
    except OSError:
        pass
    return f"{name} ({', '.join(flags) or 'no AVX2'})"

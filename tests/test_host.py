"""host.keep_freed_memory: glibc keeps a freed large tensor in its heap (checked with mallinfo2 and page faults)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(x) for x in version.split(".")) if name == "glibc" and version else ()


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or _glibc_version() < (2, 33), reason="mallopt and mallinfo2 (glibc >= 2.33)"
)

# In a fresh process (the setting is process-wide): allocate and free a 64 MiB tensor 16 times, reading
# glibc's mallinfo2 (mmapped bytes while the first one is alive, free heap bytes after it is freed) and the
# minor page faults of the last 4 allocations. (glibc 2.36 cannot put a 64-byte-aligned block back into
# the hole its predecessor left, so the kept heap needs a few rounds before holes coalesce and are reused.)
_PROBE = r"""
import ctypes, json, resource, sys
from diffusioninst.engine.host import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "on")
import torch

names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
n = 16 * 2**20  # float32 elements: 64 MiB
x = torch.ones(n)
mmapped_alive = libc.mallinfo2().hblkhd
del x
free_heap = libc.mallinfo2().fordblks
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
out = {"applied": applied, "mmapped_alive": mmapped_alive, "free_heap": free_heap, "faults": sum(faults[-4:])}
print(json.dumps(out))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_tensor_memory_is_reused_without_page_faults():
    size = 64 * 2**20
    on, off = _probe("on"), _probe("off")
    assert on["applied"] is True and off["applied"] is False
    # default glibc: the 64 MiB block is its own mmap, unmapped when freed
    assert off["mmapped_alive"] >= size
    assert off["free_heap"] < size
    # kept: the block comes from the heap, stays there once freed, and the next allocation reuses it
    assert on["mmapped_alive"] < size
    assert on["free_heap"] >= size
    # new memory: one fault per 4 KiB page (16384 per tensor), or per 2 MiB huge page (32) with THP always
    assert on["faults"] < 64
    assert off["faults"] > on["faults"]


def test_disabled_or_other_platforms_change_nothing(monkeypatch):
    from diffusioninst.engine import host

    assert host.keep_freed_memory(False) is False
    monkeypatch.setattr(host.platform, "system", lambda: "Darwin")
    host._glibc_mallopt.cache_clear()  # the C library is looked up once per process
    try:
        assert host.keep_freed_memory(True) is False
    finally:
        host._glibc_mallopt.cache_clear()

"""glibc malloc tuning (comzy/core/memory.py): big messages reuse pages instead of faulting."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Allocates and frees a thousand messages of 256-640 KiB (as the agent link does), then prints
# the minor page faults that took; argv[1] says whether to tune first.
PROBE = """
import resource, sys
from comzy.core.memory import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = []
for i in range(1000):
    held.append(bytes((256 + (i * 97) % 384) * 1024))  # 256-640 KiB, sizes vary as reads do
    if len(held) > 2:  # a message lives while the next ones arrive
        held.pop(0)
held.clear()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc.so.6" not in (ctypes.util.find_library("c") or ""),
    reason="the tuning applies to glibc only")


def probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_tuned_malloc_reuses_pages_for_big_messages() -> None:
    applied, tuned = probe("tune")
    _, untuned = probe("plain")
    assert applied == "True"
    # Untuned, freed pages go back to the system and are faulted in again (about 3,200 here);
    # tuned, they are reused (about 500, mostly the first round).
    assert untuned > 1_500, untuned
    assert tuned < untuned // 3, (tuned, untuned)


@glibc
@pytest.mark.parametrize("setting", [{"MALLOC_MMAP_THRESHOLD_": "262144"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_an_operators_own_malloc_settings_win(setting: dict[str, str]) -> None:
    applied, _ = probe("tune", **setting)
    assert applied == "False"

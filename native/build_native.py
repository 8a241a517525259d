"""cffi build script for ``shmcache._native`` (API mode, compiled at install)."""

import platform
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "shmcache.h").read_text())
ffibuilder.set_source(
    "shmcache._native",
    '#include "shmcache.h"',
    # setuptools wants paths relative to the project root, where builds run
    sources=["native/shmcache.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        # cmpxchg16b: the writers' lock word is one 16-byte CAS
                        *(["-mcx16"] if platform.machine() in ("x86_64", "AMD64") else [])],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""cffi build script for ``shmcache._native`` (API mode, compiled at install)."""

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
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

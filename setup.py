# The native code needs setup(); everything else is in pyproject.toml.
# shmcache._native (cffi, native/shmcache.c) holds everything that touches the
# shared segment; shmcache._codec (native/codec.c) the per-event loops that
# build Python objects, which a cffi function cannot return.
from setuptools import Extension, setup

setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    ext_modules=[
        Extension(
            "shmcache._codec",
            sources=["native/codec.c"],
            include_dirs=["native"],
            depends=["native/shmcache.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        )
    ],
)

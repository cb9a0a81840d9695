"""Builds the optional C decoder; when it cannot be built corem runs on the pure-Python one."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corem.codec._speedups",
            ["corem/codec/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)

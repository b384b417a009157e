"""Build script: everything declarative lives in pyproject.toml.

The optional C++ extension ``fastaccum._C`` (kernels in ``csrc/``) is added here when its
sources exist and ``FASTACCUM_NO_EXT`` is not set. It is built with pybind11 only and
never includes PyTorch headers.
"""
import os
from pathlib import Path

from setuptools import setup

ext_modules = []
cmdclass = {}
_csrc = Path(__file__).parent / "csrc"
if os.environ.get("FASTACCUM_NO_EXT", "0") in ("", "0") and any(_csrc.glob("*.cpp")):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules = [
        Pybind11Extension(
            "fastaccum._C",
            sorted(str(p.relative_to(_csrc.parent)) for p in _csrc.glob("*.cpp")),
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

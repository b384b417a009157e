"""Build script: everything declarative lives in pyproject.toml.

The optional C++ extension ``fastaccum.backends.cpu._C`` (kernels in ``csrc/``) is added here when its
sources exist and ``FASTACCUM_NO_EXT`` is not set. It is built with pybind11 only and
never includes PyTorch headers, so it needs no torch at build time and survives a torch
upgrade.

Instruction sets: the kernels are compiled three times, by three translation units with
their own ``-m`` flags (``isa_scalar.cpp``: none, ``isa_avx2.cpp``: AVX2+FMA+F16C,
``isa_avx512.cpp``: AVX-512 F/BW/VL/DQ), and ``csrc/dispatch.cpp`` picks one at run time
from CPUID. Never ``-march=native``: a wheel or a shared build directory must run on any
x86-64 CPU. setuptools applies one flag set to all of an extension's sources, so the two
ISA files are compiled separately here and linked in as extra objects.

Floating point: ``-O3 -fno-math-errno`` (lets ``sqrt`` inline) and ``-ffp-contract=off``
(the kernels place every FMA explicitly, so the scalar and SIMD paths round identically
and match torch's operation order). No ``-ffast-math``: the kernels rely on IEEE inf/nan
propagation for the found-inf check and on subnormals for bf16/fp16 conversions.

Environment: ``FASTACCUM_NO_EXT=1`` skips the extension (pure-Python install; the
``torch`` backend is used) and removes an earlier in-tree build of it (an editable install
puts ``_C*.so`` beside the sources, where it would still be imported). ``FASTACCUM_DEBUG_EXT=1`` builds with ``-O0 -g``.
"""
import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ext_modules = []
cmdclass = {}
_root = Path(__file__).parent
# The compiled kernels live with the only code that calls them: the cpu backend.
_EXT_NAME = "fastaccum.backends.cpu._C"
_csrc = _root / "csrc"

_ISA_FLAGS = {
    "csrc/isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


_no_ext = os.environ.get("FASTACCUM_NO_EXT", "0") not in ("", "0")

if not _no_ext and any(_csrc.glob("*.cpp")):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    debug = os.environ.get("FASTACCUM_DEBUG_EXT", "0") not in ("", "0")
    common = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    isa_sources = sorted(_ISA_FLAGS)
    base_sources = sorted(
        str(p.relative_to(_root)) for p in _csrc.glob("*.cpp") if str(p.relative_to(_root)) not in _ISA_FLAGS
    )

    class BuildExt(build_ext):
        """pybind11's build_ext plus per-file ISA flags for the SIMD translation units."""

        def build_extension(self, ext):
            if ext.name == _EXT_NAME:
                unix = self.compiler.compiler_type == "unix"
                objects = []
                for src in isa_sources:
                    # Off x86-64 (or with a non-GCC/Clang compiler) the ISA files compile
                    # without flags into empty "not available" tables.
                    flags = _ISA_FLAGS[src] if (unix and _is_x86_64()) else []
                    objects += self.compiler.compile(
                        [src],
                        output_dir=self.build_temp,
                        include_dirs=ext.include_dirs,
                        extra_postargs=list(ext.extra_compile_args) + flags,
                        depends=[str(p.relative_to(_root)) for p in _csrc.glob("*.h")],
                    )
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    ext_modules = [
        Pybind11Extension(
            _EXT_NAME,
            base_sources,
            cxx_std=17,
            extra_compile_args=common,
            # dlopen/dlsym bind torch's OpenMP runtime at run time (csrc/dispatch.cpp)
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            depends=[str(p.relative_to(_root)) for p in _csrc.glob("*.h")],
        )
    ]
    cmdclass = {"build_ext": BuildExt}
elif _no_ext:
    # Skipping the build must not leave an earlier one behind: an editable install builds
    # _C into the source tree, where `import fastaccum` would still find (and load) it.
    for stale in sorted((_root / "fastaccum" / "backends" / "cpu").glob("_C.*")):
        if stale.suffix in (".so", ".pyd"):
            print(f"fastaccum: FASTACCUM_NO_EXT is set: removing the earlier build {stale}", file=sys.stderr)
            stale.unlink()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

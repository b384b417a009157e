"""The ``cpu`` backend: C++ SIMD kernels for CPU tensors.

``backend.py`` routes a bucket's segments to the kernels, ``ops.py`` declares them as
``torch.library`` custom ops, ``_C`` is the compiled extension built from ``csrc/``. Only
this package touches ``_C``; nothing is imported here, so importing the package never
needs the extension (the registry imports ``backend`` and reports why it failed).
"""

"""fastaccum's command-line tools (``fastaccum bench``, ``fastaccum plan``) and their helpers.

Built on top of the library using only its public names (``fastaccum.__all__``); nothing in
the library imports this package. ``plan`` never imports the bench harness: what both need
lives in ``memory`` (RSS/CUDA probes) and ``units`` (sizes and counts).
"""

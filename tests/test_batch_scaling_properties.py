"""Property tests for the half-life helpers (needs hypothesis, which is not in the `test`
extra yet: skipped where it is missing; tests/test_batch_scaling.py covers a grid)."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastaccum.batch_scaling import beta_for_halflife, halflife_tokens, scale_betas  # noqa: E402

betas = st.floats(min_value=1e-6, max_value=1 - 1e-9)
sizes = st.floats(min_value=1e-3, max_value=1e9)


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ in the tree
@given(beta=betas, tokens=sizes)
def test_beta_for_halflife_inverts_halflife_tokens(beta, tokens):
    assert beta_for_halflife(halflife_tokens(beta, tokens), tokens) == pytest.approx(beta, rel=1e-9)


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ in the tree
@given(beta=betas, b_from=sizes, b_to=sizes)
def test_scale_betas_preserves_halflife(beta, b_from, b_to):
    new = scale_betas((0.9, beta), b_from, b_to)[1]
    # near 1, 1 - β keeps only ~eps/(1 - β) relative precision (and the power underflows to
    # 0 far below): check where the float result can hold the half-life to 1e-6
    if 0.0 < new < 1.0 - 1e-7:
        assert halflife_tokens(new, b_to) == pytest.approx(halflife_tokens(beta, b_from), rel=1e-6)

"""The ggml backend as the tests make it: scripts/setup.sh installs it, so a missing ggml fails the
tests that take it (clearly: GgmlUnavailable names what to install), it never skips them."""

from __future__ import annotations

import pytest

GGML_THREADS = 2  # the CI machine's cores


def make_ggml():
    from compute.ggml.backend import GgmlBackend

    return GgmlBackend(n_threads=GGML_THREADS)


def ggml_param():
    """A pytest param whose value makes a ggml backend."""
    return pytest.param(make_ggml, id="ggml")

"""The unit tests' shared fixture: each fabricated runtime kind the engine loop drives."""

import pytest

from .engine_fakes import CountingRuntime, MultiStepRuntime, OverlappingRuntime, TwoAheadRuntime


@pytest.fixture(
    params=[CountingRuntime, OverlappingRuntime, TwoAheadRuntime, MultiStepRuntime],
    ids=["sync", "overlapped", "ahead2", "multi-step"],
)
def Runtime(request):
    """A fabricated runtime class: synchronous, overlapped, two steps ahead, or multi-step."""
    return request.param

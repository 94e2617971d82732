"""Fixtures shared by the trainer and checkpoint tests."""

import logging

import pytest


@pytest.fixture
def warnings_seen():
    """Messages of undertow's warnings (its logger does not propagate to pytest's caplog)."""
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("undertow").addHandler(handler)
    yield seen
    logging.getLogger("undertow").removeHandler(handler)

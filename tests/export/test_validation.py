"""Validation figures and tolerances."""
from __future__ import annotations

import numpy as np

from movq_deploy.export.validation import _tolerance_failures, _worst, compare


def test_a_known_slot_losing_its_infinite_confidence_fails_validation():
    feeds = {"tokens": np.array([[16, 3]], dtype=np.int32)}
    reference = [np.array([[5, 3]], np.int32), np.array([[-1.0, np.inf]], np.float32)]
    sabotaged = [np.array([[5, 3]], np.int32), np.array([[-1.0, 0.0]], np.float32)]
    errors = _worst([compare("prior", reference, reference, feeds),
                             compare("prior", reference, sabotaged, feeds)])
    assert errors["token_mismatches"] == 0 and errors["max_confidence_error"] != errors["max_confidence_error"]
    assert _tolerance_failures("prior", errors) == ["max_confidence_error = nan > 0.001"]

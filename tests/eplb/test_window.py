"""The sliding window of expert load: the sum of the last `window_steps` reports."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.eplb.window import ExpertLoadWindow
from afdserve.errors import UserInputError


def test_the_window_slides_over_dense_reports():
    w = ExpertLoadWindow(2, 3, window_steps=3)
    steps = [np.full((2, 3), i) * [[1, 2, 3], [0, 1, 0]] for i in range(1, 8)]
    for i, step in enumerate(steps):
        w.add(step if i % 2 else step.tolist())  # numpy or nested lists
        want = sum(steps[max(0, i - 2) : i + 1])
        assert w.steps() == min(i + 1, 3) and w.total().tolist() == want.tolist()
    assert w.total().dtype == np.int64 and w.total().shape == (2, 3)
    assert w.total_pairs == sum(steps).tolist()  # since start, not windowed


def test_mapping_reports_fill_the_other_layers_with_zeros():
    w = ExpertLoadWindow(2, 3, window_steps=2)
    w.add({0: [1, 0, 0]})
    w.add({0: [0, 2, 0], 1: [1, 1, 1]})
    w.add({"0": [0, 0, 3]})  # a JSON key
    assert w.total().tolist() == [[0, 2, 3], [1, 1, 1]] and w.steps() == 2
    assert w.total_pairs == [[1, 2, 3], [1, 1, 1]]
    total = w.total()
    total[0, 0] = 99  # a copy
    assert w.total()[0, 0] == 0
    w.reset()
    assert w.steps() == 0 and not w.total().any() and w.total_pairs[0] == [1, 2, 3]
    w.add({1: [4, 0, 0]})
    assert w.total().tolist() == [[0, 0, 0], [4, 0, 0]]


@pytest.mark.parametrize(
    "counts,match",
    [
        ({0: [1, 2]}, r"layer 0 have shape \(2,\)"),
        ({2: [1, 2, 3]}, "window has 2 layers"),
        ({"x": [1, 2, 3]}, "not a layer index"),
        ({1: [1, -1, 0]}, ">= 0"),
        ({1: [1.5, 0, 0]}, "integers"),
        ({1: [True, False, True]}, "integers"),
        ({1: [[1], [2, 3], [4]]}, "shape"),
        ([[1, 2, 3]], "1 layers, the window has 2"),
        ([[1, 2, 3], [1, 2]], r"layer 1 have shape \(2,\)"),
        (np.zeros((2, 4), dtype=np.int64), r"shape \(4,\)"),
        (np.zeros((2, 3)), "integers"),  # float counts
        ("abc", "must be"),
        (7, "must be"),
    ],
)
def test_bad_reports_are_refused_and_leave_the_window_alone(counts, match):
    w = ExpertLoadWindow(2, 3, window_steps=2)
    w.add({0: [1, 1, 1]})
    with pytest.raises(UserInputError, match=match):
        w.add(counts)
    assert w.steps() == 1 and w.total().tolist() == [[1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("args", [(0, 3, 2), (2, 0, 2), (2, 3, 0), (2, 3, 1.5)])
def test_bad_sizes_are_refused(args):
    with pytest.raises(UserInputError, match=">= 1"):
        ExpertLoadWindow(*args)

"""The class palette of the prediction pictures: its ignore colour and its arguments."""

from __future__ import annotations

import numpy as np
import pytest

from crfrnn_deeplab.data import voc_colormap
from crfrnn_deeplab.visualize import palette


def test_the_ignore_index_is_drawn_white():
    colours = palette(3, ignore_index=0)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0], [255, 255, 255])
    np.testing.assert_array_equal(colours[1:], voc_colormap()[1:])


@pytest.mark.parametrize("kwargs, error, match", [
    # 300 was a bare IndexError; -1 silently drew entry 255 white
    ({"ignore_index": 300}, ValueError,
     r"ignore_index must be in 0\.\.255 \(an entry of the 256-colour map\), got 300"),
    ({"ignore_index": -1}, ValueError, r"ignore_index must be in 0\.\.255 .*, got -1"),
    ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int, got float 1.5"),
    ({"ignore_index": True}, TypeError, r"ignore_index must be an int, got bool True"),
    ({"num_classes": 0}, ValueError, r"num_classes must be in 1\.\.256, got 0"),
    ({"num_classes": "3"}, TypeError, r"num_classes must be an int, got str '3'"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        palette(**{"num_classes": 3, **kwargs})

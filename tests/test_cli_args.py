"""cli/_args.py: the argument parsers shared by the sub-commands."""

from __future__ import annotations

import pytest

from napari_muvit.cli._args import parse_region
from napari_muvit.errors import InputError


def test_region_options_share_one_parser() -> None:
    from napari_muvit.cli import predict as cli_predict
    from napari_muvit.cli import train as cli_train

    # predict --region and train --val-region parse the same way (no int/float split)
    assert cli_predict.parse_region is parse_region and cli_train.parse_region is parse_region
    assert parse_region("0, 8.5,30,40", "--val-region") == [[0.0, 8.5], [30.0, 40.0]]
    assert parse_region("1, 2,30,40") == [[1, 2], [30, 40]]


def test_bad_regions_name_the_option() -> None:
    with pytest.raises(InputError, match=r"^--val-region: expected y0 < y1 and x0 < x1"):
        parse_region("3,3,1,9", "--val-region")
    with pytest.raises(InputError, match=r"^--region: expected four numbers y0,x0,y1,x1, got '1,"):
        parse_region("1,2,3")
    with pytest.raises(InputError, match=r"^--region: expected four numbers"):
        parse_region("0,0,a,9")

"""The training config's checks (train/config.py): the edges of each range, the warm-up cut."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from marsvision.runtime.errors import MarsvisionError
from marsvision.train.config import config_from_flags, seed_in_range


def _config(**flags: Any) -> Any:
    return config_from_flags("default", data=Path("d"), out=Path("o"), **flags)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ({"crop_scale_min": 0.0}, "--crop-scale-min 0.0: must be in (0, 1]"),
        ({"batch_size": 1}, "--batch-size 1: need at least 2 (BatchNorm)"),
        ({"seed": 2**63}, f"--seed {2**63}: must be in [0, 2^63)"),
        ({"workers": -1}, "--workers -1: cannot be negative"),
    ],
)
def test_the_first_value_outside_each_range_is_refused(flags: dict[str, Any], says: str) -> None:
    with pytest.raises(MarsvisionError, match=re.escape(says)):
        _config(**flags)


def test_the_last_value_inside_each_range_is_taken() -> None:
    cfg = _config(crop_scale_min=1.0, batch_size=2, seed=2**63 - 1, workers=0)
    assert cfg.augment.scale == (1.0, 1.0) and cfg.batch_size == 2
    assert cfg.seed == 2**63 - 1 and cfg.workers == 0
    # "--store-size 64: must be at least --image-size 64" refused what it asked for
    assert _config(image_size=64, store_size=64).store_size == 64
    assert _config(select_from=0.0).select_from == 0.0
    assert _config(select_from=1.0).select_from == 1.0
    assert seed_in_range(0) and not seed_in_range(-1) and not seed_in_range(2**63)


def test_a_warmup_over_half_the_run_but_shorter_than_it_is_cut_to_half() -> None:
    """3 warm-up epochs of a 4-epoch run: cut to 2 (the run would decay over one epoch)."""
    assert _config(epochs=4, warmup_epochs=3.0).warmup_epochs == 2.0
    assert _config(epochs=4, warmup_epochs=2.0).warmup_epochs == 2.0

"""A resume on another number of ranks keeps the global batch but changes what `window: micro` spans."""

from __future__ import annotations

import logging

from irdro.config import Recipe, ReweightConfig
from irdro.train import warn_layout_change


def test_resume_on_other_ranks_warns_with_both_micro_window_sizes(caplog):
    recipe = Recipe(
        output_dir="x",
        micro_batch_size=4,
        grad_accum_steps=2,
        reweight=ReweightConfig(scheme="irdro"),
    )
    with caplog.at_level(logging.WARNING, logger="irdro.train"):
        warn_layout_change(recipe, old_dp=2, new_dp=4)
    assert "now spans 16 samples (was 8)" in caplog.text and "reweight.window=step" in caplog.text


def test_step_window_and_erm_do_not_change_meaning(caplog):
    with caplog.at_level(logging.WARNING, logger="irdro.train"):
        warn_layout_change(Recipe(output_dir="x", reweight=ReweightConfig(scheme="irdro", window="step")), 2, 4)
        warn_layout_change(Recipe(output_dir="x", reweight=ReweightConfig(scheme="erm")), 2, 4)
    assert not caplog.text

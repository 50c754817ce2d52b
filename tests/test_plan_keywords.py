"""The library's plan(...) takes settings as keywords: a misspelt one is a clear TypeError naming the nearest
setting, not a bare KeyError from inside the settings table."""

import pytest

import rdbt_cli
from rdbt_cli import LoadParams


def test_a_keyword_that_is_no_setting_names_the_nearest_one(shared_tiny):
    for keyword, needle in [("stepz", "stepz=3, which is no setting; did you mean 'steps'?"),
                            ("nag-scale", "did you mean 'nag_scale'?"), ("CFG", "did you mean 'cfg'?"),
                            ("wibble", "no setting (the settings: prompt, negative, steps")]:
        with pytest.raises(TypeError) as err:
            rdbt_cli.plan("x", LoadParams(model="tiny"), **{keyword: 3})
        assert needle in str(err.value), err.value
    jobs, _, _ = rdbt_cli.plan("x", LoadParams(model="tiny"), steps=3, size="64x32")  # size as --size takes it
    assert (jobs[0].settings.steps, jobs[0].settings.width, jobs[0].settings.height) == (3, 64, 32)

"""Mixing MIP rows to a token share, with a warm-up ramp."""

import numpy as np

from stages.data.mix import choose_mip_count, mip_positions, round_robin_rank


def test_round_robin_rank():
    groups = np.array([0, 0, 0, 1, 2, 2])
    locals_ = np.array([0, 1, 2, 0, 0, 1])
    ranks = round_robin_rank(groups, locals_, {0: 3, 1: 1, 2: 2})
    assert ranks.tolist() == [0, 3, 5, 1, 2, 4]


def test_mip_count_hits_the_token_share():
    m = choose_mip_count(950_000, np.full(1000, 200), 0.05)
    assert abs(m * 200 / (950_000 + m * 200) - 0.05) < 0.0005
    assert choose_mip_count(1000, np.array([]), 0.05) == 0
    assert choose_mip_count(1000, np.array([5000]), 0.05) == 0  # one row would overshoot by far


def test_positions_spread_evenly_and_ramp_up():
    pos = mip_positions(950, 50, 0)
    assert len(set(pos.tolist())) == 50 and pos.max() < 1000
    assert np.all(np.diff(pos) >= 19) and np.all(np.diff(pos) <= 21)
    ramp = mip_positions(950, 50, 400)
    assert (ramp < 200).sum() < (ramp >= 800).sum()  # fewer MIP rows early
    assert len(set(ramp.tolist())) == 50 and ramp.max() < 1000

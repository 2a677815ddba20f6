"""The numbers behind the OOD and calibration modes, on hand-made inputs."""
import numpy as np
import pytest

from eval_wrn_ebm import expected_calibration_error, ood_metrics


def test_ece_equals_the_value_worked_out_by_hand():
    # bin (14/15, 1]:  0.95, 0.95 -> accuracy 1/2, confidence 0.95: gap 0.45, weight 2/5
    # bin (8/15, 9/15]: 0.55, 0.55 -> accuracy 1,   confidence 0.55: gap 0.45, weight 2/5
    # bin (4/15, 5/15]: 0.30       -> accuracy 0,   confidence 0.30: gap 0.30, weight 1/5
    ece, bins = expected_calibration_error([0.95, 0.95, 0.55, 0.55, 0.3], [1, 0, 1, 1, 0])
    assert ece == pytest.approx(0.4 * 0.45 + 0.4 * 0.45 + 0.2 * 0.3)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2]
    assert bins[14]["accuracy"] == 0.5 and bins[14]["confidence"] == pytest.approx(0.95)
    assert bins[0]["accuracy"] is None  # an empty bin has no accuracy, not 0


def test_ece_averages_within_a_bin_before_taking_the_gap():
    # both in the last bin (14/15, 1]: |1/2 - 0.96| =
    # 0.46, not the mean per-example gap (0.06 + 0.98) / 2
    assert expected_calibration_error([0.94, 0.98], [1, 0])[0] == pytest.approx(0.46)


def test_ece_bins_are_closed_on_the_right_and_cover_0_and_1():
    _, bins = expected_calibration_error([0.0, 1 / 15, 1.0], [0, 0, 1])
    assert bins[0]["count"] == 2 and bins[14]["count"] == 1
    assert expected_calibration_error([1.0, 1.0], [1, 1])[0] == 0


def test_perfectly_separated_scores_give_auroc_1_and_reversed_scores_auroc_0():
    inside, outside = np.array([3.0, 4.0, 5.0]), np.array([-1.0, 0.0, 1.0])
    assert ood_metrics(inside, outside) == {"auroc": 1.0, "aupr": 1.0, "fpr_at_95_tpr": 0.0}
    reversed_ = ood_metrics(outside, inside)
    assert reversed_["auroc"] == 0.0 and reversed_["fpr_at_95_tpr"] == 1.0


def test_fpr_at_95_tpr_is_the_false_positive_rate_where_95_percent_of_inliers_pass():
    inside = np.arange(100, dtype=float)  # the threshold keeping 95 inliers is 5
    outside = np.array([-1.0, 4.5, 5.5, 6.0])  # two of the four outliers score above it
    assert ood_metrics(inside, outside)["fpr_at_95_tpr"] == 0.5

"""The paired rule for "won" and "can tell" (scores.summarise, docs/summary.md "Paired rule") and
the verdict worded from it, on hand-made per-query scores: no model needed."""

import numpy as np
import pytest

from promptdistill import scores
from promptdistill.verdict import verdict

N_BOOT = 20000  # the hand-made cases below sit near a percentile; many resamples keep them off the knife's edge


def overlap(a: dict, b: dict) -> bool:
    """The old, unpaired test: do two answerers' own 95% CIs overlap?"""
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def test_overlapping_cis_but_a_clearly_positive_paired_difference_is_won():
    # Queries differ a lot in difficulty (base 0 to 1), and on every one the student is about 0.05
    # higher: each answerer's own CI is as wide as the spread of difficulty, the difference's is not.
    base = np.linspace(0.0, 1.0, 30)
    student = base + 0.05 + 0.01 * np.cos(np.arange(30))
    ceiling = base + 0.1
    q = scores.summarise(student, base, ceiling, N_BOOT)
    assert overlap(q["student"], q["base"]) and overlap(q["ceiling"], q["base"])  # the old rule: not won, cannot tell
    assert q["student_minus_base"]["ci95"][0] > 0.04 and q["ceiling_minus_base"]["ci95"][0] > 0.09
    assert q["can_tell"] is True and q["won"] is True


def test_separate_cis_but_a_paired_difference_that_reaches_below_zero_is_not_won():
    # Four queries; on the fourth the student scores 0 where the base scores 3. A resample that draws
    # it three times (P 4 x (1/4)^3 x 3/4 = 4.7%) pulls the student down and the base up at once.
    # Unpaired, those tails are counted apart: the student's 2.5% percentile is 2.0 (P(mean <= 1.5)
    # = 2.0%), the base's 97.5% is 1.75 (P(mean >= 2.25) = 2.0%), no overlap. Paired, the differences
    # are [15, 8, 8, -3], and a resample of three -3 and one 8 averages -0.25 (P 3.1%, plus 0.4% of
    # four -3): the difference's 2.5% percentile is below 0.
    student, base = np.array([9.0, 6.0, 8.0, 0.0]), np.array([-6.0, -2.0, 0.0, 3.0])
    q = scores.summarise(student, base, np.full(4, 12.0), N_BOOT)
    assert q["student"]["ci95"][0] == pytest.approx(2.0) and q["base"]["ci95"][1] == pytest.approx(1.75)
    assert not overlap(q["student"], q["base"])  # the old rule: won
    assert q["student_minus_base"]["mean"] == pytest.approx(7.0)
    assert q["student_minus_base"]["ci95"][0] == pytest.approx(-0.25)
    assert q["can_tell"] is True and q["won"] is False


def quality(student_fidelity: np.ndarray) -> dict:
    """Per-query scores for 20 queries: fidelity (lower is closer, ceiling 0) from the given student
    KLs; likelihood won clearly; similarity whose ceiling sits on its base (cannot tell)."""
    i = np.arange(20)
    base_kl = 0.2 + 0.01 * (i % 7)
    swing = np.where(i % 2 == 0, 0.05, -0.05)
    nll_base = 2.2 + 0.05 * (i % 5)
    sim_base = 0.3 + 0.02 * (i % 3)
    return {
        "fidelity": scores.summarise(student_fidelity(base_kl), base_kl, np.zeros(20), 2000),
        "likelihood": scores.summarise(nll_base - 0.3, nll_base, nll_base - 0.4 + 0.01 * (i % 2), 2000),
        "similarity": scores.summarise(sim_base + 0.1, sim_base, sim_base + swing, 2000),
    }


def test_the_verdict_counts_won_scores_that_can_tell_and_names_the_mute_ones():
    tokens = {"input_reduction_pct": 90.0}
    q = quality(lambda base: 0.25 * base)
    assert [q[n]["can_tell"] for n in q] == [True, True, False]
    text = verdict({"quality": q, "tokens": tokens})
    assert text.startswith("The distillation worked; fidelity retained 75% (95% CI 75% to 75%)")
    assert "cannot tell on this run: similarity (the paired 95% CI of ceiling - base includes 0), left out" in text

    worse = quality(lambda base: base + 0.02)  # the student further from the teacher than the base on every query
    text = verdict({"quality": worse, "tokens": tokens})
    assert text.startswith("The distillation did not work") and "likelihood only" in text and "partly" not in text

    nothing = {"similarity": q["similarity"]}
    assert verdict({"quality": nothing, "tokens": tokens}).startswith("No score can tell")

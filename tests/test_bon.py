"""Best-of-N selectors on hand-worked candidate sets."""


from edu_prm_jax.evaluation.bon import (
    Candidate,
    majority_vote,
    most_confident,
    prm_best,
    select_all,
    weighted_vote,
)


def _c(answer, correct, scores):
    return Candidate(answer, correct, scores)


CANDS = [
    _c("5", False, [0.9, 0.2, 0.8]),  # min .2, last .8, product .144, mean .633
    _c("7", True, [0.6, 0.5, 0.7]),  # min .5, last .7, product .21, mean .6
    _c("5", False, [0.3, 0.95]),  # min .3, last .95, product .285, mean .625
    _c(None, False, [0.99]),  # no answer: scored by PRM selectors, never votes
]


def test_aggregators_pick_by_hand():
    assert prm_best(CANDS, "min") is CANDS[3]  # .99 > .5 > .3 > .2 ; the answerless one wins -> wrong
    assert prm_best(CANDS[:3], "min") is CANDS[1]
    assert prm_best(CANDS[:3], "last") is CANDS[2]
    assert prm_best(CANDS[:3], "product") is CANDS[2]
    assert prm_best(CANDS[:3], "mean") is CANDS[0]


def test_votes_by_hand():
    assert majority_vote(CANDS).answer == "5"  # 2 votes vs 1; None never votes
    assert weighted_vote(CANDS, "min").answer == "5"  # 5: .2+.3 = .5 ; 7: .5 -> a tie, the first seen wins
    confident_minority = [_c("5", False, [0.1]), _c("5", False, [0.1]), _c("7", True, [0.9])]
    assert majority_vote(confident_minority).answer == "5"
    assert weighted_vote(confident_minority, "min").answer == "7"  # .9 > .1 + .1
    assert majority_vote([_c(None, False, [1.0])]) is None


def test_weighted_vote_tie_goes_to_first_seen():
    cands = [_c("5", False, [0.25]), _c("7", True, [0.5]), _c("5", False, [0.25])]
    assert weighted_vote(cands, "min").answer == "5"


def test_select_all():
    res = select_all(CANDS)
    assert res["prm_min"] is False and res["majority"] is False and res["pass@n"] is True
    assert select_all(CANDS[:3])["prm_min"] is True


def test_policy_logprob_picks_the_candidate_the_policy_was_surest_of():
    cands = [Candidate("5", False, [0.9], mean_logprob=-0.4), Candidate("7", True, [0.1], mean_logprob=-0.1),
             Candidate("8", False, [0.5], mean_logprob=None), Candidate("9", False, [0.2], mean_logprob=-0.1)]
    assert most_confident(cands) is cands[1]  # -0.1 ties with the last one: the first seen wins
    res = select_all(cands)
    assert res["policy_logprob"] is True and res["prm_min"] is False
    assert most_confident(CANDS) is None  # nothing recorded: no pick, and the selector counts it wrong
    assert select_all(CANDS)["policy_logprob"] is False

"""Best-of-N report tables on hand-worked summaries."""

from edu_prm_jax.evaluation.report import bon_table, summarise, token_table


def _row(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_token_table_compares_a_short_tree_with_ht_at_equal_candidates():
    # HT: 480 tokens for 16 samples = 30 per sample. EDU filled 4 leaves of its 16 with 80 tokens: 80 / 480 at
    # equal N, but 80 / (4 * 30) = 0.67 against as many HT samples. P-EDU: 2 leaves, 60 tokens -> 60 / 60.
    summary = {("ht", 16): {"tokens": (480.0, 0.0)},
               ("edu", 16): {"tokens": (80.0, 0.0), "candidates": (4.0, 0.0)},
               ("p-edu", 16): {"tokens": (60.0, 0.0), "candidates": (2.0, 0.0)}}
    header, _, row = token_table(summary).splitlines()
    cells = dict(zip(_row(header), _row(row)))
    assert cells["EDU candidates"] == "4.0" and cells["EDU / HT"] == "0.17"
    assert cells["EDU / HT, equal candidates"] == "0.67"
    assert cells["P-EDU / HT, equal candidates"] == "1.00"
    del summary[("p-edu", 16)]  # P-EDU off; and a tree that produced nothing has no per-candidate cost
    summary[("edu", 16)] = {"tokens": (0.0, 0.0), "candidates": (0.0, 0.0)}
    cells = dict(zip(_row(header), _row(token_table(summary).splitlines()[2])))
    assert cells["P-EDU candidates"] == cells["P-EDU tokens"] == "nan"
    assert cells["EDU / HT"] == "0.00" and cells["EDU / HT, equal candidates"] == "nan"


def test_bon_table_shows_candidates_and_seed_spread():
    runs = [{"sampler": "edu", "n": 4, "seed": s, "tokens": 60.0 + 2 * s, "candidates": 3.0 + s, "majority": acc}
            for s, acc in ((0, 0.5), (1, 0.75))]
    header, _, row = bon_table(summarise(runs), ["majority"]).splitlines()
    cells = dict(zip(_row(header), _row(row)))
    assert cells["majority"] == "62.5 ± 17.7"  # mean .625, sample std .1768
    assert cells["candidates / question"] == "3.5"
    assert cells["distinct tokens / question"] == "61 ± 1"
    assert cells["seeds"] == "2"

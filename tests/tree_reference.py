"""An independent count of a tree's token cost, for tests of the sampler's and the records' own counts."""

from collections.abc import Iterable, Sequence


def distinct_prefixes(token_lists: Iterable[Sequence[int]]) -> int:
    """Tokens a tree generated: the number of distinct non-empty prefixes over its paths (a shared prefix is
    generated once)."""
    return len({tuple(tokens[: i + 1]) for tokens in token_lists for i in range(len(tokens))})

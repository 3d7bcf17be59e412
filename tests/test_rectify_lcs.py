"""The bit-parallel LCS against a brute-force dynamic programme on random token lists."""
import random
import time

import pytest

from spot.rectify.lcs import change_ratio, lcs_alignment, lcs_length


def brute_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _random_pair(rng):
    vocab = rng.choice([2, 3, 5, 20, 1000])
    n, m = rng.randint(0, 90), rng.randint(0, 90)
    a = [rng.randrange(vocab) for _ in range(n)]
    if rng.random() < 0.5:  # a "correction": b is an edited copy of a
        b = [t if rng.random() > 0.3 else rng.randrange(vocab) for t in a]
        b = [t for t in b if rng.random() > 0.1] + [rng.randrange(vocab) for _ in range(rng.randint(0, 9))]
    else:
        b = [rng.randrange(vocab) for _ in range(m)]
    return a, b


@pytest.mark.parametrize("seed", range(4))
def test_lcs_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(100):
        a, b = _random_pair(rng)
        truth = brute_lcs(a, b)
        assert lcs_length(a, b) == truth
        assert lcs_length(b, a) == truth
        pairs = lcs_alignment(a, b)
        assert len(pairs) == truth
        assert all(a[i] == b[j] for i, j in pairs)
        assert all(i1 < i2 and j1 < j2 for (i1, j1), (i2, j2) in zip(pairs, pairs[1:]))
        expected = 1.0 if not b else 1 - truth / len(b)
        assert change_ratio(a, b) == pytest.approx(expected)


def test_lcs_edge_cases():
    assert lcs_length([], []) == 0 and lcs_alignment([], [1]) == []
    assert lcs_length([1, 2, 3], [1, 2, 3]) == 3 and change_ratio([1, 2, 3], [1, 2, 3]) == 0.0
    assert change_ratio([1, 2], []) == 1.0
    assert lcs_length("abcbdab", "bdcaba") == brute_lcs("abcbdab", "bdcaba") == 4
    with pytest.raises(TypeError, match="a must be"):
        lcs_length(5, [1])


def test_lcs_is_fast_on_8k_tokens():
    rng = random.Random(0)
    a = [rng.randrange(30000) for _ in range(8192)]
    b = [t if rng.random() > 0.2 else rng.randrange(30000) for t in a]
    t0 = time.perf_counter()
    n = lcs_length(a, b)
    pairs = lcs_alignment(a, b)
    elapsed = time.perf_counter() - t0
    assert len(pairs) == n >= 0.75 * len(a)
    assert all(a[i] == b[j] for i, j in pairs)
    assert elapsed < 10, f"8k-token LCS + alignment took {elapsed:.2f}s"

"""Exact longest common subsequence of two token lists, bit-parallel.

SPoT keeps a pair only when the Oracle's correction ``y+`` stays close to the student's answer
``y-``: the change ratio ``1 - LCS(y-, y+) / |y+|`` must be at most ``gamma``. That needs the true
LCS (difflib's ``SequenceMatcher`` is a heuristic with "autojunk" and is not an LCS).

Algorithm (Allison-Dix / Crochemore et al. bit-vector LCS): index the positions of ``b`` by token,
``M[c] = sum of 2^j over j with b[j] == c``. Keep one ``|b|``-bit vector ``S`` (all ones at first)
and for each token ``c`` of ``a``::

    U = S & M[c]
    S = ((S + U) | (S - U)) & ones

After ``i`` tokens of ``a``, the DP row is encoded by the zero bits of ``S_i``:
``L[i][j] = j - popcount(S_i & (2^j - 1))`` and ``LCS = |b| - popcount(S_n)``. The carry of the
addition does the row's max-propagation, so a row costs a few word operations per 64 tokens of
``b``: ``O(|a| |b| / 64)``. Python's arbitrary-size integers are the bit vectors (no word-size
limit and no carries to handle by hand); 8k x 8k tokens take a few milliseconds.

For the alignment (which tokens of ``y+`` are matched, for ``--masks``) the rows ``S_i`` are kept
and the standard traceback walks from ``(n, m)``: a diagonal step when the tokens are equal (then
``L[i][j] = L[i-1][j-1] + 1`` always holds), otherwise toward the larger of ``L[i-1][j]`` and
``L[i][j-1]``; every ``L`` is one masked popcount.
"""
from __future__ import annotations

__all__ = ["lcs_length", "lcs_alignment", "change_ratio"]


def _masks(b):
    masks = {}
    for j, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << j)
    return masks


def _rows(a, b, keep):
    masks = _masks(b)
    ones = (1 << len(b)) - 1
    s = ones
    rows = [s] if keep else None
    for tok in a:
        u = s & masks.get(tok, 0)
        if u:
            s = ((s + u) | (s - u)) & ones
        if keep:
            rows.append(s)
    return s, rows


def _check(a, b):
    for name, x in (("a", a), ("b", b)):
        if isinstance(x, (str, bytes)):
            continue
        try:
            len(x)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of hashable tokens, "
                            f"got {type(x).__name__}") from None
    return list(a), list(b)


def lcs_length(a, b):
    """Length of the longest common subsequence of the token sequences ``a`` and ``b``."""
    a, b = _check(a, b)
    if len(a) > len(b):  # loop over the shorter side, the bit vector spans the longer one
        a, b = b, a
    if not a:
        return 0
    s, _ = _rows(a, b, keep=False)
    return len(b) - s.bit_count()


def lcs_alignment(a, b):
    """Matched index pairs ``[(i, j), ...]`` of one longest common subsequence, increasing in both
    ``i`` (into ``a``) and ``j`` (into ``b``)."""
    a, b = _check(a, b)
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    _, rows = _rows(a, b, keep=True)

    def L(i, j):
        return j - (rows[i] & ((1 << j) - 1)).bit_count()

    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif L(i - 1, j) >= L(i, j - 1):
            i -= 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def change_ratio(rejected, chosen):
    """SPoT's proximity measure ``1 - LCS(y-, y+) / |y+|`` on token ids (1.0 for an empty ``y+``)."""
    if len(chosen) == 0:
        return 1.0
    return 1.0 - lcs_length(rejected, chosen) / len(chosen)

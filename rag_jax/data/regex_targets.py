"""Concrete training targets for answers given as regular expressions
(CuratedTrec).

A generator cannot be trained on a pattern. The RAG paper (appendix, "Further
details on open-domain QA") retrieves passages for each question and trains on
the string that most often matches the pattern in them; when nothing matches
it falls back to a heuristic: expand the pattern's syntax tree into the strings
it spells, with every non-deterministic piece replaced by a space. Both halves
are here as pure functions; ``regex_target`` combines them.

Patterns are matched as DPR matches CuratedTrec answers (its
``regex_match``): NFD-normalised, case-insensitive, Unicode, multiline.
"""
from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter
from typing import Iterable

# Python 3.11 moved sre_parse here; it is the parser ``re`` itself uses, so an
# expansion sees exactly the tree that matching does.
from re import _constants as C
from re import _parser as P

FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE
EXPANSION_LIMIT = 16


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The pattern as DPR compiles it; raises ``re.error`` when it is not a regex."""
    return re.compile(unicodedata.normalize("NFD", pattern), FLAGS)


def _squash(text: str) -> str:
    return " ".join(text.split())


def most_frequent_match(pattern: str, passages: Iterable[str]) -> str | None:
    """The most frequent non-blank match of ``pattern`` over all ``passages``
    (every match of every passage counts; whitespace inside a match is
    collapsed), ties going to the match seen first; None when nothing matches.
    Matches are returned NFC-normalised (matching runs on NFD text, as DPR's)."""
    rx = compile_pattern(pattern)
    counts: Counter[str] = Counter()
    for text in passages:
        for m in rx.finditer(unicodedata.normalize("NFD", text)):
            s = _squash(unicodedata.normalize("NFC", m.group(0)))
            if s:
                counts[s] += 1
    if not counts:
        return None
    # Counter keeps insertion order and most_common's sort is stable: ties
    # resolve to the first match seen.
    return counts.most_common(1)[0][0]


def _product(parts: list[list[str]], limit: int) -> list[str]:
    out = [""]
    for options in parts:
        out = [a + b for a, b in itertools.islice(itertools.product(out, options), limit)]
    return out


def _expand_items(items: Iterable[tuple], limit: int) -> list[str]:
    return _product([_expand_item(op, av, limit) for op, av in items], limit)


def _expand_item(op: object, av: object, limit: int) -> list[str]:
    if op is C.LITERAL:
        return [chr(av)]
    if op is C.IN:
        # A class of plain characters ([Cc]) is a choice among them; ranges,
        # categories (\d, \s) and negated classes are not spelled out.
        if av and all(o is C.LITERAL for o, _ in av):
            return [chr(c) for _, c in av]
        return [" "]
    if op is C.BRANCH:
        return [s for branch in av[1] for s in _expand_items(branch, limit)][:limit]
    if op is C.SUBPATTERN:
        return _expand_items(av[-1], limit)
    if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
        lo, hi, sub = av
        inner = _expand_items(sub, limit)
        if lo == 0 and hi == 1:  # optional: with it first, the fuller answer
            return inner + [""]
        # A fixed count is spelled out; a variable one (+, *, {2,5}) is taken
        # at its least non-zero count, so "a+" keeps its "a" and "\s*" is a space.
        return _product([inner] * max(lo, 1), limit)
    if op in (C.AT, C.ASSERT, C.ASSERT_NOT):  # anchors and lookarounds spell nothing
        return [""]
    # ANY, NOT_LITERAL, CATEGORY, GROUPREF, ...: non-deterministic.
    return [" "]


def expand_pattern(pattern: str, limit: int = EXPANSION_LIMIT) -> list[str]:
    """The strings the pattern spells, at most ``limit``, in the pattern's own
    order (alternatives left to right, optional parts present before absent),
    whitespace collapsed, blanks and repeats dropped.

    Non-deterministic pieces (``.``, ``\\d``, ``\\s``, ranges, negated
    classes, back-references) become a space, as in the paper's heuristic;
    ``x+`` / ``x*`` / ``x{m,n}`` take ``x`` at its least non-zero count;
    anchors and lookarounds vanish. ``"(George )?Washington"`` gives
    ``["George Washington", "Washington"]``; ``"\\d+ (feet|ft)"`` gives
    ``["feet", "ft"]``. Raises ``re.error`` on a bad pattern.
    """
    tree = P.parse(unicodedata.normalize("NFC", pattern))
    seen: dict[str, None] = {}
    for s in _expand_items(list(tree), limit):
        s = _squash(s)
        if s:
            seen.setdefault(s, None)
    return list(seen)[:limit]


def regex_target(pattern: str, passages: Iterable[str] = ()) -> str | None:
    """A concrete answer string for ``pattern``: its most frequent match in
    ``passages`` (the paper uses the question's top retrieved passages), else
    the first string ``expand_pattern`` spells; None when the pattern spells
    no literal text at all (``\\d+``) and matches none of the passages."""
    found = most_frequent_match(pattern, passages)
    if found is not None:
        return found
    spelled = expand_pattern(pattern)
    return spelled[0] if spelled else None

"""Caption swaps for the caption-swap term: a caption's words of place, direction or time turned
into their opposites, on strings before tokenisation (so any tokenizer works).

    swap_caption("a red circle moves left")                  -> "a red circle moves right"
    swap_caption("a small red star at the top left")         -> "a small red star at the bottom right"
    swap_caption("a red circle appears, then a blue square")
                                            -> "a blue square, then a red circle appears"

Word pairs (`PAIRS`) swap in one pass (left <-> right, never left -> right -> left), only as
whole words (never "leftover", "uptown", "outside"; nor the "up" of "shows up"), keeping the
case of each word ("Left" -> "Right").
"to the left of" / "to the right of" follow from left <-> right. "A then B" becomes "B then A"
where the caption has no word pair (both at once could undo each other: "moves left then right").
A caption with neither is returned unchanged and reported as unchanged.
"""
from __future__ import annotations

import re

# English pairs, both directions from one table; multi-word sides are matched across any spaces.
PAIRS = (
    ("left", "right"), ("leftward", "rightward"), ("leftwards", "rightwards"),
    ("top", "bottom"), ("up", "down"), ("upward", "downward"), ("upwards", "downwards"),
    ("upper", "lower"), ("above", "below"),
    ("into", "out of"), ("opens", "closes"), ("open", "close"), ("opening", "closing"),
    ("enters", "leaves"), ("entering", "leaving"), ("before", "after"),
)
SWAP = {**{a: b for a, b in PAIRS}, **{b: a for a, b in PAIRS}}
# phrasal verbs whose "up" is no direction ("a blue square shows up"): matched first, kept as is
_IDIOMS = (r"(?:show|shows|showed|shown|showing|turn|turns|turned|turning|end|ends|ended|ending"
           r"|set|sets|setting|make|makes|made|making|give|gives|gave|giving)\s+up")
_WORDS = re.compile(r"\b(?:(?P<keep>" + _IDIOMS + r")|(?P<pair>" + "|".join(sorted(
    (re.escape(k).replace(r"\ ", r"\s+") for k in SWAP), key=len, reverse=True)) + r"))\b",
    re.IGNORECASE)
# "A then B", "A, then B", "A and then B", "A, and then B"; a leading "first" stays in front
_THEN = re.compile(r",?\s+(?:and\s+)?then\s+", re.IGNORECASE)
_FIRST = re.compile(r"^(first|first of all|at first)\s+", re.IGNORECASE)
_END = re.compile(r"[\s.!?;]*$")


def _like(word: str, model: str) -> str:
    """`word` in the case of `model`: UPPER, Capitalised or as given (lower)."""
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _swap_words(text: str) -> str:
    def one(m):
        if m.group("keep"):
            return m.group(0)
        return _like(SWAP[" ".join(m.group(0).lower().split())], m.group(0))
    return _WORDS.sub(one, text)


def _swap_then(text: str) -> str:
    """'A then B (then C ...)' -> the clauses in reverse order, connectors and a leading 'first'
    where they were; the text unchanged without one, or when a clause is empty."""
    end = _END.search(text).group(0)
    body = text[:len(text) - len(end)] if end else text
    first = _FIRST.match(body)
    lead = first.group(0) if first else ""
    body = body[len(lead):]
    parts = _THEN.split(body)
    seps = _THEN.findall(body)
    if not seps or any(not p.strip() for p in parts):
        return text
    word = body.split(" ", 1)[0]
    upper = body[:1].isupper() and not lead and not (len(word) > 1 and word.isupper())
    if upper:  # a sentence's capital stays at the start of the sentence
        parts[0] = parts[0][:1].lower() + parts[0][1:]
    parts = parts[::-1]
    if upper:
        parts[0] = parts[0][:1].upper() + parts[0][1:]
    out = parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))
    return lead + out + end


def swap_caption(text: str) -> str:
    """The caption with its place/direction/time words swapped (see the module doc); unchanged
    when it has none."""
    swapped = _swap_words(text)
    return swapped if swapped != text else _swap_then(text)


def swap_captions(captions) -> tuple[list[str], list[bool]]:
    """Every caption swapped, and which of them changed (the others are returned as they were)."""
    out = [swap_caption(c) for c in captions]
    return out, [s != c for s, c in zip(out, captions)]

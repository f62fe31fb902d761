"""English text normaliser for WER, and the WER helper built on jiwer.

A documented, simpler equivalent of openai-whisper's ``EnglishTextNormalizer``. Both the
reference and the hypothesis go through :func:`normalize` before scoring. Rules, in order:

1. Unicode NFKC; curly quotes/apostrophes become ASCII; diacritics are stripped (``café`` -> ``cafe``).
2. Lowercase.
3. Bracketed asides are removed: ``[MUSIC]``, ``<laughs>``. Unlike openai's normaliser, text in
   parentheses is kept (only the parentheses go): in book references such as alice_ch1.txt it is
   spoken text, "(as well as she could, ...)", and dropping it would count every system's correct
   words as insertions.
4. Titles are spelled out: ``mr`` -> ``mister``, ``mrs`` -> ``missus``, ``dr`` -> ``doctor``,
   ``st`` -> ``saint``, ``jr`` -> ``junior``, ``sr`` -> ``senior`` (with or without the dot).
5. Numbers written with digits are spelled out: ``1,000`` -> ``one thousand``,
   ``3.5`` -> ``three point five``, ``42%`` -> ``forty two percent``, ``$5`` -> ``five dollars``,
   ``1st`` -> ``first``. (openai goes the other way, words -> digits; either direction makes
   "10" and "ten" equal, which is all WER needs.)
6. Hyphens and dashes split words (``rabbit-hole`` -> ``rabbit hole``); every other character
   that is not a letter, digit or apostrophe becomes a space. Apostrophes survive only inside
   a word (``don't`` stays, ``'tis`` -> ``tis``, ``dogs'`` -> ``dogs``).
7. Filler words are dropped: ``uh``, ``um``, ``hmm``, ``mm``, ``mhm``, ``mmm``, ``er``, ``ah``.
8. Whitespace is collapsed.

Not done (unlike openai's): British -> American spelling and contraction expansion.
"""

from __future__ import annotations

import re
import unicodedata

_FILLERS = {"uh", "um", "hmm", "mm", "mhm", "mmm", "er", "ah"}
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "jr": "junior", "sr": "senior"}
_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'", "\u201c": '"', "\u201d": '"'}


def number_to_words(n: int) -> str:
    """Spell out a non-negative integer in English words without "and": 1203 -> "one thousand two hundred three"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return number_to_words(high) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return (head + " " + last).strip()


def _spell_number(match: re.Match) -> str:
    currency, integer, fraction, suffix = (
        match.group("cur"),
        match.group("int"),
        match.group("frac"),
        match.group("suf"),
    )
    words = number_to_words(int(integer.replace(",", "")))
    if suffix in ("st", "nd", "rd", "th"):
        return " " + _ordinal(words) + " "
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    if suffix == "%":
        words += " percent"
    if currency:
        words += " dollars" if currency == "$" else " pounds" if currency == "£" else " euros"
    return " " + words + " "


_NUMBER = re.compile(
    r"(?P<cur>[$£€])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?P<suf>%|st\b|nd\b|rd\b|th\b)?"
)


def _strip_diacritics(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize(text: str) -> str:
    """Normalise English text for WER scoring (rules in the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    for fancy, plain in _QUOTES.items():
        text = text.replace(fancy, plain)
    text = _strip_diacritics(text).lower()
    text = re.sub(r"\[[^\]]*\]|<[^>]*>", " ", text)
    text = re.sub(r"\b(mrs|mr|dr|st|jr|sr)\b\.?", lambda m: _TITLES[m.group(1)], text)
    text = _NUMBER.sub(_spell_number, text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w and w not in _FILLERS)


def word_error_rate(reference: str, hypothesis: str) -> dict:
    """WER of ``hypothesis`` against ``reference`` after :func:`normalize` on both.

    Returns ``{"wer", "substitutions", "deletions", "insertions", "reference_words"}``.
    An empty normalised reference gives WER 0.0 for an empty hypothesis, else 1.0.
    """
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    n_ref = len(ref.split())
    if n_ref == 0:
        n_hyp = len(hyp.split())
        return {"wer": 0.0 if n_hyp == 0 else 1.0, "substitutions": 0, "deletions": 0,
                "insertions": n_hyp, "reference_words": 0}  # fmt: skip
    if not hyp:
        return {"wer": 1.0, "substitutions": 0, "deletions": n_ref, "insertions": 0, "reference_words": n_ref}
    out = jiwer.process_words(ref, hyp)
    return {
        "wer": float(out.wer),
        "substitutions": int(out.substitutions),
        "deletions": int(out.deletions),
        "insertions": int(out.insertions),
        "reference_words": n_ref,
    }

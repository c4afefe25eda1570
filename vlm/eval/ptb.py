"""A pure-Python copy of the COCO caption tokenization: Stanford PTBTokenizer, then pycocoevalcap's punctuation removal.

pycocoevalcap runs ``java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` (CoreNLP 3.4.1) and
drops the tokens in its ``PUNCTUATIONS`` list. `ptb_tokenize` reproduces that output without Java for the text of
captions: words, hyphenated and dotted words, numbers (signed, decimal, grouped, times, fractions), contractions and
the lexer's special words ("cannot" -> "can not", "gonna" -> "gon na"), abbreviations that keep their period, quotes,
brackets (which the lexer writes as ``-LRB-``; lowercased to ``-lrb-`` they escape the removal list and are kept, as
in the official pipeline), dashes, ellipses, runs of ``!``/``?`` and the common Unicode punctuation. Like the lexer it
takes the longest match at each position. tests/test_metrics.py checks it token for token against the Java program.
"""

from __future__ import annotations

import re

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, verbatim.
PUNCTUATIONS = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

# Unicode the lexer rewrites to ASCII tokens; characters outside the Basic Multilingual Plane (emoji) it deletes.
_UNICODE = {
    "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": " -- ", "\u2014": " -- ",
    "\u2026": " ... ", "\u00bd": " 1/2 ", "\u00a3": " # ", "\u20ac": " $ ", "\u00a2": " cents ", "\u00a0": " ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)) + "|[\U00010000-\U0010ffff]")

# Words the lexer splits in two, and clitics it splits off the word before them.
_SPLIT_WORDS = re.compile(
    r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(lem|gim)(me)\b|(?<!\w)('t)(is|was)\b|\b(y')(all)\b",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"(?<=\w)(n't)(?!\w)", re.IGNORECASE)
_CLITIC = re.compile(r"(?<=\w)('(?:s|m|d|ll|re|ve))(?!\w)", re.IGNORECASE)
_AND = re.compile(r"(?<=\w)('n')(?=\w)", re.IGNORECASE)  # rock'n'roll

# Abbreviations whose period the lexer keeps (found by probing the Java lexer); the second set only when capitalised.
_ABBREVIATIONS = (
    "mr|mrs|ms|dr|st|etc|vs|jr|sr|inc|co|ave|mt|prof|gen|lt|col|capt|sgt|rev|ltd|corp|dept|jan|feb|mar|apr|jun|jul|"
    "aug|sep|sept|oct|nov|dec|mon|tue|wed|thu|fri|est|sq|ft|cf|al|blvd|rd|calif|fla|ariz|colo|conn|ga|ind|kan|ky|md|"
    "mich|minn|mo|mont|neb|nev|okla|tenn|va|vt|wis|wyo|adm|brig|cmdr|gov|pres|rep|sen|supt|messrs|mlle|mme|esq|bros|"
    "assn|univ|natl|intl|tel|ext"
)
_CAPITALISED_ABBREVIATIONS = "Mass|Miss|Del|Ill|La|Ore|Pa|Tex|Wash"
_SEGMENT = r"[^\W_]\w*"  # starts with a letter or digit; underscores may follow
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# Each alternative the lexer can match at a position; the longest match wins, ties go to the earlier one.
_PATTERNS = [re.compile(p) for p in (
    rf"(?i:{_ABBREVIATIONS})\.|(?:{_CAPITALISED_ABBREVIATIONS}|(?-i:{_CAPITALISED_ABBREVIATIONS.upper()}))\.",
    r"(?i:no)\.(?=\s*\d)",  # "No. 5"
    r"(?:[A-Za-z]\.){2,}",  # acronyms: "U.S.", "e.g.", "a.m."
    r"[A-Za-z]\.(?!\s+[A-Z][a-z])",  # an initial, unless a capitalised word starts a new sentence
    r"[-+]?(?:\d+|[.,]\d+)(?:[.,:]\d+)*",  # numbers: "-1.5", "1,000", "12:30", ".5"
    r"\d+ +\d+/\d+",  # "2 1/2", one token (joined by a no-break space below)
    rf"{_SEGMENT}(?:(?:-|/|\.(?=[a-z0-9])){_SEGMENT})*",  # words: "black-and-white", "1/2", "www.x.com"
    rf"[oOdD]'{_SEGMENT}",  # "o'clock", "O'Brien", "d'ye"
    r"[A-Z]+&[A-Z]+",  # "AT&T"
    r"(?i:n't|'(?:s|m|d|ll|re|ve|em|n'?|t|cause)|y')(?!\w)|'\d+\w*(?![\w\"])",  # split clitics; "'em", "'n'", "'90s"
    r"[\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+",  # e-mail addresses
    r"</?[A-Za-z][^<>\s]*>",  # SGML-like tags
    r"[#@][^\W\d_]\w*",  # "#tag", "@user"
    r"[!?]+",
    r"\.{3,}|-{2,}",  # normalised to "..." and "--" below
    r"\S",
)]


def ptb_tokenize(text: str) -> list[str]:
    """The tokens pycocoevalcap's PTBTokenizer gives for one caption: lowercased, punctuation removed."""
    text = _UNICODE_RE.sub(lambda m: _UNICODE.get(m.group(), ""), text.replace("\n", " "))
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = _CLITIC.sub(r" \1", _NEGATION.sub(r" \1", _AND.sub(r" \1 ", text)))
    tokens = []
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        end = max((m.end() for p in _PATTERNS if (m := p.match(text, pos))), default=pos + 1)
        tokens.append(_normalise(text[pos:end]))
        pos = end
    # Lowercased before the removal, so the bracket tokens (-lrb- ...) stay, exactly as in pycocoevalcap.
    return [t for t in (t.lower() for t in tokens) if t not in PUNCTUATIONS]


def _normalise(token: str) -> str:
    """The lexer's spelling of a punctuation token (brackets as -LRB-, quotes as `` and '')."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    if token == '"':
        return "''"
    if token.startswith("..."):
        return "..."
    if token.startswith("--"):
        return "--"
    return re.sub(r" +", "\u00a0", token)

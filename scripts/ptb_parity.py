"""Probe `vlm.eval.ptb` against the official Java PTBTokenizer on adversarial strings and print every difference.

Runs pycocoevalcap's own `PTBTokenizer` (Java, one JVM for all strings) on seeded random strings that mix the hard
categories (punctuation inside words, URLs, e-mails, abbreviations, acronyms, numbers, currency, contractions,
Unicode quotes and dashes, ellipses, emoji, accents, odd spaces) and compares token for token with ours.

    python scripts/ptb_parity.py [--n 5000] [--seed 0] [--show 40] [--bmp] [--text STRING ...]

Exits non-zero when any string differs. Needs `java`. Writes benchmarks/results/ptb_parity.json (--json): the
counts and the differing strings; the path is printed last.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys

from _bench import add_json_option, report

from vlm.eval.ptb import ptb_tokenize_lines

WORDS = ["a", "man", "woman", "dog", "the", "is", "riding", "on", "beach", "red", "bus", "kids", "x", "ray", "mail",
         "cat", "on", "of", "b", "i", "s", "t", "n", "d", "o", "co", "op", "can", "will", "am", "pm", "us", "com",
         "www", "http", "e", "eg", "ie", "vs", "mr", "dr", "st", "jan", "no", "inc", "ft", "etc", "am", "fig"]
PIECES = ["k!ids", "a.b", "x-ray's", "3/4", "e-mail@x", "e-mail@x.com", "john.doe@mail.org", "http://x.com/a?b=1",
          "https://www.example.org/path.", "www.google.com", "example.net/foo", "“quoted”", "‘single’", "«guillemets»",
          "...", "…", ". . .", "p.m.", "a.m.", "U.S.", "U.K.", "e.g.", "i.e.", "$5", "$5.99", "US$5", "€10", "£3",
          "¢50", "¥100", "50%", "&", "AT&T", "S&P", "&amp;", "co-op", "'90s", "can't", "won't", "o'clock", "O'Brien",
          "y'all", "'em", "'n'", "rock'n'roll", "cannot", "gonna", "gotta", "wanna", "lemme", "gimme", "'tis",
          "😀", "👍🏽", "café", "naïve", "Zoë", "résumé", "\u00a0", "\t", "--", "---", "----", "..", "....", "!!", "?!",
          "!?!", "(", ")", "[", "]", "{", "}", "<b>", "</i>", "<", ">", "\"", "'", "`", "``", "''", "#tag", "@user",
          "1,000", "3.5", "-1.5", "+2", "12:30", ".5", "2 1/2", "½", "1/2", "5-7", "10/12/2010", "555-123-4567",
          "(555) 123-4567", "Mr.", "Mrs.", "Dr.", "St.", "Jan.", "No.", "No. 5", "vs.", "etc.", "Inc.", "Corp.",
          "Mass.", "Calif.", "a.k.a.", "Ph.D.", "'s", "n't", "'ll", "'re", "'ve", "'d", "'m", "don't", "I'm",
          "it's", "James'", "boys'", "shouldn't've", "—", "–", "‐", "×", "°", "©", "®", "™", "§", "•", "·", "*",
          "**", "\\", "|", "~", "^", "=", "+", "_", "__", "/", ";", ":", ",", "?", "!", ".", "@", "#", "%", "$",
          "\u200b", "\ufeff", "\u00ad", "\r", "\r\n", "\x0c", "\u2028", "\x85", "\u2009", "\u3000", "Ⅳ",
          "²", "³", "¼", "\u2019s", "don\u2019t", "ñ", "ß",
          "Σ", "Ж", "中文", "ا", "‹", "›", "„", "‚", "\u201b", "\u201f", "&lt;", "&gt;", "&quot;", "&apos;", "&nbsp;",
          "C.D.s", "-LRB-", "pro-", "anti-", "cont'd", "nor'easter", "li'l", "c'mon", "Dunkin'", "ol'", "d'Arc",
          "l'amour", "B'Gosh", "Shi'ite", "'cause", "'till", "8-)", ":-)", ";)", "x86", "3D", "4x4", "1st", "2nd"]
PUNCT = list("!?.,;:'\"`-_/\\@#$%&*+=~^|()[]{}<>") + ["’", "“", "”", "…", "—", "–", "·", "\u00a0", "é"]
SEPARATORS = [" "] * 12 + ["", "  ", "\t", "\u00a0", " \t "]
# Code point ranges for random characters: Latin-1, Latin Extended, Greek, Cyrillic, Hebrew, Arabic, Devanagari,
# general punctuation, currency, letterlike, arrows and maths, CJK punctuation and ideographs, fullwidth forms.
CHAR_RANGES = [(0x20, 0x7E), (0x80, 0xFF), (0x100, 0x24F), (0x250, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
               (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x20A0, 0x20CF), (0x2100, 0x214F),
               (0x2150, 0x218F), (0x2190, 0x22FF), (0x2600, 0x27BF), (0x3000, 0x303F), (0x4E00, 0x4E20),
               (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F)]


def random_string(rng: random.Random) -> str:
    """3-10 pieces: plain words, hard-category pieces, words with punctuation inside, random character runs."""
    parts = []
    for _ in range(rng.randint(3, 10)):
        kind = rng.random()
        if kind < 0.3:
            part = rng.choice(WORDS)
        elif kind < 0.65:
            part = rng.choice(PIECES)
        elif kind < 0.8:
            word = rng.choice(WORDS) + rng.choice(WORDS)
            cut = rng.randint(0, len(word))
            part = word[:cut] + rng.choice(PUNCT) + word[cut:]
        elif kind < 0.9:
            part = "".join(rng.choice(PUNCT + list("ab1Z")) for _ in range(rng.randint(1, 4)))
        else:  # any characters, mostly ASCII
            ranges = [rng.choice(CHAR_RANGES[:1] * 8 + CHAR_RANGES) for _ in range(rng.randint(1, 5))]
            part = "".join(chr(rng.randint(*r)) for r in ranges)
        style = rng.random()
        part = part.upper() if style < 0.15 else part.capitalize() if style < 0.35 else part
        parts.append(part)
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts[:-1])


def official_tokens(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (the Java program) on every caption, in one JVM run."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="random strings to probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=40, help="differences to print")
    parser.add_argument("--text", nargs="*", default=[], help="probe these strings instead")
    parser.add_argument("--bmp", action="store_true", help="probe every BMP character alone and as a1a, 1a1 (minutes)")
    add_json_option(parser, "ptb_parity")
    args = parser.parse_args()
    if shutil.which("java") is None:
        sys.exit("java not found: the official PTB tokenizer is a Java program")
    rng = random.Random(args.seed)
    captions = args.text or PIECES + [random_string(rng) for _ in range(args.n)]
    if args.bmp:  # line breaks and lone surrogates left out: they cannot stand in a caption of their own
        chars = [chr(c) for c in range(0x20, 0x10000) if not 0xD800 <= c <= 0xDFFF and chr(c) not in "\x85\u2028\u2029"]
        captions = [s for c in chars for s in (c, f"a{c}a", f"1{c}1")]
    official = official_tokens(captions)
    ours = ptb_tokenize_lines(captions)  # one text, one caption a line, as pycocoevalcap feeds the Java program
    diffs = [(c, o, t) for c, o, t in zip(captions, official, ours, strict=True) if o != t]
    for caption, theirs, ours in diffs[: args.show]:
        print(f"{caption!r}\n  java: {theirs!r}\n  ours: {ours!r}")
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    path = report(args.json, config={"strings": "text" if args.text else "bmp" if args.bmp else "random",
                                     "n": args.n, "seed": args.seed},
                  results={"strings": len(captions), "differing": len(diffs),
                           "differences": [{"text": c, "java": o, "ours": t} for c, o, t in diffs[: args.show]]},
                  machine_extra={"java": java})
    print(f"{len(diffs)} of {len(captions)} strings differ from the Java tokenizer")
    print(path)
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()

"""A pure-Python copy of the COCO caption tokenization: Stanford PTBTokenizer, then pycocoevalcap's punctuation removal.

pycocoevalcap writes the captions one a line to a file, runs ``java edu.stanford.nlp.process.PTBTokenizer
-preserveLines -lowerCase`` (CoreNLP 3.4.1) on it, takes the i-th printed line as the i-th caption's and drops the
tokens in its ``PUNCTUATIONS`` list. That tokenizer is a JFlex lexer: at each position every rule is tried, the
longest match wins (a rule's trailing context ``r1/r2`` counts towards its length but is not consumed) and ties go to
the earlier rule. `_RULE_TABLE` below is that rule table, in the lexer's order, with the lexer's character classes;
each action gives the token the lexer prints (quotes as `` and '', brackets as -LRB-, dashes as --, ...). Characters
no rule knows (emoji, whose two UTF-16 halves the lexer sees separately, symbols outside its tables, letters newer
than its Unicode tables) are dropped and split words, as the lexer does.

`ptb_tokenize_lines` reproduces the whole pipeline, quirks included: the captions are lexed as one text, so a rule may
look into the next caption (a one-letter initial "J." loses its period before a caption starting "The ..."), and a
caption holding another line break (\\r, \\v, \\f, U+2028, U+2029) is split, shifting every later caption.

CoreNLP 3.4.1's PTBLexer.flex is not public in this form; the table was rebuilt from the lexer sources of 2010 and
2017 and fixed rule by rule against the Java program: scripts/ptb_parity.py diffs the two on random strings (0 in
40,860 differ) and every BMP character alone and between letters and digits also gives the same tokens. The lexer
prints a period twice after some abbreviations ("U.S. The" -> "U.S. . The"); here it is printed once, which is the
same after the punctuation removal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import regex

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, verbatim.
PUNCTUATIONS = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

# --- Character classes and macros of PTBLexer.flex (the lexer is caseless only for literal text, never classes) ---
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
NEWLINE = r"(?:\r\n?|[\n\u2028\u2029\u000B\u000C\u0085])"
SPACENL = rf"(?:{SPACE}|{NEWLINE})"
SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?"
        r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")  # <b>, </i>, <a href="x">
SENTEND = rf"{SPACENL}(?:{SPACENL}|[A-Z]|{SGML})"
NEWER = (  # letters and digits Unicode assigned after the lexer's tables (Unicode 6.x), found by probing it
    r"\u037F\u0528-\u052F\u0558\u0560\u0588\u058B-\u058C\u05EF\u0860-\u0887\u0889-\u088F\u08A1\u08AD-\u08C9"
    r"\u0978\u0980\u09FC\u0AF9\u0C34\u0C5A-\u0C5D\u0C80\u0CDC-\u0CDD\u0D04\u0D54-\u0D56\u0D5F\u0DE6-\u0DEF"
    r"\u0E86\u0E89\u0E8C\u0E8E-\u0E93\u0E98\u0EA0\u0EA8-\u0EA9\u0EAC\u13F5-\u13FD\u16F1-\u16F8\u170D\u171F"
    r"\u1878\u191D-\u191E\u19B0-\u19C0\u19C8-\u19C9\u1B4C\u1C80-\u1CBF\u1CF2-\u1CF3\u1CFA\u208F\u209D-\u209F"
    r"\u2C2F\u2C5F\u312E-\u312F\u31BB-\u31BF\u4DB6-\u4DBF\u9FCD-\u9FFF\uA698-\uA69D\uA78F\uA794-\uA79F"
    r"\uA7AB-\uA7F7\uA8FD-\uA8FE\uA9E0-\uA9E4\uA9E6-\uA9FE\uAA7E-\uAA7F\uAB30-\uAB5A\uAB5C-\uAB69\uAB6C-\uABBF"
)


def _bmp_class(prop: str, extra: str = "") -> str:
    """A character class of the BMP characters with a Unicode property, less the NEWER ones, plus extra."""
    has, newer = regex.compile(prop), regex.compile(f"[{NEWER}]")
    spans: list[list[int]] = []
    for code in range(0x10000):
        if has.match(chr(code)) and not newer.match(chr(code)):
            if spans and spans[-1][1] == code - 1:
                spans[-1][1] = code
            else:
                spans.append([code, code])
    return "[" + "".join(f"\\u{a:04X}-\\u{b:04X}" for a, b in spans) + extra + "]"


JAVA_L = _bmp_class(r"\p{L}", extra=r"\u1885\u1886")  # Character.isLetter in the lexer's Unicode version
DIGIT = _bmp_class(r"\p{Nd}")
LETTER_CLASS = (  # the soft hyphen and the marks the lexer lists by hand
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF"
    r"\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2"
    r"\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711"
    r"\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955"
    r"\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C"
    r"\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03"
    r"\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD"
)
SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"  # &eacute; etc. count as letters
LETTER = rf"(?:{JAVA_L}|[{LETTER_CLASS}]|{SPLET})"
ALNUM = rf"(?:{JAVA_L}|{DIGIT})"
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSETC = rf"(?:{APOS}|[`\u0091\u2018\u201B])"  # apostrophes that may appear inside a word
HYPHEN = r"[-_\u058A\u2010\u2011]"
NUM = rf"(?:{DIGIT}+|{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+)"  # also ":30"
ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
ACRO2 = ACRO.replace(r"(?:\.[A-Za-z])*", r"(?:\.[A-Za-z])+", 1)
INSENTP = r"[,;:\u3001]"
QUOTES = (rf"(?:{APOS}|''"
          r"|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2})")
DBLQUOT = r'(?:"|(?i:&quot;))'
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SREDAUX = rf"(?i:n){APOSETC}(?i:t)"
WORD = rf"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"  # "Yahoo!"-style inner . ! ?
THING_PART = rf"(?:[dDoOlL]{APOSETC}{ALNUM})?{ALNUM}+"
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{ACRO2}\.))+"
URL_CHAR = r"[^ \t\n\f\r\"<>|()]"
# Abbreviations whose period the lexer keeps (PTBLexer.flex ABBREV1..4; bracketed first letters are case sensitive).
ABMONTH = "(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)"
ABDAYS = "(?i:Mon|Tue|Tues|Wed|Thu|Thurs|Fri)"
ABSTATE = ("(?:(?i:Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans?|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla|Penn|Tenn|Va|"
           "Vt|Wisc?|Wyo)|A(?i:z)|A(?i:rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass)|M(?i:iss)|O(?i:re)|P(?i:a)|T(?i:ex)"
           "|W(?i:ash))")
ABCOMP = "(?:(?i:Inc|Cos?|Corp|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys)|(?i:Pp?t)[ye](?i:s)?)"
ABNUM = "(?i:tel|est|ext|sq)"
ABPTIT = r"(?i:Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq)"
ABBREV1 = rf"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?i:etc|al|seq|Bldg))\."
ABTITLE = ("(?:(?i:Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?|"
           "Ave|Pres|Lieut|Rt|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|Sr)"
           "|M(?i:iss))")
ABBREV4 = rf"(?:{ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g|Dept|Blvd|Rd|Ave)|v|{ACRO})"
ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # kept only before a number
ACRONYM_NEXT = ("(?:A(?i:bout)|A(?i:ccording)|A(?i:dditionally)|A(?i:fter)|A(?i:n)|A|A(?i:s)|A(?i:t)|B(?i:ut)|"
                "E(?i:arlier)|H(?i:e)|H(?i:er)|H(?i:ere)|H(?i:owever)|I(?i:f)|I(?i:n)|I(?i:t)|L(?i:ast)|M(?i:any)|"
                r"M(?i:ore)|M(?i:r)\.|M(?i:s)\.|N(?i:ow)|O(?i:nce)|O(?i:ne)|O(?i:ther)|O(?i:ur)|S(?i:he)|S(?i:ince)|"
                "S(?i:o)|S(?i:ome)|S(?i:uch)|T(?i:hat)|T(?i:he)|T(?i:hen)|T(?i:here)|T(?i:hese)|T(?i:hey)|T(?i:his)|"
                "W(?i:e)|W(?i:hen)|W(?i:hile)|W(?i:hat)|Y(?i:et)|Y(?i:ou))")
MISCSYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6"
    r"\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8"
    r"\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F"
    r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F"
    r"\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)

# --- Actions: the text the lexer prints for a matched token ---
Action = Callable[[str], "tuple[str | None, int]"]  # (token or None to print nothing, characters consumed)


def _same(text: str) -> tuple[str, int]:
    return text, len(text)


def _to(token: str) -> Action:
    return lambda text: (token, len(text))


def _skip(text: str) -> tuple[None, int]:
    return None, len(text)


def _keep(n: int) -> Action:
    """Print the first n characters and scan the rest again (the lexer's yypushback)."""
    return lambda text: (text[:n], n)


def _drop_last(n: int) -> Action:
    return lambda text: (text[: len(text) - n], len(text) - n)


def _soft(text: str) -> tuple[str, int]:
    """Words lose their soft hyphens; a token of soft hyphens alone becomes "-"."""
    return text.replace("\u00ad", "") or "-", len(text)


def _spaces(text: str) -> tuple[str, int]:
    return text.replace(" ", "\u00a0"), len(text)


def _phone(text: str) -> tuple[str, int]:
    return text.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(text)


def _quotes(left: bool) -> Action:
    """LaTeX-style quotes: ` `` for opening, ' '' for closing; curly and CP1252 quotes by their direction."""
    def action(text: str) -> tuple[str, int]:
        out = regex.sub(r"&apos;|'", "`" if left else "'", text)
        out = regex.sub(r'"|&quot;', "``" if left else "''", out)
        out = regex.sub("[\u0091\u2018\u201B\u2039]", "`", out)
        out = regex.sub("[\u0092\u2019\u203A]", "'", out)
        out = regex.sub("[\u0093\u201C\u00AB]", "``", out)
        return regex.sub("[\u0094\u201D\u00BB]", "''", out), len(text)
    return action


def _amp(text: str) -> tuple[str, int]:
    return regex.sub("(?i:&amp;)", "&", text), len(text)


def _dashes(text: str) -> tuple[str, int]:
    return ("--" if 3 <= len(text) <= 4 else text), len(text)


def _acronym(text: str) -> tuple[str, int]:
    """An acronym before a sentence-opening word keeps its period (printed again as a token); "I." loses it."""
    return (text[:-1], len(text) - 1) if len(text) == 2 else (text, len(text))


_CURRENCY = str.maketrans({"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
                           "\u20ac": "$"})
_FRACTIONS = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# (pattern, trailing context or None, action), in PTBLexer.flex's order. Comments give an example each rule is for.
_RULE_TABLE: list[tuple[str, str | None, Action]] = [
    (r"(?i:cannot)", None, _keep(3)),  # can not
    (r"'(?i:twas)", None, _keep(2)),  # 't was
    (r"'(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna)", None, _drop_last(2)),  # 't is, gon na
    (r"(?i:c\+\+|c#|f#)", None, _same),
    (SGML, None, _spaces),  # <b>, </i>
    (r"(?i:&(?:MD|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, _to("--")),
    (r"(?i:&amp;)", None, _amp),
    (r"(?i:&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);)", None, _same),
    (WORD, REDAUX, _soft),  # "it" of it's
    (r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*", SREDAUX, _soft),  # "do" of don't
    (WORD, None, _soft),  # words, "k!ids", "a.b"
    (rf"{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:Dunkin|somethin|ol){APOS}|{APOS}(?i:em)"
     rf"|[A-HJ-XZn]{APOSETC}{JAVA_L}{{2,}}|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)"
     rf"|{JAVA_L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{JAVA_L}*|{APOS}(?i:cause)"
     rf"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:O){APOSETC}(?i:o)",
     None, _same),  # 'n', O'Brien, 'em, '90s
    (rf"(?i:y){APOS}", JAVA_L, _same),  # y'all
    (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _same),
    (r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"  # www.example.com, example.com/path
     r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
     rf"(?:/{URL_CHAR}+[^ \t\n\f\r\"<>|.!?(){{}},-])?", None, _same),
    (r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
     r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?", None, _same),  # e-mail@x, even "a=!@!"
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", None, _same),  # @user, #tag
    (REDAUX, r"[^A-Za-z]", _quotes(False)),  # 's 'll 're
    (SREDAUX, None, _quotes(False)),  # n't
    (rf"{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}}", None, _same),  # dates
    (rf"[\-+]?{NUM}", None, _soft),  # -1.5, 1,000, 12:30
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _same),
    (rf"(?:{DIGIT}{{1,4}}[- \u00A0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}", None, _spaces),  # 2 1/2
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, lambda t: (t.translate(_FRACTIONS), len(t))),
    (rf"(?i:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls)"
     rf"|(?i:Cap){APOS}n|(?i:c){APOS}(?i:est)", None, _amp),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _same),  # a/b/c
    (r"[A-Z]*\$|#", None, _same),  # $, US$
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", None,
     lambda t: (t.translate(_CURRENCY), len(t))),
    (rf"{ACRO}\.", rf"{SPACENL}+{ACRONYM_NEXT}(?:{SPACENL}|[?!])", _acronym),  # U.S. The
    (ABBREV3, rf"{SPACENL}?{DIGIT}", _same),  # fig. 3
    (ABBREV1, rf"{SENTEND}|[\s\S]{{2}}", _same),  # Jan., etc.
    (ABBREV1, None, _same),
    (rf"{ABBREV4}\.", None, _same),  # Mr., U.S., a.
    (ABBREV4, SPACE, _same),
    (ACRO, SPACENL, _same),
    (rf"{APOS}[0-9][0-9]", SPACENL, _same),  # '90
    (rf"{WORD}\.", INSENTP, _soft),  # "ok." before a comma
    (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}[\- \u00A0]?"
     r"[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}", None, _phone),  # (555) 123-4567
    (DBLQUOT, r"[A-Za-z0-9$]", _quotes(True)),
    (DBLQUOT, None, _quotes(False)),
    (r"\x7F", None, _skip),
    (r"<|(?i:&lt;)", None, _to("<")),
    (r">|(?i:&gt;)", None, _to(">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]",
     lambda t: (t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t))),  # :-)
    # ^_^ (the first alternative is verbatim: PTBLexer.flex escapes its second class's bracket)
    (r"[\^x=~<>]\.\[\^x=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)", None,
     lambda t: (t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t))),
    (r"[{}\[\]()]", None, lambda t: (_BRACKETS[t], 1)),
    (r"-+", None, _dashes),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _to("...")),
    (r"@+|#+|_+", None, _same),
    (r"\*+|(?:\\\*){1,3}", None, _same),
    (INSENTP, None, _same),
    (r"[?!]+", None, _same),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _same),
    (r"=", None, _same),
    (r"/", None, _same),
    (rf"{HTHING}\.", INSENTP, _soft),
    (HTHING, None, _soft),  # co-op, 3.5-ft
    (rf"{THING_PART}(?:{HYPHEN}{THING_PART})*\.", INSENTP, _same),
    (rf"{THING_PART}(?:{HYPHEN}{THING_PART})*", None, _same),  # x-ray, 1st, d'Arc
    (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+\.", INSENTP, _amp),
    (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+", None, _amp),  # AT&T
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _quotes(True)),  # a straight quote before a word opens it
    (REDAUX, None, _quotes(False)),
    (SREDAUX, None, _quotes(False)),
    (QUOTES, None, _quotes(False)),
    (r"<<|>>", None, _same),
    (MISCSYMBOL, None, _same),
    (rf"\x00|{SPACE}+|[\u200B\u200E\u200F\uFEFF]|(?i:&nbsp;)", None, _skip),
    (NEWLINE, None, _to("\n")),  # the end of a caption's line
]


def _caseless(pattern: str) -> str:
    """Spell each (?i:...) group out as [xX] classes, as JFlex's caseless literals are (its classes stay as written).

    The regex module mishandles some scoped (?i:...) groups next to negated classes, so none reach it.
    """
    out, i = [], 0
    while (start := pattern.find("(?i:", i)) >= 0:
        out.append(pattern[i:start] + "(?:")
        i, depth, in_class = start + 4, 1, False
        while depth:
            ch = pattern[i]
            if ch == "\\":
                out.append(pattern[i: i + 2])
                i += 2
                continue
            if in_class:
                in_class = ch != "]"
            elif ch == "[":
                in_class = True
            elif ch in "()":
                depth += 1 if ch == "(" else -1
            out.append(f"[{ch.lower()}{ch.upper()}]" if not in_class and ch.lower() != ch.upper() else ch)
            i += 1
    return "".join(out) + pattern[i:]


def _compile(pattern: str, posix: bool = True) -> regex.Pattern:
    return regex.compile(_caseless(pattern), regex.POSIX if posix else 0)


@functools.cache
def _rules() -> list[tuple]:
    """The compiled rule table (on first use: compiling takes about a second)."""
    return [(_compile(p), _compile(c) if c else None, _compile(p, posix=False), action) for p, c, action in _RULE_TABLE]


@functools.cache
def _candidates(char: str) -> list[tuple]:
    """The rules whose pattern can start with char (regex's partial matching)."""
    return [rule for rule in _rules() if rule[0].match(char, partial=True)]


def _match(text: str, pos: int) -> tuple[int, Action, int]:
    """The lexer's choice at pos: (length counted for longest match, action, length of the token text)."""
    best = (0, _skip, 1)  # a character no rule knows is dropped
    for pattern, context, whole, action in _candidates(text[pos]):
        if not whole.match(text, pos):  # the leftmost-first search fails much faster than the POSIX one
            continue
        m = pattern.match(text, pos)
        if context is None:
            length = token = m.end() - pos
        else:  # longest r1 r2; the token is the longest r1 prefix after which r2 matches the rest
            length = token = 0
            for end in range(m.end(), pos, -1):
                if whole.fullmatch(text, pos, end) and (c := context.match(text, end)):
                    if c.end() - pos > length:
                        length, token = c.end() - pos, end - pos
        if length > best[0]:
            best = (length, action, token)
    return best


def _utf16_units(text: str) -> str:
    """Characters outside the BMP as their two UTF-16 surrogates, as the Java lexer sees them (and drops them)."""
    def surrogates(m: regex.Match) -> str:
        code = ord(m.group()) - 0x10000
        return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))
    return regex.sub(r"[\U00010000-\U0010FFFF]", surrogates, text)


# A shortcut, no rule gives anything else for them: spaces, and ASCII letters up to a space or the line's end
# (except the words the lexer splits).
_PLAIN = regex.compile(r" +|[A-Za-z]+(?=[ \n]|$)")
_SPLIT = {"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"}


_SURROGATE_PAIR = regex.compile(r"[\uD800-\uDBFF][\uDC00-\uDFFF]")


def _pair(m: regex.Match) -> str:
    return m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def _java_lower(token: str) -> str:
    """Java's toLowerCase: as Python's, but a capital sigma is final when no cased letter follows in its word, and
    digits do not end a word ("4x4Σ" -> "4x4ς")."""
    if "\u03a3" not in token:
        return token.lower()
    out = []
    for i, char in enumerate(token):
        if char == "\u03a3":
            word = regex.match(r"[\p{L}\p{M}\p{Nd}]*", token[i + 1:]).group()
            before = regex.search(r"[\p{L}\p{M}\p{Nd}]*$", token[:i]).group()
            final = any(c.lower() != c.upper() for c in before) and all(c.lower() == c.upper() for c in word)
            out.append("\u03c2" if final else "\u03c3")
        else:
            out.append(char.lower())
    return "".join(out)


def _lex(text: str) -> list[str]:
    """What the Java program prints for text: each line's tokens, lowercased and joined by spaces."""
    lines, tokens, pos = [], [], 0
    while pos < len(text):
        if (plain := _PLAIN.match(text, pos)) and plain.group().lower() not in _SPLIT:
            token, consumed = plain.group() if plain.group()[0] != " " else None, plain.end() - pos
        else:
            _, action, length = _match(text, pos)
            token, consumed = action(text[pos: pos + length])
        if token == "\n":
            lines.append(" ".join(tokens))
            tokens = []
        elif token is not None:  # a URL may hold emoji: pair their UTF-16 halves again
            tokens.append(_java_lower(_SURROGATE_PAIR.sub(_pair, token)))
        pos += consumed
    return [*lines, " ".join(tokens)]


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer output for each caption: lowercased tokens without punctuation, space-joined.

    As in pycocoevalcap, the captions are lexed as one text, one caption per line (so a rule may look into the next
    caption), and the i-th printed line is the i-th caption's: a caption holding another line break (\\r, \\f, \\v,
    U+2028, U+2029) splits, and every later caption gets its predecessor's tail, exactly as in the official pipeline.
    """
    lines = _lex(_utf16_units("\n".join(caption.replace("\n", " ") for caption in captions)))
    lines += [""] * (len(captions) - len(lines))  # a quoted SGML attribute can swallow a line break
    # Lowercased before the removal, so the bracket tokens (-lrb- ...) stay, exactly as in pycocoevalcap.
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in lines[: len(captions)]]


def ptb_tokenize(text: str) -> list[str]:
    """The tokens pycocoevalcap's PTBTokenizer gives for one caption on its own: lowercased, punctuation removed."""
    line = ptb_tokenize_lines([text])[0]
    return line.split(" ") if line else []

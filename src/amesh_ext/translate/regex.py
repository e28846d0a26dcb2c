"""RE2 (Envoy) patterns checked and turned into PCRE (APISIX's ngx.re), and literal escaping.

There is no RE2 engine here, so a pattern is checked in two steps: constructs RE2 rejects
(look-around, back-references, atomic groups, possessive quantifiers) are refused by a
scan, then Python's `re` compiles a version with the RE2-only syntax replaced by an
equivalent, which catches unbalanced parentheses, bad repetitions and the like.
"""

from __future__ import annotations

import re

from .model import InvalidResource

_PCRE_SPECIAL = frozenset("\\^$.|?*+()[]{}/")


def pcre_literal(text: str) -> str:
    """`text` escaped so that PCRE matches it literally (ASCII punctuation escaped)."""
    return "".join("\\" + c if c in _PCRE_SPECIAL else c for c in text)


def _scan(pattern: str, where: str) -> tuple[str, str]:
    """(PCRE form, a Python-`re`-compilable form) of an RE2 pattern, or InvalidResource."""

    def bad(why: str) -> InvalidResource:
        return InvalidResource(f"{where}: invalid RE2 regex {pattern!r}: {why}")

    pcre: list[str] = []
    py: list[str] = []
    multiline = False
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise bad("trailing backslash")
            nxt = pattern[i + 1]
            if nxt.isdigit() and nxt != "0" and not in_class:
                raise bad("back-references are not supported")
            if nxt in "pP":  # Unicode classes: PCRE knows them, Python's re does not.
                end = i + 2
                if end < n and pattern[end] == "{":
                    close = pattern.find("}", end)
                    if close < 0:
                        raise bad("unterminated \\p{...}")
                    end = close + 1
                else:
                    end += 1
                pcre.append(pattern[i:end])
                py.append("a" if in_class else "(?:a)")
                i = end
                continue
            if nxt == "x" and pattern.startswith("{", i + 2):  # \x{10FFFF}: not Python's
                close = pattern.find("}", i + 2)
                if close < 0:
                    raise bad("unterminated \\x{...}")
                pcre.append(pattern[i : close + 1])
                py.append("a")
                i = close + 1
                continue
            if nxt == "z":
                pcre.append("\\z")
                py.append("\\Z")
            elif nxt == "C":
                pcre.append("\\C")
                py.append(".")
            elif nxt == "Q":  # \Q...\E literal span
                close = pattern.find("\\E", i + 2)
                lit = pattern[i + 2 : close if close >= 0 else n]
                pcre.append(pattern[i : close + 2 if close >= 0 else n])
                py.append(re.escape(lit))
                i = close + 2 if close >= 0 else n
                continue
            else:
                pcre.append(c + nxt)
                py.append(c + nxt)
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):  # POSIX class [:alpha:]
                close = pattern.find(":]", i + 2)
                if close < 0:
                    raise bad("unterminated POSIX class")
                pcre.append(pattern[i : close + 2])
                py.append("a")
                i = close + 2
                continue
            if c == "]":
                in_class = False
            pcre.append(c)
            py.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            pcre.append(c)
            py.append(c)
            i += 1
            # A ']' right after '[' or '[^' is a literal.
            for lead in ("^", "]"):
                if i < n and pattern[i] == lead:
                    pcre.append(lead)
                    py.append("\\]" if lead == "]" else lead)
                    i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 : i + 4]
            if rest[:1] in ("=", "!", ">") or rest in ("<=", "<!"):
                raise bad("look-around and atomic groups are not supported")
            if rest[:1] == "<":  # (?<name>...) is RE2 and PCRE; Python wants (?P<name>
                pcre.append("(?<")
                py.append("(?P<")
                i += 3
                continue
            m = re.match(r"\(\?([imsU-]*)([:)])", pattern[i:])
            if m and "P" not in m.group(1):
                flags = m.group(1)
                if "m" in flags.split("-")[0]:
                    multiline = True
                pcre.append(m.group(0))
                pyflags = flags.replace("U", "")
                # Python only takes global flags at the start; scoped (?i:...) everywhere.
                if m.group(2) == ")":
                    py.append("(?:)" if not pyflags.strip("-") else f"(?{pyflags}:)")
                else:
                    py.append(f"(?{pyflags}:" if pyflags.strip("-") else "(?:")
                i += len(m.group(0))
                continue
        if c in "*+?}" and i + 1 < n and pattern[i + 1] == "+":
            raise bad("possessive quantifiers are not supported")
        if c == "$" and not multiline:
            # RE2's `$` is end of text; PCRE's also matches before a final newline.
            pcre.append("\\z")
            py.append("\\Z")
            i += 1
            continue
        pcre.append(c)
        py.append(c)
        i += 1
    if in_class:
        raise bad("missing ]")
    return "".join(pcre), "".join(py)


def re2_to_pcre(pattern: str, where: str) -> str:
    """The PCRE equivalent of an RE2 pattern (unanchored); InvalidResource if invalid."""
    pcre, py = _scan(pattern, where)
    try:
        re.compile(py)
    except (re.error, OverflowError, RecursionError) as exc:
        raise InvalidResource(f"{where}: invalid RE2 regex {pattern!r}: {exc}") from None
    return pcre


def matches_empty(pattern: str, where: str) -> bool:
    """Whether an RE2 pattern fully matches "" (for treat_missing_header_as_empty); a
    pattern Python cannot evaluate counts as not matching."""
    _, py = _scan(pattern, where)
    try:
        return re.fullmatch(py, "") is not None
    except (re.error, OverflowError, RecursionError):
        return False


def full_match(pattern: str, where: str) -> str:
    """PCRE that matches the whole subject, as Envoy's safe_regex does."""
    return f"\\A(?:{re2_to_pcre(pattern, where)})\\z"

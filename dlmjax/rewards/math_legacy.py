"""The math reward's ``legacy`` comparison (the reference's ``is_equal(..., math_mode="legacy")``): the MATH
``_strip_string`` normalisation with float or string equality (:func:`is_equiv`), the repetitiveness guard, and the
sympy comparison of parsed LaTeX with the Minerva ``normalize_final_answer`` retry (:func:`_sympy_equal`). The time
limit and the mode switch live in rewards/math.py. Imports nothing heavy at import time (sympy loads on first use).
"""

from __future__ import annotations

import re
from itertools import zip_longest

__all__ = ["is_equiv", "is_repetitive", "normalize_final_answer"]


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{7}`` -> ``\\frac{1}{7}``; an empty remainder after ``\\frac`` raises
    IndexError (the reference does too, and is_equiv then falls back to raw equality)."""
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part[0] == "{":
            out.append(part)
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out.append("{" + a + "}" + b + tail if b == "{" else "{" + a + "}{" + b + "}" + tail)
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` (two plain integers, nothing else) -> ``\\frac{3}{4}``."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    """Drop a trailing ``\\text{ unit}``; two such groups raise ValueError like the reference's assert."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one '\\text{ ' group")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``; a trailing bare ``\\sqrt`` raises IndexError (as in the reference)."""
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _strip_string(s: str) -> str:
    """The MATH dataset's answer normalisation, step for step as the reference's ``_strip_string`` (spec §3.1)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace(",", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:   # "k = 3" -> " 3" (lhs of at most 2 chars, spaces included)
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(pred: str | None, gold: str | None) -> bool:
    """The reference's first test: normalise both, equal as floats if both parse, else as strings.

    A normalisation error (malformed ``\\sqrt``/``\\frac``, two unit groups) falls back to raw string equality.
    """
    if pred is None or gold is None:
        return pred is None and gold is None
    try:
        a, b = _strip_string(pred), _strip_string(gold)
    except (IndexError, ValueError):
        return pred == gold
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# --------------------------------------------------------------------------- legacy: repetitiveness guard and sympy

def _lcp_sum(s: str) -> int:
    """Sum of the LCP array of `s` (prefix-doubling suffix array + Kasai), the quantity the reference's
    ``repeatness`` thresholds. Doubling runs until every rank is distinct (the reference stops at a fixed length,
    which can leave ties for strings like 'a'*129; the sum differs only in such degenerate cases)."""
    n = len(s)
    if n <= 1:
        return 0
    order = {c: i for i, c in enumerate(sorted(set(s)))}
    rank = [order[c] for c in s]
    k = 1
    while True:
        keys = list(zip_longest(rank, rank[k:], fillvalue=-1))
        uniq = {key: i for i, key in enumerate(sorted(set(keys)))}
        rank = [uniq[key] for key in keys]
        if len(uniq) == n or k >= n:
            break
        k <<= 1
    sa = [0] * n
    for i, r in enumerate(rank):
        sa[r] = i
    total, h = 0, 0
    for i in range(n):
        if rank[i] == n - 1:
            h = 0
            continue
        j = sa[rank[i] + 1]
        while i + h < n and j + h < n and s[i + h] == s[j + h]:
            h += 1
        total += h
        if h:
            h -= 1
    return total


def is_repetitive(s: str) -> bool:
    """The reference's ``repeatness``: mean LCP over suffix pairs, 2·ΣLCP / (n(n+1)) > 0.2 (degenerate output)."""
    n = len(s)
    return n > 1 and _lcp_sum(s) * 2 / (n * (n + 1)) > 0.2


_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)


def normalize_final_answer(ans: str) -> str:
    """Minerva's answer normalisation (Lewkowycz et al. 2022, p. 18), as the reference uses it for its sympy retry."""
    for before, after in _MINERVA_SUBSTITUTIONS:
        ans = ans.replace(before, after)
    for expr in _MINERVA_REMOVED:
        ans = ans.replace(expr, "")
    ans = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", ans)
    ans = re.sub(r"(\\text\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", ans)
    ans = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", ans)
    ans = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", ans)
    ans = ans.replace("$", "")
    if ans.replace(",", "").isdigit():
        ans = ans.replace(",", "")
    return ans


def _latex_eval(latex: str):
    """(sympy object, its evalf()) of a LaTeX string.

    The reference calls ``sympy.parsing.latex.parse_latex``, whose ANTLR grammar needs antlr4-python3-runtime 4.11;
    the pinned math-verify stack (latex2sympy2_extended 1.11) needs 4.13, and the two cannot be installed together
    (with 4.13, ``parse_latex`` raises ImportError on every call, which would silently turn the legacy sympy step
    into a string comparison). So the legacy mode parses with ``latex2sympy2_extended.latex2sympy`` (same ANTLR
    approach, maintained grammar, default normalisation), the parser math-verify itself uses."""
    from latex2sympy2_extended import latex2sympy
    sym = latex2sympy(latex)
    return sym, sym.evalf()


def _sympy_equal(a: str, b: str) -> bool:
    """The reference's ``_is_latex_equal``: equal sympy objects or equal numeric values; on any failure or mismatch,
    retry on Minerva-normalised strings; if that retry fails to parse, compare the normalised strings."""
    try:
        sa, va = _latex_eval(a)
        sb, vb = _latex_eval(b)
        if sa == sb or va == vb:
            return True
    except Exception:  # noqa: BLE001 - parse_latex raises many types; any failure means "try the retry"
        pass
    na, nb = normalize_final_answer(a), normalize_final_answer(b)
    try:
        sa, va = _latex_eval(na)
        sb, vb = _latex_eval(nb)
        return bool(sa == sb or va == vb)
    except Exception:  # noqa: BLE001
        return na == nb

"""Formatters for the numbers the paper quotes: each takes a value from a summary and returns LaTeX text.

Used by every experiment's tex_numbers(summary); raise ValueError on a value of the wrong kind."""
import math


def number(value):
    """value as a finite float; ValueError for booleans, strings, NaN, infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not finite")
    return value


def as_math(text):
    """Wrap a formatted number so that its minus sign is typeset correctly in text and in math."""
    return r"\ensuremath{" + text + "}"


def conf(value):
    """A setting in its shortest form: 1.0 -> 1, -100.0 -> -100, 0.25 -> 0.25."""
    return as_math(f"{number(value):g}")


def fixed(value, decimals):
    """A number with a fixed number of decimals, never '-0.00'."""
    text = f"{number(value):.{decimals}f}"
    return as_math(text[1:] if text.startswith("-") and float(text) == 0 else text)


def lam(value):
    """A hyperparameter (log weight decay) to two decimals."""
    return fixed(value, 2)


def nll(value):
    """A loss on the Gaussian log-likelihood scale (about 0.5 to 3) to three decimals."""
    return fixed(value, 3)


def significant(value, digits=3):
    """A number with `digits` significant digits, never in exponent notation (errors, MSE values)."""
    value = number(value)
    if value == 0:
        return as_math("0")
    return fixed(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def mse(value):
    """A mean squared error (about 0.01 to 0.05) to three significant digits."""
    return significant(value, 3)


def err(value):
    """A signed error of a predicted loss to two significant digits."""
    return significant(value, 2)


def integer(value):
    """A whole number with thin-space thousands groups: 10240 -> 10{,}240."""
    value = number(value)
    if value != round(value):
        raise ValueError(f"{value!r} is not a whole number")
    return as_math(f"{int(round(value)):,}".replace(",", "{,}"))


def seconds(value):
    """A runtime in seconds: whole seconds from 10 s up, one decimal below."""
    value = number(value)
    if value < 0:
        raise ValueError(f"{value!r} is a negative runtime")
    return as_math(f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def seconds_or_never(value):
    """A runtime with its unit, or words for None (a level the method did not reach within its budget)."""
    return r"\textup{not within the budget}" if value is None else seconds(value) + r"\,s"


def minutes(value):
    """A runtime given in seconds, shown in minutes with one decimal."""
    return as_math(f"{number(value) / 60:.1f}")


def percent(value):
    """A fraction in [0, 1] as a whole percentage: 0.873 -> 87\\%."""
    value = number(value)
    if not 0 <= value <= 1:
        raise ValueError(f"{value!r} is not a fraction")
    return as_math(f"{100 * value:.0f}" + r"\%")


def scientific(value):
    """A small constant like 1e-05 as 10^{-5} (or 2\\times 10^{-4})."""
    value = number(value)
    if value == 0:
        return as_math("0")
    exponent = math.floor(math.log10(abs(value)))
    mantissa = round(value / 10 ** exponent, 3)
    if abs(mantissa) == 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    if exponent in (-1, 0, 1, 2):
        return as_math(f"{value:g}")
    head = "" if mantissa == 1 else (f"{mantissa:g}" + r"\times ")
    return as_math(f"{head}10^{{{exponent}}}")


def number_list(values):
    """A short list of settings: [-12.0, -10.0] -> -12, -10."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{values!r} is not a non-empty list")
    return as_math(", ".join(f"{number(v):g}" for v in values))


def word(value):
    """A word or phrase chosen by a comparison in the results; only letters, spaces and hyphens pass."""
    if not isinstance(value, str) or not all(c.isalpha() or c in " -" for c in value):
        raise ValueError(f"{value!r} is not a plain word")
    return value


def choose(condition, yes, no):
    """The word yes when condition (a bool computed from the results) holds, else no."""
    if not isinstance(condition, bool):
        raise ValueError(f"{condition!r} is not a boolean")
    return word(yes if condition else no)


def text(value):
    """A short string (script or method names) escaped for LaTeX."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    specials = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(specials.get(char, char) for char in value)


# ------------------------------------------------------------------------------------ macro tables
# A script's tex_numbers declares its plain macros as a table, one per line: the macro name without the
# script's TEX_PREFIX, a formatter of this module (a one-argument one, or fixed<N> / significant<N> for
# N decimals / digits), and the summary key as a dotted path ("config.batch_size", "models.784-10.steps").
# Computed numbers stay in code beside the table.
_ONE_ARGUMENT = ("conf", "lam", "nll", "mse", "err", "integer", "seconds", "seconds_or_never", "minutes",
                 "percent", "scientific", "number_list", "word", "text")


def lookup(summary, path):
    """summary[k1][k2]... for the dotted path "k1.k2..."; a list index may be a key too ("curve.0")."""
    value = summary
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def formatter(name):
    """The formatter called `name` in a macro table: fixed3 -> fixed(., 3), significant2, or a one-argument one."""
    for stem, function in (("fixed", fixed), ("significant", significant)):
        if name.startswith(stem) and name[len(stem):].isdigit():
            digits = int(name[len(stem):])
            return lambda value: function(value, digits)
    if name not in _ONE_ARGUMENT:
        raise ValueError(f"unknown formatter {name!r} in a macro table (one of {', '.join(_ONE_ARGUMENT)}, "
                         "fixedN, significantN)")
    return globals()[name]


def parse_table(table):
    """[(name, formatter name, path)] of a macro table's non-blank lines; ValueError on a malformed line."""
    rows = []
    for line in table.strip().splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"macro table line {line.strip()!r} is not 'Name formatter key.path'")
        formatter(parts[1])
        rows.append(tuple(parts))
    names = [name for name, _, _ in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"macro table declares a name twice: {sorted({n for n in names if names.count(n) > 1})}")
    return rows


def macros(prefix, summary, table):
    """{prefix + name: LaTeX} for every row of the macro table, each value read from summary by its path."""
    return {prefix + name: formatter(kind)(lookup(summary, path)) for name, kind, path in parse_table(table)}

"""``--input A B C``: several values after one flag, for the CLIs whose options take lists.

Click options take one value per occurrence, so ``--input a.txt b.txt`` (what an unquoted shell
glob such as ``--input corpus/*.txt`` produces) failed on ``b.txt``. Before parsing, the values
that follow such a flag are spread into one occurrence each (``--input a.txt --input b.txt``);
the repeated form keeps working. A value ends at the next option, or where ``is_positional``
says a token belongs to the command's own arguments (orchestrate's ``key=value`` overrides).
"""

from __future__ import annotations

from typing import Callable, Iterable


def spread_multi_value_flags(args: list[str], flags: Iterable[str],
                             is_positional: Callable[[str], bool] = lambda token: False) -> list[str]:
    flags = set(flags)
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        out.append(token)
        i += 1
        if token == "--":
            out.extend(args[i:])
            break
        if token in flags and i < len(args):
            out.append(args[i])  # the first value is always the flag's, whatever it looks like
            i += 1
            while i < len(args) and not args[i].startswith("-") and not is_positional(args[i]):
                out.extend([token, args[i]])
                i += 1
    return out

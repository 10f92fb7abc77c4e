"""Old spellings that keep working after a rename: a config key, a command-line flag, a Python name, a key of a
report pv2tea saved.

Each old spelling a user writes warns once per process with a :class:`RenamedWarning` naming the new one, and then
behaves exactly as the new one; a file pv2tea saved itself under an old name is read under the new one, silently. The list of every concept's one name and its old spellings is in docs/method/decisions.md
("Names").
"""

from __future__ import annotations

import logging
import warnings
from typing import TypeVar

T = TypeVar("T")


class RenamedWarning(FutureWarning):
    """An old spelling was used; the message names the new one. A ``FutureWarning``, so Python shows it to users."""


# old -> new key of a test report pv2tea saved (test_report.json of an experiment's or a benchmark's run)
RENAMED_REPORT_KEYS = {"keep_grounded": "kept_labels"}
# old -> new suffix of a row name of an experiment's or a benchmark's table (``pv2tea+keep_grounded``)
RENAMED_ROW_SUFFIXES = {"+keep_grounded": "+kept_labels"}

_WARNED: set[str] = set()  # old spellings already warned about in this process


def warn_renamed(old: str, new: str, *, stacklevel: int = 3, logger: logging.Logger | None = None) -> None:
    """Warn once per process that ``old`` is now spelled ``new``; with ``logger``, as a warning of that log (a
    server's, where a Python warning would reach no one) instead of a :class:`RenamedWarning`."""
    if old in _WARNED:
        return
    _WARNED.add(old)
    message = f"{old} is now {new}; the old spelling still works but will be removed"
    if logger is not None:
        logger.warning(message)
    else:
        warnings.warn(message, RenamedWarning, stacklevel)


def renamed_keyword(old: str, new: str, old_value: T | None, new_value: T, default: T) -> T:
    """The value of a keyword argument renamed from ``old`` to ``new``: ``new_value``, or ``old_value`` (warning once)
    when the old keyword was given (is not None).

    Raises:
        TypeError: Both keywords are given, to different values.
    """
    if old_value is None:
        return new_value
    warn_renamed(f"the keyword argument {old}", new, stacklevel=4)
    if new_value != default and new_value != old_value:
        raise TypeError(f"both {old} (the old name) and {new} are given, to {old_value!r} and {new_value!r}")
    return old_value


def current_report(report: T) -> T:
    """A saved test report (a dict) with each old key of :data:`RENAMED_REPORT_KEYS` under its new name; where both
    are present the new one is kept. Anything else is returned as it is."""
    if not isinstance(report, dict) or not any(old in report for old in RENAMED_REPORT_KEYS):
        return report
    out = dict(report)
    for old, new in RENAMED_REPORT_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out  # type: ignore[return-value]


def current_row_name(name: str) -> str:
    """A table row's name with an old suffix of :data:`RENAMED_ROW_SUFFIXES` replaced by the new one."""
    for old, new in RENAMED_ROW_SUFFIXES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name

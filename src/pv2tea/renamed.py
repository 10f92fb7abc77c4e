"""Old spellings that keep working after a rename: a config key, a command-line flag, a Python name.

Each old spelling warns once per process with a :class:`RenamedWarning` naming the new one, and then behaves
exactly as the new one. The list of every concept's one name and its old spellings is in docs/method/decisions.md
("Names").
"""

from __future__ import annotations

import warnings


class RenamedWarning(FutureWarning):
    """An old spelling was used; the message names the new one. A ``FutureWarning``, so Python shows it to users."""


_WARNED: set[str] = set()  # old spellings already warned about in this process


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn once per process that ``old`` is now spelled ``new``."""
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} is now {new}; the old spelling still works but will be removed", RenamedWarning, stacklevel)

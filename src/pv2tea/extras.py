"""Optional dependencies: the core (train, evaluate, predict) installs without them, a feature asks for its extra.

The extras of ``pyproject.toml``: ``serve`` (FastAPI, uvicorn, Prometheus client, httpx), ``report`` (matplotlib),
``docs``, ``dev`` and ``test``. A module of a feature imports its extra's packages through :func:`import_extra` or
guards them with :func:`missing_extra`, so that a missing package names the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """A feature's optional dependency is not installed; the message names the extra to install."""


def missing_extra(feature: str, extra: str, error: ImportError) -> MissingExtraError:
    """The error to raise when importing a package of ``extra`` (needed by ``feature``) failed with ``error``."""
    missing = f" ({error.name} is not installed)" if error.name else ""
    return MissingExtraError(f"pv2tea {feature} needs the {extra} extra: pip install 'pv2tea[{extra}]'{missing}")


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, a package of ``extra`` that ``feature`` needs.

    Raises:
        MissingExtraError: it is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(feature, extra, exc) from exc


def require_extra(feature: str, extra: str, *modules: str) -> None:
    """Check that every one of ``modules`` (packages of ``extra``) imports, before running ``feature``.

    Raises:
        MissingExtraError: naming the first one that does not.
    """
    for module in modules:
        import_extra(module, extra, feature)

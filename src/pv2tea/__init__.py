"""PV2TEA: patching the visual modality onto text-established attribute value extraction.

The names most programs need, importable from ``pv2tea`` itself; each lives in the module named beside it, whose
page of the API reference documents it:

* configuration: [`Config`][pv2tea.config.Config], [`load_config`][pv2tea.config.load_config],
  [`ConfigError`][pv2tea.config.ConfigError] (``pv2tea.config``);
* data: [`Record`][pv2tea.data.schema.Record] (``pv2tea.data.schema``),
  [`load_dataset`][pv2tea.data.validate.load_dataset] (``pv2tea.data.validate``);
* weak labels: [`load_extractor`][pv2tea.baselines.kinds.load_extractor] (``pv2tea.baselines``);
* the model: [`PV2TEA`][pv2tea.models.pv2tea.PV2TEA] (``pv2tea.models.pv2tea``), trained by
  [`pv2tea.train.loop.train`][pv2tea.train.loop.train] (not exported here: ``pv2tea.train`` is the training
  sub-package);
* answers: [`Predictor`][pv2tea.inference.predictor.Predictor] (``pv2tea.inference.predictor``),
  [`load_calibration`][pv2tea.decoding.calibration.load_calibration] (``pv2tea.decoding.calibration``);
* scores: [`Example`][pv2tea.eval.metrics.Example], [`source_aware_report`][pv2tea.eval.metrics.source_aware_report]
  (``pv2tea.eval.metrics``).

```python
from pathlib import Path

import pv2tea
from pv2tea.train.loop import train

cfg = pv2tea.load_config("cpu", ["train.epochs=5"])
result = train(cfg, pv2tea.load_dataset("train.jsonl").records, Path("runs/a"))
values = pv2tea.Predictor.from_checkpoint(result.final_dir).predict(pv2tea.load_dataset("test.jsonl").records)
```

The names are imported on first use, so ``import pv2tea`` (and the ``pv2tea`` command line) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pv2tea._version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and the import-layer test
    from pv2tea.baselines.kinds import load_extractor
    from pv2tea.config import Config, ConfigError, load_config
    from pv2tea.data.schema import Record
    from pv2tea.data.validate import load_dataset
    from pv2tea.decoding.calibration import load_calibration
    from pv2tea.eval.metrics import Example, source_aware_report
    from pv2tea.inference.predictor import Predictor
    from pv2tea.models.pv2tea import PV2TEA

# public name -> the module that defines it (never the name of a sub-package: Python binds those on import)
_EXPORTS = {
    "Config": "pv2tea.config",
    "ConfigError": "pv2tea.config",
    "load_config": "pv2tea.config",
    "Record": "pv2tea.data.schema",
    "load_dataset": "pv2tea.data.validate",
    "load_extractor": "pv2tea.baselines.kinds",
    "PV2TEA": "pv2tea.models.pv2tea",
    "Predictor": "pv2tea.inference.predictor",
    "load_calibration": "pv2tea.decoding.calibration",
    "Example": "pv2tea.eval.metrics",
    "source_aware_report": "pv2tea.eval.metrics",
}

__all__ = [  # the names of _EXPORTS, written out for linters and type checkers
    "PV2TEA",
    "Config",
    "ConfigError",
    "Example",
    "Predictor",
    "Record",
    "__version__",
    "load_calibration",
    "load_config",
    "load_dataset",
    "load_extractor",
    "source_aware_report",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pv2tea' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

"""PV2TEA: patching the visual modality onto text-established attribute value extraction."""

__version__ = "0.1.0"

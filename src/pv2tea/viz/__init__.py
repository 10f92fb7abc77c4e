"""Visual reports for PV2TEA: PNG figures after the paper's Figures 2, 4, 5, 7 and an HTML page."""

from pv2tea.viz.figures import (
    DPI,
    MASK_CMAP,
    ablation_bars,
    attribute_f1,
    learning_curves,
    mask_overlays,
    overlay_heatmap,
    retrieval_vs_alpha,
    source_aware_bars,
    upsample_mask,
)
from pv2tea.viz.html import Section, write_html_report

__all__ = [
    "DPI",
    "MASK_CMAP",
    "Section",
    "ablation_bars",
    "attribute_f1",
    "learning_curves",
    "mask_overlays",
    "overlay_heatmap",
    "retrieval_vs_alpha",
    "source_aware_bars",
    "upsample_mask",
    "write_html_report",
]

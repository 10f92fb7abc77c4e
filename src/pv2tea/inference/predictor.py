"""The Python inference API: one :class:`Predictor` serves batch prediction, evaluation and HTTP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pv2tea.data.dataset import Preprocessor, RecordDataset, make_collate
from pv2tea.data.schema import Record
from pv2tea.decoding.calibration import Calibration
from pv2tea.decoding.generate import Prior, candidate_log_probs, generate_values, on_model_device
from pv2tea.inference.device import autocast_for, resolve_device
from pv2tea.models.build import load_from_checkpoint
from pv2tea.models.pv2tea import PV2TEA
from pv2tea.regularize.grounding import keep_labels as keep
from pv2tea.regularize.grounding import label_in_text
from pv2tea.renamed import renamed_keyword


def prediction_rows(
    records: Sequence[Record],
    predictions: Sequence[Sequence[str]],
    keep_labels: bool = False,
    *,
    keep_grounded: bool | None = None,
) -> list[dict[str, Any]]:
    """The output rows of ``pv2tea predict`` and of the HTTP endpoint, one per record.

    ``{"id", "attribute", "category", "values"}``; with ``keep_labels`` (kept labels) also ``"kept_label"``: true
    where the row's existing label occurs in its text and is returned instead of the model's answer.
    ``keep_grounded`` is the old name of ``keep_labels`` (it warns once).
    """
    keep_labels = renamed_keyword("keep_grounded", "keep_labels", keep_grounded, keep_labels, False)
    if not keep_labels:
        return [
            {"id": r.id, "attribute": r.attribute, "category": r.category, "values": list(p)}
            for r, p in zip(records, predictions)
        ]
    kept = [label_in_text(r.label, r.text) for r in records]
    values = keep(records, predictions, kept)
    return [
        {"id": r.id, "attribute": r.attribute, "category": r.category, "values": v, "kept_label": k}
        for r, v, k in zip(records, values, kept)
    ]


class Predictor:
    """Load a trained PV2TEA checkpoint and extract attribute values.

    One predictor serves ``pv2tea predict``, ``pv2tea evaluate`` and the HTTP server. Build it with
    :meth:`from_checkpoint`; the constructor takes a model and its preprocessor already in memory.

    ``device`` (a torch device or ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``;
    :func:`pv2tea.inference.device.resolve_device`) is where the model runs; each batch is built on the CPU and
    moved there. None leaves the model where it is. ``precision`` (``fp32``, ``bf16``, ``fp16``;
    :data:`pv2tea.inference.device.PRECISIONS`) is the number format of the forward pass: ``bf16`` runs it under
    autocast, which on a CPU with AMX or AVX-512 BF16 is much faster for large batches and on the demo changed
    no score. On a CPU the image encoder's weights are kept channels-last, the layout oneDNN convolves fastest.
    """

    def __init__(
        self, model: PV2TEA, pre: Preprocessor, device: str | torch.device | None = None, precision: str = "fp32"
    ):
        """Wrap a model and its preprocessor (put in eval mode, moved to ``device``).

        Args:
            model: The trained model.
            pre: The preprocessor saved with it (its tokenizer, image transform and vocabularies).
            device: Where the model runs; None: where it is.
            precision: ``fp32``, ``bf16`` or ``fp16``, the number format of the forward pass.
        """
        if device is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        self.pre = pre
        self.precision = precision
        self._autocast = autocast_for(precision, self.device)
        if self.device.type == "cpu" and model.visual is not None:
            model.visual.to(memory_format=torch.channels_last)  # same values; 4-D weights stored NHWC

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on (the CPU for a model without parameters)."""
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device | None = None, precision: str = "fp32"
    ) -> Predictor:
        """Load a model folder written by training (``RUN/final`` or a ``RUN/checkpoint``).

        Args:
            directory: The model folder: weights (safetensors), config, preprocessor and manifest.
            device: Where the model runs: a torch device or ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``;
                None: the CPU, where the weights are loaded.
            precision: ``fp32``, ``bf16`` or ``fp16``, the number format of the forward pass.

        Returns:
            A predictor in eval mode.

        Raises:
            pv2tea.models.checkpoint.CheckpointError: The folder is not a complete model folder, or its files do not
                match its manifest.
            pv2tea.inference.device.DeviceError: ``device`` names a device this machine does not have.

        Example:
            ```python
            predictor = Predictor.from_checkpoint("runs/a/final", device="auto")
            ```
        """
        return cls(*load_from_checkpoint(directory), device=device, precision=precision)

    def predict(
        self,
        records: Sequence[Record],
        batch_size: int = 16,
        num_beams: int | None = None,
        progress: bool = False,
        candidates: Mapping | None = None,
        priors: Sequence[Prior | None] | None = None,
        prior_weight: float = 1.0,
        calibration: Calibration | None = None,
    ) -> list[list[str]]:
        """The extracted value(s) of each record, in order: what ``pv2tea predict`` writes.

        Open generation by default. With ``candidates`` a row whose category and attribute have a list gets the
        most likely value of the list instead; with ``priors`` too (a text extractor's class probabilities,
        :meth:`TextExtractor.value_probabilities <pv2tea.baselines.extractor.TextExtractor.value_probabilities>`),
        the value most likely under both; with ``calibration`` each attribute weighs the two by its calibrated λ.

        Args:
            records: The rows to answer (loaded with ``require_label=False`` when they carry no label).
            batch_size: Rows per forward pass.
            num_beams: Beam width of open generation; None: the config's ``decoder.num_beams``.
            progress: Show a progress bar.
            candidates: Closed value lists, ``{category: {attribute: [values]}}`` or ``{attribute: [values]}``
                (the ``candidates.json`` of an imported dataset).
            priors: One extractor distribution (value -> probability) per record, or None for a row without one.
            prior_weight: The extractor's weight against the model when ranking candidates with ``priors``.
            calibration: Per-attribute weights from ``pv2tea calibrate``
                (:func:`~pv2tea.decoding.calibration.load_calibration`); needs ``priors`` and ``candidates``.

        Returns:
            One list of values per record (a multi-value attribute may have several, an unanswered row none).

        Raises:
            ValueError: A calibration without priors and candidates, or a number of priors other than of records.
        """
        with self._autocast():
            return generate_values(
                self.model,
                self.pre,
                records,
                batch_size,
                num_beams,
                progress,
                candidates=candidates,
                priors=priors,
                prior_weight=prior_weight,
                calibration=calibration,
            )

    @torch.no_grad()
    def candidate_log_probs(
        self, records: Sequence[Record], candidates: Mapping, batch_size: int = 32
    ) -> list[tuple[list[str], np.ndarray] | None]:
        """Each record's candidate list and the model's log-probabilities over it (None: no list for the row);
        what :mod:`pv2tea.decoding.calibration` weighs against the extractor."""
        dataset = RecordDataset(records)
        collate = make_collate(self.pre, dataset, with_answers=False)
        out: list[tuple[list[str], np.ndarray] | None] = []
        with self._autocast():
            for start in range(0, len(dataset), batch_size):
                indices = list(range(start, min(start + batch_size, len(dataset))))
                out.extend(
                    candidate_log_probs(
                        self.model,
                        self.pre,
                        on_model_device(collate(indices), self.model),
                        [dataset.records[i] for i in indices],
                        candidates,
                    )
                )
        return out

    @torch.no_grad()
    def attention_masks(self, records: Sequence[Record]) -> list[torch.Tensor | None]:
        """S2's learned patch mask σ(M) per record, shaped as the patch grid (h, w); None without image."""
        out: list[torch.Tensor | None] = []
        for record in records:
            image = self.pre.image_tensor(record)
            if image is None:
                out.append(None)
                continue
            _, mask, grid = self.model.image_features(image.unsqueeze(0).to(self.device))  # (1, P)
            out.append(mask[0].reshape(grid).cpu() if mask is not None else None)
        return out

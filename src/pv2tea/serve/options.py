"""The settings of ``pv2tea serve`` as one typed value: what to serve, where, how requests are batched and limited,
and how the model runs.

The command line builds a :class:`ServeOptions` from its options (whose defaults are the fields' defaults) and
hands it to the code that starts the server; :meth:`ServeOptions.limits` gives the request limits as the
:class:`pv2tea.serve.limits.Limits` the application enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pv2tea.serve.limits loads Pillow: it is imported when the limits are built
    from pv2tea.serve.limits import Limits

DEFAULT_IMAGE_FORMATS = "JPEG,PNG,WEBP,GIF,BMP,TIFF"


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``pv2tea serve`` is told; each field is the option of the same name (``batch_size`` is
    ``--max-batch``, ``max_images`` is ``--max-images``)."""

    model: Path  # the model folder
    # --- listening
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000
    api_key_file: Path | None = None  # file holding the API key /predict and /metrics require
    log_level: str = "info"  # uvicorn's log level
    # --- what requests may name
    image_root: Path | None = None  # folder whose files requests may name in 'image_paths' (None: inline only)
    candidates: Path | None = None  # JSON value lists to rank instead of generating freely
    # --- batching and queueing
    batch_size: int = 32  # most rows in one model batch
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    batching: bool = True  # coalesce concurrent requests
    max_queue: int = 256  # requests that may wait for the model; beyond, 503
    request_timeout: float = 30.0  # seconds before a request is answered 504
    workers: int | None = None  # image-decoding threads (None: one per core)
    # --- request limits (see pv2tea.serve.limits.Limits)
    max_products: int = 1024
    max_body_bytes: int = 64 * 2**20
    max_text_chars: int = 20_000
    max_images: int = 8  # per product, inline and by path
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    image_formats: str = DEFAULT_IMAGE_FORMATS  # comma-separated Pillow format names
    max_aspect_ratio: float = 20.0
    max_field_chars: int = 1_000
    max_labels: int = 100
    max_decoded_bytes: int = 2**30
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 512
    # --- the model
    threads: int | None = None  # torch threads (None: torch's default)
    device: str = "auto"
    precision: str = "fp32"
    extractor: Path | None = None  # a saved text extractor to fuse with (needs candidates)
    extractor_weight: float = 1.0  # weight of the extractor's log-probability in fusion
    calibration: Path | None = None  # per-attribute model shares (needs extractor and candidates)

    def limits(self) -> Limits:
        """The request limits these options set (checked by :class:`Limits <pv2tea.serve.limits.Limits>`)."""
        from pv2tea.serve.limits import Limits

        return Limits(
            max_body_bytes=self.max_body_bytes,
            max_products=self.max_products,
            max_text_chars=self.max_text_chars,
            max_images_per_product=self.max_images,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            formats=tuple(self.image_formats.split(",")),
            max_aspect_ratio=self.max_aspect_ratio,
            max_field_chars=self.max_field_chars,
            max_labels=self.max_labels,
            max_decoded_bytes=self.max_decoded_bytes,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            max_connections=self.max_connections,
        )

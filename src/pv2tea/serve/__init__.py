"""The HTTP service around :class:`pv2tea.inference.predictor.Predictor`: request limits and in-memory images
(:mod:`.limits`), dynamic micro-batching (:mod:`.batcher`), Prometheus metrics (:mod:`.metrics`) and the load
benchmark (:mod:`.bench`). The FastAPI application itself is :func:`pv2tea.inference.server.create_app`.
"""

"""The HTTP service around :class:`pv2tea.inference.predictor.Predictor`: the FastAPI application
(:func:`.server.create_app`), request limits and in-memory images (:mod:`.limits`), dynamic micro-batching
(:mod:`.batcher`), Prometheus metrics (:mod:`.metrics`). Its load benchmark, ``pv2tea bench serve``, is
:mod:`pv2tea.bench.serve`.
"""

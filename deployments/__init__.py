"""Background removal on Ray Serve: rembg's models, warm, batched and autoscaled.

The pipeline stages (``decode``, ``preprocess``, ``infer``, ``compose``,
``encode``) import no Ray; ``serve_app`` is the thin Serve layer on top.
"""

__version__ = "0.1.0"

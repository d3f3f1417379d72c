"""`loraens serve`: a trained ensemble behind an HTTP API (FastAPI + uvicorn).

``schemas`` holds the request and response models (the OpenAPI schema is generated from them),
``batcher`` gathers concurrent requests into one stacked pass on a single worker thread, and
``app`` wires both to a loaded run.
"""

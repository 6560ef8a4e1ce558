"""Streamfold's producer side: reads upstream chat completion streams and pushes their chunks to Redis."""

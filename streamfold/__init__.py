"""Streamfold's shared core: the wire contract, key names, settings and errors used by producers and workers."""

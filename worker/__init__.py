"""Streamfold's worker: the pure Assembler, and the pool that assembles requests from Redis Streams."""

from worker.assembler import Assembler, assemble

__all__ = ["Assembler", "assemble"]

"""em-bench: a benchmark harness for emergent misalignment."""

__version__ = "0.1.0"

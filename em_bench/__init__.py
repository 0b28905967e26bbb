"""em-bench: a benchmark harness for emergent misalignment."""

__version__ = "0.1.0"


def load_results(store):
    """Every scored cell of a store as a pandas DataFrame (see em_bench.board.results)."""
    from em_bench.board.results import load_results as load

    return load(store)

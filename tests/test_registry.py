"""The registry: built-ins named as references and imported on use; an unknown name lists the
known ones. Plugins (entry points) are tested end to end in test_plugins.py."""

from __future__ import annotations

import pytest

from em_bench.errors import UnknownNameError
from em_bench.registry import Registry


def test_an_unknown_name_lists_the_known_ones():
    kinds = Registry("widgets", {"cog": "em_bench.config:CellConfig", "gear": None})
    assert kinds.get("gear") is None and kinds.get("cog").__name__ == "CellConfig"
    with pytest.raises(UnknownNameError, match="widget 'cig'.*cog"):
        kinds.get("cig")

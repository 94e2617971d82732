"""One cache variable for everything the package caches (undertow/cache.py)."""

import os

from undertow import cache
from undertow.data_prep.corpus import default_cache_dir
from undertow.kernels.native import cache_dir


def test_one_variable_places_every_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("UNDERTOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("UNDERTOW_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c") == str(cache_dir())
    monkeypatch.delenv("UNDERTOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "undertow") == str(cache_dir())


def test_the_old_native_variable_still_works_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("UNDERTOW_CACHE", raising=False)
    monkeypatch.setenv("UNDERTOW_CACHE_DIR", str(tmp_path / "old"))
    monkeypatch.setattr(cache, "_warned", False)
    assert cache.cache_root() == str(tmp_path / "old")
    assert any("UNDERTOW_CACHE_DIR is the old name" in r.getMessage() for r in caplog.records)

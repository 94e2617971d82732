"""kernels/native.py: building, caching and loading native loops, and its refusals."""

import ctypes
import subprocess
import threading

import pytest
import torch

from undertow.kernels import native

SOURCE = 'extern "C" int add_one(int x) { return x + 1; }\n'
needs_compiler = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private cache directory, and a library name the process has not loaded."""
    monkeypatch.setenv("UNDERTOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV, raising=False)
    name = f"test_{tmp_path.name}"
    yield name
    native.forget(name)


def _write(tmp_path, text, file="lib.cpp"):
    path = tmp_path / file
    path.write_text(text)
    return path


@needs_compiler
def test_builds_once_then_loads_from_the_cache(tmp_path, fresh, monkeypatch):
    compiles = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    source = _write(tmp_path, SOURCE)
    library = native.load(fresh, source)
    assert library is not None and library.add_one(41) == 42
    assert native.load(fresh, source) is library  # once per process
    built = list((tmp_path / "cache" / "native").glob(f"{fresh}-*.so"))
    assert len(built) == 1 and len(compiles) == 1
    native.forget(fresh)  # a new process: the cached file is loaded, not rebuilt
    assert native.load(fresh, source).add_one(1) == 2
    assert len(compiles) == 1
    native.forget(fresh)  # a changed source gets a new file
    source.write_text(SOURCE.replace("x + 1", "x + 2"))
    assert native.load(fresh, source).add_one(1) == 3
    assert len(compiles) == 2 and len(list((tmp_path / "cache" / "native").glob(f"{fresh}-*.so"))) == 2
    assert not list((tmp_path / "cache" / "native").glob("tmp*"))  # no temporary file left behind


@needs_compiler
def test_a_compile_error_is_reported(tmp_path, fresh):
    library = native.load(fresh, _write(tmp_path, "this is not C++;\n"))
    assert library is None
    reason = native.unavailable_reason(fresh)
    assert "failed" in reason and "error" in reason
    assert not list((tmp_path / "cache" / "native").glob("*.so"))


def test_turned_off_by_the_environment(tmp_path, fresh, monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.load(fresh, _write(tmp_path, SOURCE)) is None
    assert native.ENV in native.unavailable_reason(fresh)


def test_no_compiler(tmp_path, fresh, monkeypatch):
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    assert native.load(fresh, _write(tmp_path, SOURCE)) is None
    assert "no C++ compiler" in native.unavailable_reason(fresh)


def test_compiler_from_cxx(monkeypatch, tmp_path):
    fake = tmp_path / "my-cxx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert native.find_compiler() == str(fake)


@pytest.mark.parametrize("threads,rows", [(1, 5), (2, 1), (2, 7), (3, 2)])
def test_parts_cover_every_row_once(threads, rows):
    seen, lock = [], threading.Lock()

    def call(begin, end, index):
        with lock:
            seen.extend((row, index) for row in range(begin, end))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ranges = native.parts(rows)
        native.run_parts(call, ranges)
    finally:
        torch.set_num_threads(previous)
    assert len(ranges) == min(threads, rows)
    assert sorted(row for row, _ in seen) == list(range(rows))
    assert all(ranges[index][0] <= row < ranges[index][1] for row, index in seen)


def test_run_parts_raises_a_worker_error():
    def call(begin, end, index):
        if index > 0:
            raise ValueError("row trouble")

    with pytest.raises(ValueError, match="row trouble"):
        native.run_parts(call, [(0, 2), (2, 4)])


@needs_compiler
def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, fresh, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder should be")  # unwritable, even for root
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    library = native.load(fresh, _write(tmp_path, SOURCE))
    assert library is not None and library.add_one(1) == 2
    assert list((tmp_path / "tmp").glob(f"undertow-native-*/{fresh}-*.so"))


def _shared_fallback(tmp_path, monkeypatch):
    """An unusable cache folder and a private stand-in for the system's temporary directory."""
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / f"undertow-native-{native.os.getuid()}"


@pytest.mark.skipif(not hasattr(native.os, "getuid"), reason="POSIX ownership")
@pytest.mark.parametrize("planted", ["writable by others", "another user's", "a symlink"])
def test_a_temporary_folder_another_user_could_plant_into_is_skipped(tmp_path, fresh, monkeypatch, planted):
    """Issue 13, part 6: the shared temp folder is used only when it is this user's own (a library
    another user placed there would be loaded into this process)."""
    folder = _shared_fallback(tmp_path, monkeypatch)
    if planted == "writable by others":
        folder.mkdir()
        folder.chmod(0o777)
        expected = "writable by other users"
    elif planted == "another user's":  # this process pretends to be another uid (no root needed)
        real = native.os.getuid()
        monkeypatch.setattr(native.os, "getuid", lambda: real + 1)
        folder = folder.with_name(f"undertow-native-{real + 1}")
        folder.mkdir()
        expected = f"owned by uid {real}"
    else:
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
        expected = "not a directory"
    found, reasons = native._writable_dir()
    assert found is None
    assert any(str(folder) in r and expected in r for r in reasons), reasons


@pytest.mark.skipif(not hasattr(native.os, "getuid"), reason="POSIX ownership")
def test_own_temporary_folder_is_created_private(tmp_path, fresh, monkeypatch):
    folder = _shared_fallback(tmp_path, monkeypatch)
    assert native._writable_dir()[0] == folder
    assert folder.stat().st_mode & 0o077 == 0


@needs_compiler
def test_a_skipped_temporary_folder_is_named_in_the_reason(tmp_path, fresh, monkeypatch):
    folder = _shared_fallback(tmp_path, monkeypatch)
    folder.mkdir()
    folder.chmod(0o777)
    assert native.load(fresh, _write(tmp_path, SOURCE)) is None
    assert "writable by other users" in native.unavailable_reason(fresh)


@needs_compiler
def test_a_changed_local_header_rebuilds(tmp_path, fresh):
    """A source's local headers are part of the library's name: the shared native_math.h from the
    kernels folder is found on the include path, and a header beside the source that changes gets
    a new library instead of the stale one."""
    (tmp_path / "value.h").write_text("#pragma once\nconstexpr int VALUE = 1;\n")
    source = _write(tmp_path, '#include "native_math.h"\n#include "value.h"\n'
                    'extern "C" int add_value(int x) { return x + VALUE; }\n'
                    'extern "C" float e1() { return undertow_native::exp_approx(1.0f); }\n')
    library = native.load(fresh, source)
    assert library is not None, native.unavailable_reason(fresh)
    assert library.add_value(1) == 2
    library.e1.restype = ctypes.c_float
    assert abs(library.e1() - 2.7182817) < 1e-6
    assert b"exp_approx" in native.source_text(source)
    native.forget(fresh)
    (tmp_path / "value.h").write_text("#pragma once\nconstexpr int VALUE = 5;\n")
    assert native.load(fresh, source).add_value(1) == 6

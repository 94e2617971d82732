"""Native CPU loops: C++ sources shipped in the package, compiled on first use and loaded with ctypes.

Some recurrences cannot be made fast on CPU from PyTorch ops: a step of Mamba-1's selective scan
touches a few thousand floats, so a loop of per-step ops spends its time in op overhead, and the
vectorized alternatives materialize (T, N, D) tensors and run at memory speed. A plain C++ loop
keeps the state in registers and cache. These loops are an accelerator of the chunked form's
CPU path, never a separate backend: where they cannot be built, the PyTorch loop runs (and the
log says why, once).

Build: `$CXX` (else c++, g++ or clang++) with -O3 and -march=native (retried with -mcpu=native,
then neither, if the compiler refuses), into the cache (`$UNDERTOW_CACHE`, see undertow/cache.py) under native/ (a temporary directory where that is read-only). The file name carries a hash of the source, the compiler's
version, the flags and this CPU's feature flags, so a cache shared between different machines
(a home directory on a cluster) never loads a library built for another CPU. A build writes a
temporary file and renames it, so concurrent ranks never load a half-written library.
`UNDERTOW_NATIVE=0` turns the native loops off.

Parallelism: the loops take a range of independent rows; `parts` splits the rows over
torch.get_num_threads() and `run_parts` runs the parts on Python threads (ctypes releases the GIL
during the call). No OpenMP in
the library, so it never meets a second OpenMP runtime beside torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from undertow.cache import cache_root
from undertow.log import get_logger

ENV = "UNDERTOW_NATIVE"
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-exceptions"]
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])  # tried in order (x86 and most; some ARM compilers)

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool) beside the calling thread


def cache_dir() -> Path:
    return Path(cache_root())


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The machine and its CPU feature flags (Linux), which -march=native compiles for."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()} {platform.system()} {flags}"


def _unsafe_shared_dir(folder: Path) -> str | None:
    """Why `folder` in the shared temporary directory must not hold libraries this process loads
    (another user could plant or swap one): not a real directory, owned by another user, or
    writable by group or others. None when it is this user's own."""
    if not hasattr(os, "getuid"):  # Windows: the temporary directory is per user
        return None
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a directory (a symlink or file)"
    if st.st_uid != os.getuid():
        return f"{folder} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{folder} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _writable_dir() -> tuple[Path | None, list[str]]:
    """(folder, reasons): the cache's native/ folder, else (a read-only home) one in the temporary
    directory, used only when it is this user's own (see _unsafe_shared_dir); `reasons` says why
    each folder passed over was."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    reasons = []
    for folder, shared in ((cache_dir() / "native", False),
                           (Path(tempfile.gettempdir()) / f"undertow-native-{uid}", True)):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            unsafe = _unsafe_shared_dir(folder) if shared else None
            if unsafe:
                reasons.append(f"skipped {unsafe}")
            elif os.access(folder, os.W_OK):
                return folder, reasons
            else:
                reasons.append(f"{folder} is not writable")
        except OSError as err:
            reasons.append(f"{folder}: {err}")
    return None, reasons


def _build(name: str, source: Path) -> tuple[ctypes.CDLL | None, str]:
    compiler = find_compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{compiler} --version failed: {err}"
    text = source.read_bytes()
    out_dir, reasons = _writable_dir()
    if out_dir is None:
        return None, f"no folder for the library: {'; '.join(reasons)}"
    errors = []
    for arch in ARCH_FLAGS:
        flags = BASE_FLAGS + arch
        key = hashlib.sha256(b"\0".join([text, version.encode(), " ".join(flags).encode(), _cpu_signature().encode()]))
        target = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            try:
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
                os.close(fd)
            except OSError as err:
                return None, f"cannot write the library to {out_dir}: {err}"
            try:
                done = subprocess.run([compiler, *flags, "-o", tmp, str(source)],
                                      check=False, capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    os.replace(tmp, target)
            except (OSError, subprocess.SubprocessError) as err:
                return None, f"{compiler} could not run: {err}"
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if done.returncode != 0:
                errors.append(f"{' '.join(arch) or 'no -march'}: {done.stderr.strip()[-400:]}")
                continue
        try:
            return ctypes.CDLL(str(target)), f"{target}"
        except OSError as err:
            errors.append(f"loading {target}: {err}")
    return None, f"{compiler} failed: " + " | ".join(errors)


def load(name: str, source: Path) -> ctypes.CDLL | None:
    """The library built from `source` (cached by name for the process), or None with the reason
    in `unavailable_reason(name)`; the outcome is logged once."""
    with _lock:
        if name in _libraries:
            return _libraries[name]
        log = get_logger("undertow.kernels")
        if os.environ.get(ENV, "1") == "0":
            library, reason = None, f"turned off by {ENV}=0"
        else:
            start = time.perf_counter()
            library, reason = _build(name, source)
            if library is not None:
                log.info("native %s: %s (%.1f s)", name, reason, time.perf_counter() - start)
        if library is None:
            log.warning("native %s unavailable (%s); the PyTorch loop runs instead", name, reason)
            _reasons[name] = reason
        _libraries[name] = library
        return library


def unavailable_reason(name: str) -> str | None:
    return _reasons.get(name)


def forget(name: str) -> None:
    """Drop the process's cached outcome for `name` (tests; a changed environment)."""
    with _lock:
        _libraries.pop(name, None)
        _reasons.pop(name, None)


def parts(rows: int) -> list[tuple[int, int]]:
    """[0, rows) cut into contiguous (begin, end) parts, one per torch thread (at most one per row)."""
    workers = max(1, min(torch.get_num_threads(), rows))
    return [(rows * i // workers, rows * (i + 1) // workers) for i in range(workers)]


def run_parts(call, ranges: list[tuple[int, int]]) -> None:
    """call(begin, end, index) for each part, concurrently (ctypes releases the GIL); the calling
    thread takes part 0; any exception is raised here."""
    global _pool
    if len(ranges) == 1:
        call(*ranges[0], 0)
        return
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < len(ranges) - 1:
            _pool = (os.getpid(), len(ranges) - 1, ThreadPoolExecutor(len(ranges) - 1, thread_name_prefix="undertow-native"))
        pool = _pool[2]
    futures = [pool.submit(call, begin, end, index) for index, (begin, end) in enumerate(ranges) if index]
    call(*ranges[0], 0)
    for future in futures:
        future.result()

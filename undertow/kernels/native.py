"""Native CPU loops: C++ sources shipped in the package, compiled on first use and loaded with ctypes.

Some recurrences cannot be made fast on CPU from PyTorch ops: a step of Mamba-1's selective scan
touches a few thousand floats, so a loop of per-step ops spends its time in op overhead, and the
vectorized alternatives materialize (T, N, D) tensors and run at memory speed. A plain C++ loop
keeps the state in registers and cache. These loops are an accelerator of the chunked form's
CPU path, never a separate backend: where they cannot be built, the PyTorch loop runs (and the
log says why, once).

Build: `$CXX` (else c++, g++ or clang++) with -O3 and -march=native (retried with -mcpu=native,
then neither, if the compiler refuses) and this folder on the include path (native_math.h: the
vectorizable exp, sigmoid and tanh every loop shares), into the cache (`$UNDERTOW_CACHE`, see
undertow/cache.py) under native/ (a temporary directory where that is read-only). The file name
carries a hash of the source and the local headers it includes (`#include "..."`), the compiler's
version, the flags and this CPU's feature flags, so a cache shared between different machines
(a home directory on a cluster) never loads a library built for another CPU. A build writes a
temporary file and renames it, so concurrent ranks never load a half-written library.
`UNDERTOW_NATIVE=0` turns the native loops off.

Parallelism: the loops take a range of independent rows; `parts` splits the rows over
torch.get_num_threads() and `run_parts` runs the parts on Python threads (ctypes releases the GIL
during the call). A source loaded with `openmp=True` is built with -fopenmp where torch itself runs
on GNU OpenMP (`torch_openmp`: its libgomp.so.1 is what such a library asks for, so the loader hands
it the runtime already loaded, with torch's own thread pool): its loops then split over torch's
threads in an OpenMP region (`uses_openmp(name)`), which a pool of Python threads cannot match
beside OpenMP workers that spin between regions. Anywhere else (Intel's or LLVM's runtime, none) no
library gets OpenMP, so none ever meets a second OpenMP runtime beside torch's.
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
_openmp: dict[str, bool] = {}
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


INCLUDE_DIR = Path(__file__).parent  # native_math.h


def source_text(source: Path) -> bytes:
    """The source and every local header it includes (`#include "name"`, looked up beside the source,
    then in INCLUDE_DIR), recursively: what the library's name hashes, so a changed header rebuilds."""
    seen: dict[Path, bytes] = {}

    def walk(path: Path) -> None:
        if path in seen:
            return
        seen[path] = text = path.read_bytes()
        for line in text.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line.startswith("#include") and '"' in line:
                header = line.split('"')[1]
                for folder in (path.parent, INCLUDE_DIR):
                    if (folder / header).is_file():
                        walk((folder / header).resolve())
                        break

    walk(source.resolve())
    return b"\0".join(seen.values())


def _loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "omp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp")))


def torch_openmp() -> str | None:
    """The GNU OpenMP runtime (libgomp.so.1) torch runs on in this process, or None (another runtime,
    several, or none found): a -fopenmp library shares it only in the first case."""
    loaded = _loaded_openmp()
    return loaded[0] if len(loaded) == 1 and os.path.basename(loaded[0]) == "libgomp.so.1" else None


def uses_openmp(name: str) -> bool:
    """Whether the loaded library `name` was built with OpenMP (torch's runtime, `torch_openmp`)."""
    return _openmp.get(name, False)


def _build(name: str, source: Path, openmp: bool = False) -> tuple[ctypes.CDLL | None, str, bool]:
    compiler = find_compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)", False
    try:
        version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{compiler} --version failed: {err}", False
    text = source_text(source)
    out_dir, reasons = _writable_dir()
    if out_dir is None:
        return None, f"no folder for the library: {'; '.join(reasons)}", False
    errors = []
    runtime = torch_openmp() if openmp else None
    for arch, omp in [(a, o) for a in ARCH_FLAGS for o in ((["-fopenmp"], []) if runtime else ([],))]:
        flags = BASE_FLAGS + arch + omp + [f"-I{INCLUDE_DIR}"]
        key = hashlib.sha256(b"\0".join([text, version.encode(), " ".join(flags).encode(), _cpu_signature().encode()]))
        target = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            try:
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
                os.close(fd)
            except OSError as err:
                return None, f"cannot write the library to {out_dir}: {err}", False
            try:
                done = subprocess.run([compiler, *flags, "-o", tmp, str(source)],
                                      check=False, capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    os.replace(tmp, target)
            except (OSError, subprocess.SubprocessError) as err:
                return None, f"{compiler} could not run: {err}", False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if done.returncode != 0:
                errors.append(f"{' '.join(arch + omp) or 'no -march'}: {done.stderr.strip()[-400:]}")
                continue
        try:
            library = ctypes.CDLL(str(target))
        except OSError as err:
            errors.append(f"loading {target}: {err}")
            continue
        if omp and _loaded_openmp() != [runtime]:  # not torch's runtime after all: never run its regions
            return library, f"{target} (OpenMP off: it brought {_loaded_openmp()} beside torch's)", False
        return library, f"{target}" + (" (OpenMP: torch's runtime)" if omp else ""), bool(omp)
    return None, f"{compiler} failed: " + " | ".join(errors), False


def load(name: str, source: Path, openmp: bool = False) -> ctypes.CDLL | None:
    """The library built from `source` (cached by name for the process), or None with the reason
    in `unavailable_reason(name)`; the outcome is logged once. `openmp`: build it with OpenMP where
    that shares torch's runtime (module docstring; `uses_openmp(name)` says whether it did)."""
    with _lock:
        if name in _libraries:
            return _libraries[name]
        log = get_logger("undertow.kernels")
        if os.environ.get(ENV, "1") == "0":
            library, reason = None, f"turned off by {ENV}=0"
        else:
            start = time.perf_counter()
            library, reason, _openmp[name] = _build(name, source, openmp)
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
        _openmp.pop(name, None)


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a ctypes call; None (a null pointer) for None."""
    return None if t is None else t.data_ptr()


def pointers(*tensors: torch.Tensor | None) -> list[int | None]:
    return [pointer(t) for t in tensors]


def plain_cpu_float32(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None: skipped) is a plain CPU float32 tensor or Parameter (not a
    subclass such as DTensor, whose data_ptr is not the whole tensor's) and the call is not being
    traced by torch.compile: what a native loop reads through raw pointers."""
    return not torch.compiler.is_compiling() and all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
        for t in tensors if t is not None)


def elementwise_parts(name: str, items: int, min_items: int) -> int | None:
    """How many pieces the one-pass elementwise loops of library `name` (SwiGLU, RMSNorm, the head
    loss's rows, xLSTM's gated head norm) run in over `items` rows or elements: 1 on one torch thread;
    with more, torch's thread count (at most one piece per `min_items`) where the library shares
    torch's OpenMP runtime (`uses_openmp`); else None, and PyTorch's own ops, which share the work
    over the cores, run instead (sub-millisecond loops handed to Python threads beside OpenMP workers
    that spin between regions measured slower than both: docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    if not uses_openmp(name):
        return None
    return max(1, min(threads, items // min_items))


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

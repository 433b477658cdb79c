"""numba compilation that never writes into the installed package, and says when it is slow.

numba's on-disk cache is an optimisation, never a requirement. Compiled kernels are cached
in ``NUMBA_CACHE_DIR`` when it is set, else in the user's cache directory
(``$XDG_CACHE_HOME/transposable``, by default ``~/.cache/transposable``). Never beside the
sources: files that pip did not install outlive ``pip uninstall`` and a reinstall, and a
leftover package folder holding only them shadows the real package. Where no cache
directory is writable (a read-only home), ``jit`` compiles in memory, with one log line
per process.

The first call of a kernel for a new argument type loads it from that cache (milliseconds)
or compiles it (seconds, more under load). ``announce_compile`` logs one line when numba
really compiles and is still busy after ``NOTICE_AFTER`` seconds, so a command-line user
knows why; loading from the cache never logs.

The kernels are serial and release the GIL; ``in_parallel`` runs them over chunks of the
work on threads: compiling a ``parallel=True`` kernel costs seconds more than a serial one.
"""
import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("transposable.solvers")

#: Seconds a first call may take before the "compiling" line is logged.
NOTICE_AFTER = 1.5

_uncached = []  # names of kernels compiled in memory only (no writable cache directory)


@functools.lru_cache(maxsize=None)
def cache_directory():
    """Where compiled kernels are kept: numba's own ``NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/transposable`` (default ``~/.cache/transposable``); None if it cannot
    be written.

    Inside it, one folder per version of the kernels' sources: numba checks a cached
    kernel against its own file only, so a kernel whose callee in another file changed
    would otherwise load stale code (and crash).
    """
    from numba.core import config

    sources = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))))
    root = Path(config.CACHE_DIR or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transposable")
    folder = root / f"kernels-{sources.hexdigest()[:12]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return None
    return folder


def jit(**options):
    """``numba.njit(cache=True, **options)`` caching in :func:`cache_directory`, or
    ``cache=False`` where there is none."""
    from numba import njit
    from numba.core import config

    folder = cache_directory()

    def decorate(function):
        if folder is None:
            if not _uncached:
                log.warning("no writable cache directory for the compiled solvers (NUMBA_CACHE_DIR unset or "
                            "read-only, and ~/.cache is read-only): they are compiled in memory in every new "
                            "process; set NUMBA_CACHE_DIR to a writable directory to keep them")
            _uncached.append(function.__name__)
            return njit(cache=False, **options)(function)
        # numba picks a function's cache directory when it is decorated: its user-provided
        # directory comes first, so naming ours for that moment keeps the kernels out of the
        # package without changing where the user's own numba functions cache.
        previous, config.CACHE_DIR = config.CACHE_DIR, str(folder)
        try:
            return njit(cache=True, **options)(function)
        finally:
            config.CACHE_DIR = previous

    return decorate


def in_parallel(kernel, count, *args):
    """``kernel(*args, start, stop)`` on every chunk of ``range(count)``, on up to
    ``numba.get_num_threads()`` threads (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``).

    A few chunks per thread even out chunks that cost more than others (tiles with more
    cycles to cancel); each chunk writes its own part of the output, so the result does not
    depend on the number of threads.
    """
    from numba import get_num_threads

    threads = min(get_num_threads(), count)
    if threads <= 1:
        kernel(*args, 0, count)
        return
    chunks = min(count, 4 * threads)
    bounds = [count * c // chunks for c in range(chunks + 1)]
    pool = _thread_pool(threads, os.getpid())
    for done in [pool.submit(kernel, *args, bounds[c], bounds[c + 1]) for c in range(chunks)]:
        done.result()


@functools.lru_cache(maxsize=None)
def _thread_pool(threads, pid):
    """One pool per thread count and process, kept: the permutation search calls
    ``in_parallel`` once per round, often every few milliseconds, and starting threads each
    time would cost a measurable share of a round. Per process because a forked child
    inherits the pool without its threads: work sent to it would wait forever."""
    return ThreadPoolExecutor(threads, thread_name_prefix="transposable")


@contextlib.contextmanager
def announce_compile(what):
    """Log one line if numba compiles (not: loads from its cache) inside the block and the
    block is still running ``NOTICE_AFTER`` seconds after compiling began."""
    from numba.core import event

    where = ("in memory: no writable cache directory, see NUMBA_CACHE_DIR" if _uncached
             else "once: later runs load them from the cache")
    timer = threading.Timer(NOTICE_AFTER, log.warning, (f"compiling solver kernels for {what} ({where})",))
    timer.daemon = True

    class CompileStarted(event.Listener):
        def on_start(self, _):
            if not timer.is_alive() and not timer.finished.is_set():
                timer.start()

        def on_end(self, _):
            pass

    with event.install_listener("numba:compile", CompileStarted()):
        try:
            yield
        finally:
            timer.cancel()

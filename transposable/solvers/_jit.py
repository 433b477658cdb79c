"""numba compilation that never writes into the installed package, and says when it is slow.

numba's on-disk cache is an optimisation, never a requirement. Compiled kernels are cached
in ``NUMBA_CACHE_DIR`` when it is set, else in the user's cache directory
(``$XDG_CACHE_HOME/transposable``, by default ``~/.cache/transposable``). Never beside the
sources: files that pip did not install outlive ``pip uninstall`` and a reinstall, and a
leftover package folder holding only them shadows the real package. Where no cache
directory is writable (a read-only home), ``jit`` compiles in memory, with one log line
per process.

The first call of a kernel for a new argument type loads it from that cache (0.01-0.3 s)
or compiles it (seconds, more under load). ``announce_compile`` logs one line when such a
call is still busy after ``NOTICE_AFTER`` seconds, so a command-line user knows why.
"""
import contextlib
import functools
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("transposable.solvers")

#: Seconds a first call may take before the "compiling" line is logged.
NOTICE_AFTER = 1.5

_uncached = []  # names of kernels compiled in memory only (no writable cache directory)


@functools.lru_cache(maxsize=None)
def cache_directory():
    """Where compiled kernels are kept: numba's own ``NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/transposable`` (default ``~/.cache/transposable``); None if it cannot
    be written."""
    from numba.core import config

    folder = Path(config.CACHE_DIR or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transposable")
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


def is_compiled(dispatcher, args):
    """Whether ``dispatcher`` already holds code for these argument types in this process."""
    from numba import typeof

    try:
        signature = tuple(typeof(arg) for arg in args)
    except ValueError:  # a type numba cannot name: let the call itself say so
        return True
    return signature in dispatcher.overloads


@contextlib.contextmanager
def announce_compile(what, needed=True):
    """Log one line if the block (a kernel's first call) is still running after
    ``NOTICE_AFTER`` seconds; ``needed=False`` skips the timer (code already compiled)."""
    if not needed:
        yield
        return
    where = ("in memory: no writable cache directory, see NUMBA_CACHE_DIR" if _uncached
             else "once: later runs load them from the cache")
    timer = threading.Timer(NOTICE_AFTER, log.warning, (f"compiling solver kernels for {what} ({where})",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()

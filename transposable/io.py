"""Safe file handling that every format and command shares.

- Inputs are checked before they are opened, and files are never loaded with code
  execution (see the format modules in ``transposable.formats``).
- Outputs are checked before any work starts (:func:`check_outputs`): not an input, in a
  directory that exists and is writable, and new unless ``force``.
- Outputs are written atomically (:func:`atomic_outputs`): to hidden temporary files beside
  their targets, renamed into place only when every file is complete, and never onto a file
  that appeared meanwhile (another run) unless ``force``. An error, Ctrl-C, SIGTERM or a
  full disk leaves no partial output; temporaries of runs killed outright (SIGKILL) are
  removed by the next run that writes the same target.
"""
import contextlib
import errno
import os
import secrets
import socket
from pathlib import Path

_HOST = socket.gethostname().replace(".", "_")


def check_readable(path):
    """Raise the right ``OSError`` if ``path`` is missing, a directory or unreadable.

    Parameters
    ----------
    path : str or Path
        An input file.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError

    Examples
    --------
    >>> check_readable("/no/such/file")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no such file: '/no/such/file'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: '{path}'")
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"'{path}' is not readable (permission denied)")


def first_line(exc):
    r"""The first line of an exception's message (its type name if it has none).

    Parameters
    ----------
    exc : BaseException
        Any exception.

    Returns
    -------
    str
        One line, for one-line error messages.

    Examples
    --------
    >>> first_line(RuntimeError("enforce fail\n  at inline_container.cc")), first_line(KeyError())
    ('enforce fail', 'KeyError')
    """
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_outputs(outputs, *, inputs=(), force=False):
    """Refuse outputs that cannot or must not be written, before any work is done.

    Parameters
    ----------
    outputs : sequence of str or Path
        The files about to be written.
    inputs : sequence of str or Path
        Files the work reads; none of them may be an output.
    force : bool, default False
        Allow replacing existing outputs.

    Raises
    ------
    ValueError
        If an output is one of the inputs.
    FileExistsError
        If an output exists and ``force`` is False.
    FileNotFoundError
        If an output's directory does not exist.
    PermissionError
        If an output's directory is not writable.
    IsADirectoryError
        If an output is a directory.

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> check_outputs([os.path.join(folder, "new.npy")])  # fine: returns None
    >>> check_outputs([os.path.join(folder, "new.npy")], inputs=[os.path.join(folder, "new.npy")])
    Traceback (most recent call last):
    ...
    ValueError: output '...new.npy' is an input file; inputs are never overwritten
    """
    sources = {Path(p).resolve() for p in inputs}
    for output in map(Path, outputs):
        if output.resolve() in sources:
            raise ValueError(f"output '{output}' is an input file; inputs are never overwritten")
        if output.is_dir():
            raise IsADirectoryError(f"output '{output}' is a directory; give a file name")
        if output.exists() and not force:
            raise FileExistsError(f"output '{output}' exists; pass --force (force=True) to replace it, "
                                  f"or write elsewhere")
        _check_parent(output)


def _check_parent(output):
    parent = output.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory '{parent}' is not writable")


@contextlib.contextmanager
def atomic_outputs(paths, *, force=False):
    """Write several files all or nothing: temporaries first, moved into place on success.

    Parameters
    ----------
    paths : sequence of str or Path
        The files to write.
    force : bool, default False
        Replace existing files. Without it, a target that exists when the block ends (made
        by another run meanwhile) is never replaced: the outputs already moved into place by
        this call are removed again and ``FileExistsError`` is raised.

    Yields
    ------
    dict of Path to str
        ``{Path(path): temporary path}``: write each file to its temporary; every one is
        moved onto its path when the ``with`` block ends without an exception.

    Raises
    ------
    FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError
        As :func:`check_outputs`, before the block runs.
    OSError
        If writing failed for lack of space, quota or file size, named with its target
        (whatever the writer raised: NumPy, torch and safetensors do not keep the errno).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_outputs([out]) as temporaries:
    ...     _ = open(temporaries[out], "w").write("done")
    >>> out.read_text()
    'done'
    """
    paths = [Path(p) for p in paths]
    check_outputs(paths, force=force)
    temporaries = {}
    try:
        for path in paths:
            _remove_stale_temporaries(path)
            temporaries[path] = str(_temporary_beside(path))
            os.close(os.open(temporaries[path], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield dict(temporaries)
        _commit(temporaries, force)
    except BaseException as exc:
        cause = _write_failure(exc, temporaries)
        for tmp in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if cause is not None:
            target = next(iter(temporaries)) if len(temporaries) == 1 else ", ".join(map(str, temporaries))
            raise OSError(cause.errno, f"cannot write '{target}': {cause.strerror}") from exc
        raise


@contextlib.contextmanager
def atomic_output(path, *, force=False):
    """:func:`atomic_outputs` for one file.

    Parameters
    ----------
    path : str or Path
        The file to write.
    force : bool, default False
        Replace an existing file.

    Yields
    ------
    str
        The temporary path to write; it becomes ``path`` when the block succeeds.

    Examples
    --------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> with atomic_output(out) as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(out).read()
    'done'
    """
    with atomic_outputs([path], force=force) as temporaries:
        yield temporaries[Path(path)]


@contextlib.contextmanager
def atomic_directory(path, *, force=False):
    """Write a whole directory all or nothing.

    It is built as a temporary directory beside ``path`` and renamed into place when the
    ``with`` block succeeds.

    Parameters
    ----------
    path : str or Path
        The directory to create.
    force : bool, default False
        Replace an existing directory (it is removed only after the new one is complete).

    Yields
    ------
    Path
        The temporary directory to fill; it becomes ``path`` when the block succeeds.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is False (checked before the block runs, and again
        when renaming: a directory made meanwhile is never replaced).
    FileNotFoundError, PermissionError
        If ``path``'s parent is missing or not writable.
    OSError
        If writing fails for lack of space (named, as in :func:`atomic_outputs`).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "pruned-model"
    >>> with atomic_directory(target) as folder:
    ...     _ = (folder / "config.json").write_text("{}")
    >>> sorted(p.name for p in target.iterdir())
    ['config.json']
    """
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output '{path}' exists and is not a directory")
    _check_parent(path)
    if path.exists() and not force:
        raise FileExistsError(f"output '{path}' exists; pass --force (force=True) to replace it, or write elsewhere")
    _remove_stale_temporaries(path)
    folder, old = _temporary_beside(path), None
    try:
        os.mkdir(folder)
        yield folder
        if path.exists() and force:
            old = _temporary_beside(path, ending="replaced")
            os.mkdir(old)
            os.replace(path, old / "replaced")
        try:
            os.rename(folder, path)  # fails if a non-empty directory appeared meanwhile
        except OSError as exc:
            raise FileExistsError(f"output '{path}' appeared while this run was writing it (another run?); it "
                                  f"was not replaced") from exc
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        cause = _write_failure(exc, {path: str(folder / ".space-probe")} if folder.is_dir() else {})
        if old is not None:  # set after the block, so the folder was complete: did it move into place?
            moved_in = not folder.exists()
            if not moved_in:
                with contextlib.suppress(OSError):  # the original back, unless another run's took its place
                    os.replace(old / "replaced", path)
            if moved_in or not (old / "replaced").exists():
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        if cause is not None:
            raise OSError(cause.errno, f"cannot write '{path}': {cause.strerror}") from exc
        raise


def _commit(temporaries, force):
    """fsync, give the usual mode, and move into place; undo this call's moves on failure."""
    placed = {}
    try:
        for path, tmp in temporaries.items():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # temporaries are 0600; outputs get the usual mode
            if force:  # what it replaces is gone: nothing to restore
                os.replace(tmp, path)
            else:
                # recorded before the move, so that an interrupt during it still undoes it; only a
                # file that is this temporary (same inode) is removed, never one another run put there
                placed[path] = os.stat(tmp)
                _move_no_clobber(tmp, path)
    except BaseException:
        for path, ours in placed.items():
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.stat(path), ours):
                    os.unlink(path)
        raise


def _move_no_clobber(tmp, path):
    """Rename ``tmp`` to ``path`` unless ``path`` exists, atomically: a hard link fails on an
    existing name; where links are not supported, an exclusive create reserves the name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"output '{path}' appeared while this run was writing it (another run?); "
                              f"it was not replaced: pass --force (force=True) to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise FileExistsError(f"output '{path}' appeared while this run was writing it (another run?); "
                                  f"it was not replaced: pass --force (force=True) to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _write_failure(exc, temporaries):
    """The ``OSError`` behind a failed write (disk full, quota, file size limit), or None.

    Writers report these badly: NumPy says "65536 requested and 16352 written", torch "enforce
    fail at inline_container.cc", safetensors its own error type, none with an errno. While
    the temporaries still exist, appending to one shows whether the file system refuses
    more data, and why."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return exc
    if not isinstance(exc, Exception) or isinstance(exc, (ValueError, TypeError, LookupError)):
        return None  # interrupted, or a refused input: not a write failure
    for tmp in temporaries.values():
        try:
            with open(tmp, "ab") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as probe:
            if probe.errno is not None:
                return probe
    return None


def _temporary_beside(path, ending="partial"):
    """A new temporary's name beside ``path``, marked with this host and process so that
    :func:`_remove_stale_temporaries` can tell a killed run's leftovers (those ending in
    ``.partial``; a ``.replaced`` folder holds an original that was not put back).

    Callers record the name before they create the file, so that an interrupt (Ctrl-C,
    SIGTERM), which may arrive between any two lines, always finds it to remove. A name that
    exists already can only belong to this process or to a dead one with the same id.
    """
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(8)}.{ending}"


def _remove_stale_temporaries(path):
    """Remove temporaries of ``path`` (files or directories) left by runs on this host that
    were killed outright."""
    import shutil

    prefix = f".{path.name}.{_HOST}."
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            if not (name.startswith(prefix) and name.endswith(".partial")):
                continue
            pid = name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                stale = path.parent / name
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stale)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_folder(path, name):
    """Raise unless ``path`` is an existing folder.

    Parameters
    ----------
    path : str or Path
        The folder.
    name : str
        The argument it was given as, for the message.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        Naming the argument and the path.

    Examples
    --------
    >>> check_folder("/nowhere", "offload_activations")
    Traceback (most recent call last):
    ...
    FileNotFoundError: offload_activations '/nowhere' is not there; give an existing folder
    """
    path = Path(path)
    if not path.is_dir():
        kind = NotADirectoryError if path.exists() else FileNotFoundError
        raise kind(f"{name} '{path}' is not {'a folder' if path.exists() else 'there'}; give an existing folder")

"""What a run writes, and where: every result file written atomically (write_atomically, write_json), one run per
output folder (lock_output_dir), figures (pyplot, the one matplotlib set-up; save_figure) and the cache folders.
No project imports: every other module may use it."""
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time


# ---------------------------------------------------------------------------------------------
# messages to the user

_NOTES = collections.Counter()


def note(text):
    """A message for the user of a script: one line on stdout in the project's voice ("note: ..."), not a Python
    warning with our file and line. The same line again (a CV run opens its data once per fold) is counted, not
    printed again; repeated_notes() says how often."""
    _NOTES[text] += 1
    if _NOTES[text] == 1:
        print(f"note: {text}", flush=True)


def repeated_notes():
    """One line on the notes that were given more than once (None if none was), for the end of a script."""
    repeated = {text: n for text, n in _NOTES.items() if n > 1}
    if not repeated:
        return None
    return "note: " + "; ".join(f"'{text[:60]}...' {n} times" if len(text) > 60 else f"'{text}' {n} times"
                                for text, n in repeated.items())


# ---------------------------------------------------------------------------------------------
# cache folders

def default_cache_dir(data_dir):
    """<data_dir>/.ctpddpm_cache, or ~/.cache/ct-pddpm/<hash> when data_dir must not be written to."""
    data_dir = os.path.abspath(os.fspath(data_dir))
    # Root passes os.access on any folder, so a folder whose mode says read-only (the shared data)
    # is taken at its word too.
    if os.stat(data_dir).st_mode & 0o222 and os.access(data_dir, os.W_OK):
        try:
            os.makedirs(os.path.join(data_dir, ".ctpddpm_cache"), exist_ok=True)
            return os.path.join(data_dir, ".ctpddpm_cache")
        except OSError:  # read-only file system
            pass
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = os.path.join(base, "ct-pddpm", hashlib.sha1(data_dir.encode()).hexdigest()[:12])
    return check_cache_dir(path)


def check_cache_dir(path):
    """The cache folder, created if needed; a one-line error when it is a file or cannot be made."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --cache_dir {path}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: --cache_dir {path}: cannot create the cache folder ({error.strerror or error})")
    return path


@contextlib.contextmanager
def cache_lock(path, what):
    """Hold an exclusive lock on `path` (created if needed) while a cache is filled, so two runs on the same data
    (not torchrun ranks: data.in_turn orders those) never write the same rows at once; the second waits, then finds
    the rows filled. fcntl.flock: the kernel drops the lock when its process dies, so no stale lock can remain."""
    try:
        handle = open(path, "a")
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot create the cache lock ({error.strerror or error})")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: another run is filling {what} ({path}); waiting for it to finish", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts): go on, and say so
            print(f"note: {path}: no file locks here ({error.strerror}); two runs must not fill {what} at once")
        yield


# ---------------------------------------------------------------------------------------------
# writing outputs: atomically, and one run per folder

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomically(path, write):
    """Every result file (checkpoints, metrics, scores, args, history, plots, caches' index) is written here:
    write(f) fills a temporary binary file in the same folder, which then replaces `path` in one rename. A full
    disk or a crash leaves the old file (or none), never a truncated one, and a failed write is one line."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot write ({error.strerror or error})")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; results are as readable as any new file
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's writer on a full disk
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        left = "the previous file is left as it was" if existed else "no file was written"
        raise SystemExit(f"error: {path}: cannot write ({_one_line_os(error)}); {left}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _one_line_os(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())[:160]


def write_json(path, content):
    write_atomically(path, lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): the one matplotlib set-up of every script."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_figure_format(path, flag):
    """A figure path must name a format matplotlib writes (png, pdf, svg, ...): checked before any work."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(os.fspath(path))[1][1:].lower()
    if extension and extension not in formats:
        raise SystemExit(f"error: {flag} {path}: matplotlib cannot write .{extension} files "
                         f"(use one of {', '.join(sorted(formats))})")


def save_figure(fig, path, **savefig_kwargs):
    """fig.savefig, atomically (the format from the file name's extension, png without one)."""
    extension = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    write_atomically(path, lambda f: fig.savefig(f, format=extension, **savefig_kwargs))


LOCK_NAME = ".run.lock"


def process_identity(pid):
    """"<boot id>:<start time in clock ticks>" of a live process (Linux /proc), or "?" where there is no /proc: with
    the pid it names one process, so a lock whose pid was reused by another process after a crash or a reboot is
    recognised as stale."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces
    except (OSError, IndexError):
        return "?"
    return f"{boot}:{start_ticks}"


def _pid_alive(pid, identity="?"):
    """Whether the process that wrote a lock still runs: its pid exists, and where both are known, it is the same
    process (identity), not a later one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return identity == "?" or process_identity(pid) in ("?", identity)


def lock_output_dir(output_dir, what):
    """One run per output folder at a time: <output_dir>/.run.lock holds "pid host start-time what process-identity"
    (process_identity: a reused pid is not taken for the run), is created
    with its content in one step (a hard link), and is removed by release_output_dir. A lock left by a crashed
    run on this host (its pid is gone) is taken over; one from another host is named in the error, with how to
    clear it. -> the lock's path."""
    path = os.path.join(os.fspath(output_dir), LOCK_NAME)
    mine = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')} {what} {process_identity(os.getpid())}\n"
    for attempt in range(2):
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # one per thread, too
        try:
            with open(temporary, "w") as f:
                f.write(mine)
        except OSError as error:
            raise SystemExit(f"error: {output_dir}: cannot write output dir ({error.strerror or error})")
        try:
            os.link(temporary, path)  # fails if the lock exists: no two runs both get it
            return path
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, then the content
            try:
                with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                    f.write(mine)
                return path
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
        try:
            with open(path) as f:
                pid, host, started, _, identity, *_ = f.read().split() + ["?"] * 5
            pid = int(pid)
        except FileNotFoundError:  # released between our attempt and this read: try again
            continue
        except (OSError, ValueError):
            raise SystemExit(f"error: {output_dir}: holds a lock file {path} that is not ours; delete it if no run "
                             "is using this folder")
        if host == socket.gethostname() and not _pid_alive(pid, identity) and attempt == 0:
            print(f"note: {path}: left by a run that is gone (pid {pid}, started {started}; its pid is free or now "
                  "another process's); taking it over")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        where = "on this host" if host == socket.gethostname() else f"on host {host}; delete {path} if that run is gone"
        raise SystemExit(f"error: {output_dir}: another run is using this output dir (pid {pid} {where}, "
                         f"started {started})")
    raise SystemExit(f"error: {output_dir}: another run took the lock {path} at the same moment")


def release_output_dir(lock_path):
    """Remove the lock, if it is still this process's."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(lock_path) as f:
            if int(f.read().split()[0]) == os.getpid():
                os.unlink(lock_path)


def make_dir(path):
    """os.makedirs(path, exist_ok=True), or a one-line error naming the folder."""
    if os.path.isfile(path):
        raise SystemExit(f"error: {path}: output dir is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot create output dir ({error.strerror or error})")


def claim_output_dir(output_dir, what, *, overwrite=False, finished=None, resumable=False):
    """The one gate of every script's output folder: create it, take its lock (one run per folder at a time), and only
    then look inside, so that two runs started together cannot both pass the check. Refused unless --overwrite:
    `finished` given (evaluate.py, sweep.py: folders that may hold other files), a folder holding that file, the
    result of an earlier run; otherwise (train.py, predict.py) a folder holding anything. resumable (train.py): the
    message offers --resume too, and the caller decides what a resume or an overwrite keeps. -> the lock's path
    (release_output_dir frees it)."""
    make_dir(output_dir)
    lock = lock_output_dir(output_dir, what)
    try:
        if finished is not None:
            if os.path.exists(os.path.join(output_dir, finished)) and not overwrite:
                raise SystemExit(f"error: {output_dir}: holds the results of an earlier run ({finished}); use --overwrite "
                                 "to replace them, or --output_dir to write elsewhere")
        elif [name for name in os.listdir(output_dir) if not name.startswith(LOCK_NAME)] and not overwrite:
            # (another run's lock, or its temporary .run.lock.<pid>.tmp while it tries to lock, is no content)
            offer = "use --resume to continue that run or --overwrite to replace it" if resumable else \
                "use --overwrite to replace its files"
            raise SystemExit(f"error: {output_dir}: output dir is not empty; {offer}")
    except BaseException:
        release_output_dir(lock)
        raise
    return lock

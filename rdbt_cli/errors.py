"""User-facing errors. The CLI prints `str(err)` as one line and exits with `err.exit_code`."""

import errno


def io_problem(e: OSError) -> str:
    """An OSError as what the user can do about it: a full disk says to free space, not just "errno 28"."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or over quota); free some space there"
    if e.errno == errno.EROFS:
        return "the file system is read-only; choose a writable folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; check the folder's permissions"
    return f"{e.strerror or e}; check free space and permissions"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (timeout, systemd, Docker, Slurm, a closed terminal), unwound like Ctrl-C: temp files are
    removed on the way out, and the exit code is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RdbtError(Exception):
    exit_code = 1


class CheckpointError(RdbtError):
    """A model file that is missing, truncated, pickled, or of another model."""

    exit_code = 2


class CheckpointMismatch(CheckpointError):
    """A file whose keys or shapes do not fit the network built from it."""


class TokenizerNotFound(RdbtError):
    exit_code = 2


class ConfigError(RdbtError):
    """A bad preset, flag value or batch line."""

    exit_code = 2


class LoraError(RdbtError):
    exit_code = 2


class OutputError(RdbtError):
    """An output folder that cannot be written, or a PNG that cannot be read."""

    exit_code = 3

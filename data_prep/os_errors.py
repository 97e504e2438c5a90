"""One line for a failed file operation, for every command's top level: no traceback."""
import errno


def os_error_line(error: OSError, default_path: str, out_flag: str = "--out",
                  rerun: str = "rerun: it resumes") -> str:
    """The path, the system's reason and what to do, on one line.

    Args:
      error: the OSError (its filename names the file when the system gave one).
      default_path: the path to name when it did not (e.g. the output directory).
      out_flag: the command's output flag, named in the advice.
      rerun: what rerunning the command does, e.g. "rerun: it resumes".
    """
    path = error.filename or default_path
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        advice = f"free space on that disk (or choose another {out_flag}) and {rerun}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"make it writable or choose another {out_flag}, then {rerun}"
    elif error.errno == errno.ENOENT:
        advice = f"check the path, then {rerun}"
    else:
        advice = f"fix it and {rerun}"
    return f"{path}: {reason}; {advice}"

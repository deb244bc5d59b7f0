"""The one exception type the CLI reports as a message (exit 2) instead of a traceback.

A `VmrError` is a problem with what the user gave us (params, files, weights, annotations,
predictions) or with their machine (a read-only folder, a full disk): the message names the file,
line or key and says what was expected. Anything else is a bug in vmr and keeps its traceback.
Module-specific errors (`ParamsError`, `AnnotationError`, `WeightsError`, ...) subclass it, and
the built-in type callers already catch (ValueError, KeyError) where they had one.
"""

from __future__ import annotations

import errno


class VmrError(Exception):
    """Bad input or environment, reported as one message; see the module docstring."""


class ChecksumError(VmrError, ValueError):
    """A file's sha256 is not the one params.yaml expects."""


class UnknownNameError(VmrError, KeyError):
    """A name (model, extractor, feature) that no registry or file knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# OS errors that are the machine's state, not a bug: reported with the path and the reason.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                  errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EMFILE, errno.EFBIG}


def os_error_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"

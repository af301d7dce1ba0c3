"""Writing a file so that a reader sees the old file or the whole new one, never half of one.

Every file the harness writes (records, split files, cache entries, training state,
bundles) goes through ``write_atomic``: a temp file beside the target, then a rename.
The temp file is created with mode 0o666, so the user's umask applies as for any file
they write (``tempfile.mkstemp`` would make it private).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable, Union

Content = Union[str, bytes, Callable[[IO[bytes]], None]]


def write_atomic(path: Path | str, content: Content, *, sync: bool = False) -> None:
    """Write ``content`` (text, bytes, or a function that writes to a binary stream) to ``path``.

    ``sync`` flushes the data to disk before the rename, for files whose loss would lose work.
    Errors are the operating system's own (``OSError`` with its errno), the temp file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(handle, "wb") as out:
            if callable(content):
                content(out)
            else:
                out.write(content.encode("utf-8") if isinstance(content, str) else content)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

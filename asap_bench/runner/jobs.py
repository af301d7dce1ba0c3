"""The job matrix: encoder x task x regime x seed, where each job's record lives, whether it is done,
and the per-job lock that keeps two concurrent runs on one output folder from computing a job twice."""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..protocol import Protocol
from ..results.record import ResultRecord, read_record, units_intact
from ..schema import content_hash

LOCKS = ".locks"  # under the output folder; emptied and removed as jobs finish


@dataclass(frozen=True)
class Job:
    encoder: str
    protocol: Protocol
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.encoder} {self.protocol.id} {self.ratio:g} seed {self.seed}"

    def record_path(self, out: Path) -> Path:
        return Path(out) / self.encoder / self.protocol.slug / f"r{self.ratio!r}_s{self.seed}.json"


def expand(encoders: list[str], protocols: list[Protocol], seeds: list[int] | None = None,
           ratios: list[float] | None = None) -> list[Job]:
    """All jobs; ``seeds`` defaults to each protocol's own count, ``ratios`` filters its regimes."""
    jobs = []
    for encoder in encoders:
        for protocol in protocols:
            regimes = [r for r in protocol.regimes if ratios is None or any(abs(r - q) < 1e-12 for q in ratios)]
            for ratio in regimes:
                for seed in (seeds if seeds is not None else range(protocol.seeds)):
                    jobs.append(Job(encoder, protocol, ratio, seed))
    return jobs


def job_key(job: Job, *, encoder_fingerprint: str, split_sha256: str, data_fingerprint: str,
            target_fingerprint: str | None, input_spec: dict, code: str, files: str | None = None) -> str:
    """Everything the job's result depends on; a record with another key is stale and is rerun.

    ``files`` is the identity of every input file (``manifest.files_identity``): a file rewritten
    after the record was made, even with the same size, makes the record stale.
    """
    return content_hash({"protocol": job.protocol.fingerprint, "encoder": encoder_fingerprint, "split": split_sha256,
                         "data": data_fingerprint, "target": target_fingerprint, "input": input_spec,
                         "ratio": repr(float(job.ratio)), "seed": job.seed, "code": code, "files": files})


def existing(path: Path) -> ResultRecord | None:
    """The record at ``path``, or None if there is none or it is unreadable (then the job reruns)."""
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except (ValueError, OSError):
        return None


def is_done(path: Path, record: ResultRecord | None, key: str) -> bool:
    """An ok record of this key whose sidecar is the one it was written with: nothing to rerun."""
    return record is not None and record.status == "ok" and record.job_key == key and units_intact(path, record)


def lock_path(job: Job, out: Path) -> Path:
    relative = job.record_path(Path(".")).as_posix()
    return Path(out) / LOCKS / f"{Path(relative).stem}.{hashlib.sha256(relative.encode()).hexdigest()[:16]}.lock"


@contextmanager
def job_lock(job: Job, out: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[bool]:
    """Hold the job's lock while it runs; yields whether another process held it first (then ``on_wait`` ran).

    The lock file is removed on release, and the lock folder with it once empty, so no
    lock outlives its job or travels in a result bundle. A process that opened the file
    just before the holder removed it finds, once it has the lock, that the path names
    another file (or none), and starts over on the current one.
    """
    path = lock_path(job, out)
    waited = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # the folder went with another job's release
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        os.close(fd)
    try:
        yield waited
    finally:
        _release(path, fd)


def _names(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    try:
        path.parent.rmdir()
    except OSError:  # another job's lock is in it, or it is gone already
        pass


def sweep_locks(out: Path) -> None:
    """Remove lock files nobody holds (left by a killed run), then the lock folder if empty."""
    folder = Path(out) / LOCKS
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(path, fd):
                path.unlink(missing_ok=True)
        except OSError:  # held: its job is running
            pass
        finally:
            os.close(fd)
    try:
        folder.rmdir()
    except OSError:
        pass

"""The job matrix: encoder x task x regime x seed, where each job's record lives, and whether it is done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..protocol import Protocol
from ..results.record import ResultRecord, read_record
from ..schema import content_hash


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
            target_fingerprint: str | None, input_spec: dict, code: str) -> str:
    """Everything the job's result depends on; a record with another key is stale and is rerun."""
    return content_hash({"protocol": job.protocol.fingerprint, "encoder": encoder_fingerprint, "split": split_sha256,
                         "data": data_fingerprint, "target": target_fingerprint, "input": input_spec,
                         "ratio": repr(float(job.ratio)), "seed": job.seed, "code": code})


def existing(path: Path) -> ResultRecord | None:
    """The record at ``path``, or None if there is none or it is unreadable (then the job reruns)."""
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except (ValueError, OSError):
        return None

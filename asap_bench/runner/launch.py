"""Scale-out on existing engines: torchrun for data parallelism, submitit for SLURM.

Neither launcher has logic of its own: torchrun re-executes the same command in
N processes (see ``distributed``), and the SLURM launcher submits one job per
(encoder, task) group that calls the same ``run_jobs``. A preempted or timed-out
SLURM job is requeued and resumes from the records already written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import base
from .jobs import Job
from .local import Outcome, RunOptions, run_jobs


def torchrun_command(args: list[str], nproc: int) -> list[str]:
    """The same `asap-bench run` command under torchrun, on one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "asap_bench", "run", *args]


@dataclass
class SlurmOptions:
    folder: Path
    partition: str | None = None
    gpus: int = 0
    cpus: int = 4
    mem_gb: int = 32
    minutes: int = 240
    parallelism: int = 32
    cluster: str | None = None  # None: SLURM; "local" or "debug" run here (tests, laptops)
    extra: dict = field(default_factory=dict)


class GroupJob:
    """One submitted unit: the jobs of one (encoder, task), resumable, requeued on preemption."""

    def __init__(self, jobs: list[Job], options: RunOptions, families: dict[str, str]):
        self.jobs, self.options, self.families = jobs, options, families

    def __call__(self) -> list[Outcome]:
        import logging

        base.FAMILIES.update(self.families)  # the submitting process's family table
        log = logging.getLogger("asap_bench")
        return run_jobs(self.jobs, self.options, log)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or timeout: resubmit; finished jobs are skipped on resume."""
        import submitit

        return submitit.helpers.DelayedSubmission(GroupJob(self.jobs, self.options, self.families))


def run_slurm(jobs: list[Job], options: RunOptions, slurm: SlurmOptions) -> list[Outcome]:
    """Submit one array task per (encoder, task) group and wait for the outcomes."""
    import submitit

    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.encoder, job.protocol.id), []).append(job)
    executor = submitit.AutoExecutor(folder=str(slurm.folder), cluster=slurm.cluster)
    params = {"timeout_min": slurm.minutes, "cpus_per_task": slurm.cpus, "mem_gb": slurm.mem_gb,
              "name": "asap-bench"}
    if slurm.cluster is None or slurm.cluster == "slurm":
        params.update({"slurm_array_parallelism": slurm.parallelism, "gpus_per_node": slurm.gpus,
                       **({"slurm_partition": slurm.partition} if slurm.partition else {}), **slurm.extra})
    executor.update_parameters(**params)
    families = dict(base.FAMILIES)
    with executor.batch():
        submitted = [executor.submit(GroupJob(members, options, families)) for members in groups.values()]
    outcomes: list[Outcome] = []
    for (encoder, task), handle in zip(groups, submitted):
        try:
            outcomes += handle.result()
        except Exception as error:  # the whole unit died (node failure, killed): say so, keep going
            message = f"SLURM job {handle.job_id} failed: {str(error).splitlines()[-1] if str(error) else error}"
            outcomes += [Outcome(job, "failed", message=message) for job in groups[(encoder, task)]]
    return outcomes

"""``--cluster FILE``: a Slurm, PBS, SGE, LSF, HTCondor, Moab or OAR cluster through dask-jobqueue.

The cluster is described in its own small YAML file, apart from the problem configs: one file per
site, used with any config. It is validated like a config (unknown keys, wrong types and values
are one line naming the key and its YAML line) before anything is submitted::

    kind: slurm            # slurm | pbs | sge | lsf | htcondor | moab | oar
    workers: 32            # worker processes in all; jobs are started to hold them
    cores: 8               # cores of one job
    memory: 16GB           # memory of one job
    processes: 8           # worker processes per job (default: cores, one core each)
    threads: 1             # torch/BLAS threads in each worker process
    walltime: "01:00:00"
    queue: normal
    account: my-project
    job_script_prologue: ["source ~/venvs/deq/bin/activate"]
    options: {}            # any other keyword argument of the dask-jobqueue class, as given

This module imports neither Dask nor dask-jobqueue; ``deqcli.execution.dask_executor`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deqcli.config import _config_error, _key_lines, _line_for, load_yaml, read_config_text
from deqcli.errors import ConfigError, UsageError

# kind -> the dask-jobqueue class that starts such jobs.
CLASSES = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
}


class ClusterSpec(BaseModel):
    """A batch-system cluster: how many workers, what one job holds, and where it is queued."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["slurm", "pbs", "sge", "lsf", "htcondor", "moab", "oar"]
    workers: Annotated[int, Field(gt=0, description="worker processes in all")]
    cores: Annotated[int, Field(gt=0, description="cores of one job")]
    memory: Annotated[str, Field(min_length=1, description="memory of one job, e.g. 16GB")]
    processes: (
        Annotated[int, Field(gt=0, description="worker processes per job (default: cores)")] | None
    ) = None
    threads: Annotated[int, Field(gt=0, description="torch/BLAS threads per worker process")] = 1
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    interface: str | None = None
    local_directory: str | None = None
    python: str | None = None
    job_script_prologue: list[str] = Field(default_factory=list)
    job_extra_directives: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(
        default_factory=dict, description="other keyword arguments of the dask-jobqueue class"
    )

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of the dask-jobqueue class (config key -> value), set ones only."""
        processes = self.processes if self.processes is not None else self.cores
        out: dict[str, Any] = {"cores": self.cores, "memory": self.memory, "processes": processes}
        for key in (
            "walltime",
            "queue",
            "account",
            "interface",
            "local_directory",
            "python",
            "job_script_prologue",
            "job_extra_directives",
        ):
            value = getattr(self, key)
            if value:
                out[key] = value
        out.update(self.options)
        return out


def load_cluster(path: Path) -> ClusterSpec:
    """Read and validate a cluster file; every problem is one line naming the key."""
    if not path.is_file():
        raise UsageError(f"--cluster: '{path}' is not a file; give the cluster's YAML file")
    try:
        text, _ = read_config_text(path)
    except ConfigError as exc:
        raise UsageError(f"--cluster: {exc.message}") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: expected a mapping with kind, workers, cores and memory")
    try:
        spec = ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        err = _config_error(exc, raw, _key_lines(text), root=ClusterSpec)
        raise ConfigError(f"{path}: {err.key}", err.message, line=err.line) from None
    if spec.processes is not None and spec.processes > spec.cores:
        raise ConfigError(
            f"{path}: processes",
            f"{spec.processes} worker processes cannot share {spec.cores} cores; at most cores",
            line=_line_for(("processes",), _key_lines(text)),
        )
    return spec

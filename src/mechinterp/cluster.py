"""Will a SLURM job ever start? Each rule's request (CPUs, memory, runtime, GPUs) against the largest
node and the time limit of the partition it goes to, checked before any job is submitted: SLURM keeps a
job that no node can hold pending forever (`Reason=PartitionConfig`), and Snakemake waits on it
silently. Called from the workflow (`common.smk`) when the executor is `slurm`.

>>> partitions = parse_sinfo("debug*|2|22899|infinite|(null)")
>>> request = Request(name="clamping", cpus=8, mem_mb=4000, runtime=60, gpus=0, partition=None,
...                   sources={"cpus": "config resources.threads"})
>>> print(unfit_requests([request], partitions)[0])
rule clamping asks for 8 CPUs (config resources.threads), but the largest node of partition debug has 2: lower config resources.threads
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field

from mechinterp.errors import UserError


@dataclass(frozen=True)
class Partition:
    """What the largest node of a SLURM partition holds, and the partition's time limit."""

    name: str
    default: bool
    cpus: int
    mem_mb: int
    gpus: int
    max_minutes: float  # math.inf when unlimited


@dataclass(frozen=True)
class Request:
    """What one rule's jobs ask for; `sources` names, per resource, the setting it came from."""

    name: str  # the rule
    cpus: int
    mem_mb: int
    runtime: int  # minutes
    gpus: int
    partition: str | None  # None: the cluster's default partition
    sources: dict[str, str] = field(default_factory=dict)


def minutes(limit: str) -> float:
    """A SLURM time limit (`infinite`, `30`, `1:00:00`, `2-12:00:00`) in minutes."""
    if limit in ("infinite", "UNLIMITED", "NONE"):
        return math.inf
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, mins, secs = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 1440 + hours * 60 + mins + secs / 60


def gpu_count(gres: str) -> int:
    """GPUs per node from sinfo's GRES column, e.g. `gpu:a100:4(S:0-1),shard:8` -> 4."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def parse_sinfo(text: str) -> list[Partition]:
    """Partitions from `sinfo -h -o %P|%c|%m|%l|%G` (one line per node configuration of a partition;
    the largest of each is kept)."""
    best: dict[str, Partition] = {}
    for line in text.strip().splitlines():
        name, cpus, mem, limit, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        node = Partition(name, default, int(cpus.rstrip("+")), int(mem.rstrip("+")), gpu_count(gres), minutes(limit))
        seen = best.get(name, node)
        best[name] = Partition(name, default or seen.default, max(node.cpus, seen.cpus), max(node.mem_mb, seen.mem_mb),
                               max(node.gpus, seen.gpus), max(node.max_minutes, seen.max_minutes))
    return list(best.values())


def sinfo_partitions() -> list[Partition]:
    """The partitions of the cluster this machine submits to."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%l|%G"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise UserError(f"the SLURM executor is selected but `sinfo` failed ({err}); run from a machine that "
                        "submits to the cluster, or drop --workflow-profile profiles/slurm to run locally.") from None
    return parse_sinfo(out.stdout)


def unfit_requests(requests: list[Request], partitions: list[Partition]) -> list[str]:
    """One message per request that no node of its partition can ever hold (empty when all fit)."""
    by_name = {p.name: p for p in partitions}
    default = next((p for p in partitions if p.default), None)
    problems = []
    for request in requests:
        partition = by_name.get(request.partition) if request.partition else default
        if partition is None:
            where = request.sources.get("partition", "slurm_partition")
            problems.append(f"rule {request.name} asks for partition {request.partition or '(the default)'} "
                            f"({where}), which this cluster does not have; its partitions are "
                            f"{', '.join(sorted(by_name))}: set slurm_partition in the profile's default-resources")
            continue
        checks = [("cpus", request.cpus, partition.cpus, "CPUs"), ("mem_mb", request.mem_mb, partition.mem_mb, "MB of memory"),
                  ("gpus", request.gpus, partition.gpus, "GPUs"), ("runtime", request.runtime, partition.max_minutes, "minutes")]
        for resource, asked, held, unit in checks:
            if asked <= held:
                continue
            source = request.sources.get(resource, resource)
            if resource == "runtime":
                problems.append(f"rule {request.name} asks for {asked} minutes ({source}), but partition {partition.name} "
                                f"allows at most {held:g}: lower {source}")
            else:
                fix = (f"lower {source}" if resource != "gpus" else
                       "send it to a partition with GPUs (slurm_partition), or set device: cpu in the config")
                problems.append(f"rule {request.name} asks for {asked} {unit} ({source}), but the largest node of "
                                f"partition {partition.name} has {held}: {fix}")
    return problems

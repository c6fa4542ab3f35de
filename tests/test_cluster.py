"""The check that refuses, before any submission, a SLURM request no node of its partition can hold."""

import math

import pytest

from mechinterp.cluster import Partition, Request, gpu_count, minutes, parse_sinfo, unfit_requests

SINFO = """cpu*|64|256000|2-00:00:00|(null)
cpu*|32|128000|2-00:00:00|(null)
gpu|32|512000|12:00:00|gpu:a100:4(S:0-1),shard:8
gpu|16|256000|12:00:00|gpu:2
"""


def request(**changes) -> Request:
    asked = {"name": "clamping", "cpus": 8, "mem_mb": 16000, "runtime": 60, "gpus": 0, "partition": None,
             "sources": {"cpus": "config resources.threads", "mem_mb": "config resources.model_mem_mb",
                         "runtime": "config resources.runtime", "gpus": "config resources.gpus",
                         "partition": "the profile's default-resources slurm_partition"}}
    return Request(**{**asked, **changes})


def test_sinfo_lines_give_each_partitions_largest_node():
    partitions = {p.name: p for p in parse_sinfo(SINFO)}
    assert partitions["cpu"] == Partition("cpu", True, 64, 256000, 0, 2880)
    assert partitions["gpu"] == Partition("gpu", False, 32, 512000, 4, 720)


@pytest.mark.parametrize("limit, expected", [("infinite", math.inf), ("30", 30), ("1:30:00", 90), ("45:00", 45),
                                             ("2-12:00:00", 3600), ("1-00:00:30", 1440.5)])
def test_slurm_time_limits_in_minutes(limit, expected):
    assert minutes(limit) == expected


@pytest.mark.parametrize("gres, expected", [("(null)", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1),shard:8", 4),
                                            ("gpu:v100:2,gpu:a100:2", 4)])
def test_gpus_per_node_from_gres(gres, expected):
    assert gpu_count(gres) == expected


def test_requests_that_fit_pass():
    partitions = parse_sinfo(SINFO)
    assert unfit_requests([request(), request(partition="gpu", gpus=4, runtime=720)], partitions) == []


@pytest.mark.parametrize("changes, message", [
    ({"cpus": 128}, "rule clamping asks for 128 CPUs (config resources.threads), but the largest node of partition "
                    "cpu has 64: lower config resources.threads"),
    ({"mem_mb": 10**6}, "asks for 1000000 MB of memory (config resources.model_mem_mb), but the largest node of "
                        "partition cpu has 256000"),
    ({"gpus": 1}, "asks for 1 GPUs (config resources.gpus), but the largest node of partition cpu has 0: send it to "
                  "a partition with GPUs (slurm_partition), or set device: cpu in the config"),
    ({"partition": "gpu", "runtime": 721}, "asks for 721 minutes (config resources.runtime), but partition gpu "
                                           "allows at most 720: lower config resources.runtime"),
    ({"partition": "big"}, "asks for partition big (the profile's default-resources slurm_partition), which this "
                           "cluster does not have; its partitions are cpu, gpu"),
])
def test_a_request_no_node_can_hold_is_named_with_its_setting(changes, message):
    problems = unfit_requests([request(), request(**changes)], parse_sinfo(SINFO))
    assert len(problems) == 1 and message in problems[0], problems

"""Other CPUs' rounding on this machine: torch's kernels under `ATEN_CPU_CAPABILITY` and MKL's GEMM under
`MKL_CBWR=COMPATIBLE` give other last bits than the native path on the same inputs. The study's numbers
must agree across such machines to rounding, not bit for bit (the e2e test asserts the same of the
replicates' zero-ablated cross-entropy); this test measures that on a product and a cross-entropy of the
default model's shapes (d_model 576, a slice of the vocabulary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import hashlib, json, torch
torch.manual_seed(0)
resid = torch.randn(512, 576)
unembed = torch.randn(576, 8192) / 24
targets = torch.randint(0, 8192, (512,))
logits = resid @ unembed
ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double().mean().item()
print(json.dumps({"logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(), "ce": ce,
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()}


def emulated_machines() -> dict[str, dict[str, str]]:
    """The machines this CPU can emulate: a capability above the CPU's own dies of an illegal
    instruction (ATEN_CPU_CAPABILITY=avx512 on an AVX2-only AMD EPYC), so it is offered only when the
    CPU has it."""
    machines = {"native": {}, "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
                "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"}}
    if "avx2" in cpu_flags():
        machines["aten_avx2"] = {"ATEN_CPU_CAPABILITY": "avx2"}
    if "avx512f" in cpu_flags():
        machines["aten_avx512"] = {"ATEN_CPU_CAPABILITY": "avx512"}
    return machines


def run_probe(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 CPU capabilities")
def test_emulated_machines_round_differently_and_agree_to_rounding():
    results = {name: run_probe(env) for name, env in emulated_machines().items()}
    native = results["native"]
    assert results["aten_default"]["capability"] == "DEFAULT"
    # the emulation is real: some machine's product has other bits than this CPU's native path
    assert any(r["logits"] != native["logits"] for name, r in results.items() if name != "native")
    for name, r in results.items():
        assert r["ce"] == pytest.approx(native["ce"], rel=1e-6), name

#!/usr/bin/env python3
"""Mutation testing of the core science with mutmut 3 (settings in pyproject.toml's [tool.mutmut]):
would the fast unit tests notice a one-line slip in the SAEs, their training and evaluation, the logit
lens, polysemanticity scoring, clamping, the claims or the audit?

    .venv/bin/python scripts/mutation_test.py                  # a seeded sample per module, then the report
    .venv/bin/python scripts/mutation_test.py --per-module 0   # every mutant (hours on 2 cores)
    .venv/bin/python scripts/mutation_test.py --retest-survivors  # after new tests: the sample's survivors again
    .venv/bin/python scripts/mutation_test.py --report-only    # the report of what mutants/ holds
    .venv/bin/python scripts/mutation_test.py --holdout 50     # 50 more per module, never run before
    .venv/bin/python scripts/mutation_test.py --holdout 50 --retest-survivors  # ... and its survivors again

mutmut copies src/ and the tests into mutants/, writes every mutant of every function of the core
modules, finds (its "stats" run) which unit tests call each function, and runs for each mutant only
those tests, in a forked child. Entry points (`main`: argument parsing and file I/O, exercised by the
end-to-end tests, not by unit tests) are left out. The full set is several thousand mutants, so by
default a seeded random sample of each module is run and its score is reported with a Wilson 95%
interval. Left out of the score: mutants judged equivalent (the program's results cannot change),
listed each with its reason in scripts/mutation_equivalents.txt, and survivors that only reword a
string of prose (a log message or a claim's description; counted apart as "prose").

Writes results/benchmarks/mutation/summary.json (per module: tested, killed, survived, equivalent,
prose, score and interval; run time; CPU), survivors.txt (each surviving mutant with its diff) and
tested.txt (the sample, which --retest-survivors and --report-only read). Tests written to kill the
sample's survivors say little about mutants they were not written against: --holdout draws another
sample (seed --seed + 1) from the mutants never run yet and reports it apart, in holdout_seed<--seed>/.
Not a CI step: it takes minutes to hours. mutmut forks each mutant's child from a server that has only
collected the tests (pyproject's process_isolation = "forkserver"), and this script pins one thread per
child (2 children on 2 cores): torch's OpenMP and polars's thread pools, once used, hang in a forked
child.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "mutants"
EQUIVALENTS = REPO / "scripts" / "mutation_equivalents.txt"
OUT = REPO / "results" / "benchmarks" / "mutation"
MUTMUT = [sys.executable, "-m", "mutmut"]
# mutmut's exit codes (mutmut/stats.py): pytest failed (1) or crashed (3), or the child was killed by
# the timeout or a signal, all mean the tests noticed; 0 means they passed with the mutant in place
DETECTED = {"killed", "timeout", "segfault"}


def status_of(exit_code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[exit_code]


def module_of(mutant: str) -> str:
    """'mechinterp.saes.topk.xǁTopKSAEǁencode__mutmut_3' -> 'saes.topk'."""
    return mutant.split(".x")[0].removeprefix("mechinterp.")


def function_of(mutant: str) -> str:
    return re.sub(r"__mutmut_\d+$", "", mutant.split(".x", 1)[1]).strip("_ǁ").replace("ǁ", ".")


def is_entry_point(mutant: str) -> bool:
    return function_of(mutant) == "main"


def mutant_results() -> dict[str, int | None]:
    """Every mutant mutmut has written, with its exit code (None: not run yet)."""
    results = {}
    for meta in MUTANTS.rglob("*.py.meta"):
        results.update(json.loads(meta.read_text())["exit_code_by_key"])
    return results


def load_equivalents() -> dict[str, str]:
    """mutant name -> why it cannot change a result (lines 'name  reason'; '#' starts a comment)."""
    equivalents = {}
    for line in EQUIVALENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if line:
            name, _, reason = line.partition(" ")
            equivalents[name] = reason.strip()
    return equivalents


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample(names: list[str], per_module: int, seed: int, checked: set[str]) -> list[str]:
    """At most `per_module` mutants of each module (0: all of them), in a seeded random order, those
    already run first (an earlier run's results are kept and a larger sample extends a smaller one)."""
    by_module = defaultdict(list)
    for name in sorted(names):
        by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    chosen = []
    for module in sorted(by_module):
        group = by_module[module]
        order = sorted(rng.sample(group, len(group)), key=lambda name: name not in checked)
        chosen += order if per_module == 0 else order[:per_module]
    return chosen


def run_mutmut(names: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # mutmut takes the names as arguments: in chunks, to stay far below the argument-length limit
    for start in range(0, len(names), 500):
        subprocess.run([*MUTMUT, "run", *names[start:start + 500]], cwd=REPO, env=env, check=True)


def generate() -> None:
    """Write the mutants, running none: mutmut writes them all before it finds that the name given
    matches none of them (and says so, which is expected here)."""
    subprocess.run([*MUTMUT, "run", "mechinterp.no_such_module.x_none__mutmut_1"], cwd=REPO,
                   capture_output=True)
    if not any(MUTANTS.rglob("*.py.meta")):
        sys.exit(f"mutmut wrote no mutants into {MUTANTS}: check [tool.mutmut] in pyproject.toml")


def diff_of(name: str) -> str:
    """The mutant's changed lines, '-' the original and '+' the mutant (mutmut's own diff)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    source = REPO / "src" / "mechinterp" / (module_of(name).replace(".", "/") + ".py")
    shown = get_diff_for_mutant(name, path=source.relative_to(REPO))
    return "\n".join(line for line in shown.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def masked_prose(line: str) -> list[str]:
    """The tokens of a line of code, each string literal that holds a space (prose) replaced by 'S'."""
    import io
    import tokenize

    tokens = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip()).readline):
            prose = token.type == tokenize.STRING and " " in token.string
            tokens.append("S" if prose else token.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):  # a fragment of a longer statement
        pass
    return tokens


def is_prose_mutation(diff: str) -> bool:
    """The mutant only rewords a string of prose (a log message, a claim's description: it has a
    space), which mutmut mangles to 'XX...XX' or another case: no number, key or verdict changes."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    return (len(removed) == len(added) > 0 and removed != added
            and all(masked_prose(a) == masked_prose(b) for a, b in zip(removed, added, strict=True)))


def report(tested: list[str], seconds: float | None, out: Path) -> dict:
    results, equivalents = mutant_results(), load_equivalents()
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors, diffs = [], {}
    for name in tested:
        status = status_of(results.get(name))
        if status == "survived" and name in equivalents:
            status = "equivalent"
        elif status == "survived" and is_prose_mutation(diffs.setdefault(name, diff_of(name))):
            status = "prose"
        per_module[module_of(name)][status] += 1
        if status in ("survived", "no tests"):
            survivors.append(name)
    table = {}
    for module, counts in sorted(per_module.items()):
        detected = sum(counts[s] for s in DETECTED)
        scored = sum(counts.values()) - counts["equivalent"] - counts["prose"] - counts["not checked"]
        low, high = wilson(detected, scored)
        table[module] = {**counts, "scored": scored, "score": detected / scored if scored else math.nan,
                         "ci_low": low, "ci_high": high}
    detected = sum(sum(c[s] for s in DETECTED) for c in per_module.values())
    scored = sum(row["scored"] for row in table.values())
    low, high = wilson(detected, scored)
    summary = {"modules": table, "all": {"scored": scored, "detected": detected,
                                         "score": detected / scored if scored else math.nan,
                                         "ci_low": low, "ci_high": high},
               "mutants_in_scope": sum(1 for n in results if not is_entry_point(n)),
               "mutants_tested": len(tested), "seconds": seconds, "cpu": cpu_name(),
               "mutmut": subprocess.run([*MUTMUT, "--version"], capture_output=True, text=True).stdout.strip()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "tested.txt").write_text("\n".join(tested) + "\n")
    (out / "survivors.txt").write_text("".join(
        f"== {name} ({status_of(results.get(name))})\n{diffs.get(name) or diff_of(name)}\n" for name in survivors))
    print(f"{'module':<18} {'scored':>6} {'killed':>6} {'surv.':>6} {'equiv.':>6} {'prose':>6} {'score':>6}  95% CI")
    for module, row in table.items():
        print(f"{module:<18} {row['scored']:>6} {sum(row.get(s, 0) for s in DETECTED):>6} "
              f"{row.get('survived', 0) + row.get('no tests', 0):>6} {row.get('equivalent', 0):>6} "
              f"{row.get('prose', 0):>6} "
              f"{row['score']:>6.3f}  [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    print(f"{'all':<18} {scored:>6} {detected:>6} {'':>6} {'':>6} {'':>6} {summary['all']['score']:>6.3f}  "
          f"[{low:.3f}, {high:.3f}]   ({len(survivors)} survivors: {out / 'survivors.txt'})")
    return summary


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-module", type=int, default=100, help="mutants sampled per module (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--report-only", action="store_true", help="report the tested sample, run nothing")
    parser.add_argument("--retest-survivors", action="store_true",
                        help="run the last sample's survivors again (after new tests), then report")
    parser.add_argument("--holdout", type=int, metavar="N",
                        help="N mutants per module never run yet, drawn with seed --seed + 1: a score for tests "
                             "that were not written against them (report in holdout_seed<--seed>/)")
    args = parser.parse_args(argv)

    out = OUT / f"holdout_seed{args.seed}" if args.holdout else OUT  # what --report-only and --retest-survivors read
    tested_file = out / "tested.txt"
    seconds = None
    if args.report_only or args.retest_survivors:
        tested = tested_file.read_text().split()
        if args.retest_survivors:
            if (out / "summary.json").is_file():  # the report before the new tests, kept beside the new one
                (out / "summary_before.json").write_text((out / "summary.json").read_text())
            generate()  # a source edited since the sample: mutmut rewrites its mutants, their results cleared
            results = mutant_results()
            tested = [n for n in tested if n in results]  # a mutant the edit took away is gone from the sample
            again = [n for n in tested if status_of(results[n]) in ("survived", "no tests", "not checked")]
            started = time.monotonic()
            run_mutmut(again)
            seconds = time.monotonic() - started
    else:
        started = time.monotonic()
        generate()
        results = mutant_results()
        if args.holdout:  # mutants never run: no test was written against them
            tested = sample([n for n, code in results.items() if code is None and not is_entry_point(n)],
                            args.holdout, args.seed + 1, checked=set())
        else:
            checked = {name for name, code in results.items() if code is not None}
            tested = sample([n for n in results if not is_entry_point(n)], args.per_module, args.seed, checked)
        tested_file.parent.mkdir(parents=True, exist_ok=True)
        tested_file.write_text("\n".join(tested) + "\n")
        run_mutmut(tested)
        seconds = time.monotonic() - started
    report(tested, seconds, out)

if __name__ == "__main__":
    main()

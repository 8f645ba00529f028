"""Every planted bug in mutations.py is caught by the fast tier, and the table stays honest.

One module-scoped run applies each mutation to a copy of the package and runs its catching
tests there (two at a time, forked from a runner that has already imported torch), plus the
same tests on an unmutated copy. A mutation counts as caught only when pytest exits 1: a
collection or import error, a usage error or "no tests ran" (a catching test marked slow is
deselected) is a broken table, reported as such.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from mutations import FAILED, MUTATIONS, PASSED, baseline_chunks, mutated_source, run_all

README = Path(__file__).with_name("README.md")
WHY = {2: "pytest could not collect the catching tests (an import error: the mutation broke the package, "
          "or a node id is wrong)",
       3: "pytest hit an internal error", 4: "pytest refused its arguments, or seqweave did not load from the copy",
       5: "no test ran: a catching test is marked slow (deselected by -m 'not slow') or its id matches nothing"}


@pytest.fixture(scope="module")
def verdicts(runners):
    start = time.monotonic()
    found = run_all(list(MUTATIONS), runners)
    print(f"\nplanted bugs: {len(MUTATIONS)} mutations and {len(baseline_chunks(list(MUTATIONS)))} baseline runs "
          f"in {time.monotonic() - start:.0f} s")
    return found


def test_at_least_twelve_mutations_with_distinct_ids():
    assert len(MUTATIONS) >= 12
    assert len({m.id for m in MUTATIONS}) == len(MUTATIONS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_each_mutation_applies_to_exactly_one_place(mutation):
    assert mutated_source(mutation) != (Path(__file__).parents[2] / "seqweave" / mutation.path).read_text()


def test_readme_table_lists_every_mutation_and_its_catching_tests():
    rows = {cells[0].strip("` "): cells for cells in (
        [c.strip() for c in line.strip().strip("|").split("|")] for line in README.read_text().splitlines()
        if line.startswith("| `"))}
    assert sorted(rows) == sorted(m.id for m in MUTATIONS), "README.md's table and MUTATIONS differ"
    for mutation in MUTATIONS:
        cells = rows[mutation.id]
        assert f"seqweave/{mutation.path}" in cells[2], (mutation.id, cells)
        assert set(re.findall(r"`([^`]+)`", cells[3])) == set(mutation.tests), (mutation.id, cells)


@pytest.mark.parametrize("name", list(baseline_chunks(list(MUTATIONS))))
def test_catching_tests_pass_on_the_unmutated_package(verdicts, name):
    verdict = verdicts[name]
    assert verdict.returncode == PASSED, f"{name}: exit {verdict.returncode}\n{verdict.output}"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_the_fast_tier_catches_the_planted_bug(verdicts, mutation):
    verdict = verdicts[mutation.id]
    why = WHY.get(verdict.returncode, "every catching test passed: the bug went unnoticed"
                  if verdict.returncode == PASSED else "the run was killed or timed out")
    assert verdict.returncode == FAILED, (f"{mutation.id} ({mutation.description}): exit {verdict.returncode}, "
                                          f"{why}\n{verdict.output}")

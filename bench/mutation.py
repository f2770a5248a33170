"""`make mutate`: mutation testing with mutmut, time-boxed, then a summary of what survived.

mutmut (pinned in the ``dev`` extra, configured in ``[tool.mutmut]`` of pyproject.toml) does the
work: it copies the sources into ``mutants/``, puts every mutant of a function behind a
trampoline, runs the suite once recording which tests call which function ("stats"), then runs
each mutant against only the tests that called its function, in forked workers with a
per-mutant timeout. Results are kept in ``mutants/`` and a later run resumes where the last
one stopped. This script only prepares, launches and reads it:

- ``kernels/`` is the package ``rollout_buffers.kernels`` (setuptools package-dir). mutmut names
  a mutant after its file's path and matches it to tests by the module name it runs under, so
  the kernels are mutated through the git-ignored link ``rollout_buffers/kernels -> ../kernels``
  (the one bench/gpu_session.sh makes), made here for the run and taken away after it (with it
  in the tree, ruff sorts the kernels' imports differently and ``make lint`` fails).
  ``mutmut show``/``apply`` of a kernels mutant needs the link back meanwhile. The
  ``@triton.jit`` kernel bodies are not mutated: mutmut leaves every decorated function alone.
- ``--paths`` narrows the run to files or folders (as mutant-name patterns: the clean run then
  takes only the tests that cover them, and those mutants are all tested again);
  ``--tests`` replaces the test paths of ``pytest_add_cli_args_test_selection`` (a quick look
  at one module against its own test files: faster, but a survivor may be killed elsewhere;
  mutmut forgets every earlier verdict whenever the test selection changes, both ways).
- ``--minutes`` is the time box: when it runs out mutmut is interrupted (the mutants in flight
  are dropped, every finished one is kept) and the report is written from what finished.

Then the survivors are printed as ``file:line: mutation`` by file, and the summary written to
bench/results/mutation.md (its hand-written "Equivalent mutants" section is kept).

    python bench/mutation.py [--paths P ...] [--tests T ...] [--minutes 60] [--jobs 2]
    python bench/mutation.py --report-only
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = ROOT / "rollout_buffers" / "kernels"
MUTANTS = ROOT / "mutants"
SUMMARY = ROOT / "bench" / "results" / "mutation.md"
NOTES_HEADING = "## Equivalent mutants (by hand)"
RUNS_HEADING = "## Runs (the last ten, newest first)"
NOTES_DEFAULT = (
    "Survivors that no test can kill because the mutant behaves like the original (say which\n"
    "and why, as `file:line: mutation: reason`); this section is kept when the report is\n"
    "rewritten.\n"
)
HEADER = """\
Written by `make mutate` (bench/mutation.py runs mutmut; usage in the Makefile). The results
accumulate in mutants/ over runs (a run resumes where the last stopped; `PATHS=` tests its files'
mutants again) and the table counts all of them. Kill rate = (killed + timeouts) / (killed +
survived + timeouts). "no tests": no test calls the function in pytest's process; "not run":
not reached yet (the time box, or outside `PATHS=`).

What this run cannot see, so that a survivor or a "no tests" there says little about the tests:
- Each mutant runs the tests that call its function (mutmut's test map is per function, not per
  line): a survivor on a line those tests never reach is a coverage gap, not a weak assertion.
- Code run only at import (module level, or a function called only from there, such as
  kernels/_common.py `interpreter()`): mutmut switches a mutant on after the modules are
  imported, so such mutants always survive.
- Code reached only from a subprocess (rollout_buffers/protomotions.py, kernels/aot.py): mutmut
  records the calls of pytest's own process only, so these are "no tests".
- CUDA branches, on a machine without a GPU: they survive here; tests/test_gpu.py kills them on
  a GPU machine (`make mutate PATHS=...` there).
- The `@triton.jit` kernel bodies are not mutated (mutmut leaves decorated functions alone; the
  interpreter runs them as written).
- The tests deselected in pyproject.toml's [tool.mutmut] (they fail under mutmut, unmutated).
"""
# mutmut's exit codes, as its stats module reads them (mutmut.stats.status_by_exit_code).
KILLED = {1, 3}
TIMEOUT = {24, -24, 152, 255, 36}


def source_path(meta_relative: str) -> str:
    """The file in the repository that a path under mutants/ came from."""
    prefix = "rollout_buffers/kernels/"
    return (
        "kernels/" + meta_relative[len(prefix) :]
        if meta_relative.startswith(prefix)
        else meta_relative
    )


def mutant_patterns(paths: list[str]) -> list[str]:
    """mutmut mutant-name patterns for files or folders of rollout_buffers/ and kernels/."""
    patterns = []
    for raw in paths:
        p = Path(raw.rstrip("/"))
        if not (ROOT / p).exists() or p.parts[:1] not in (("rollout_buffers",), ("kernels",)):
            sys.exit(f"--paths {raw}: not a file or folder of rollout_buffers/ or kernels/")
        if p.parts[0] == "kernels":
            p = Path("rollout_buffers", *p.parts)
        module = ".".join(p.with_suffix("").parts if p.suffix == ".py" else p.parts)
        if p.suffix != ".py":
            patterns.append(f"{module}.*")
            continue
        if module.endswith(".__init__"):  # mutmut names these after the package
            module = module[: -len(".__init__")]
        patterns += [f"{module}.x_*", f"{module}.x\u01c1*"]
    return patterns


def kernels_link() -> bool:
    """Make the link rollout_buffers/kernels -> ../kernels for the run; True when it is ours to
    remove afterwards (made here, now or by a run that was killed), False when it was there."""
    marker = MUTANTS / ".kernels-link-made-by-make-mutate"
    if LINK.is_symlink() or LINK.exists():
        if LINK.resolve() != (ROOT / "kernels").resolve():
            sys.exit(f"{LINK} exists and is not a link to ../kernels")
        return marker.exists()
    LINK.symlink_to(Path("..") / "kernels", target_is_directory=True)
    MUTANTS.mkdir(exist_ok=True)
    marker.touch()
    return True


def remove_kernels_link() -> None:
    """Take the link away again: with it, ruff sorts the rollout_buffers.kernels imports
    differently and `make lint` fails."""
    if LINK.is_symlink():
        LINK.unlink()
    (MUTANTS / ".kernels-link-made-by-make-mutate").unlink(missing_ok=True)


def quiet_status():
    """mutmut's status line for a log (not a terminal): each new phase once, then its progress
    at most once a minute, each on its own line, stamped with the minutes since the start."""
    last = {"text": "", "shape": "", "at": 0.0}

    def status(text: str, *, force_output: bool = False) -> None:
        now = time.monotonic()
        shape = re.sub(r"\d+", "#", text)
        if text == last["text"] and not force_output:
            return
        if shape == last["shape"] and now - last["at"] < 60 and not force_output:
            return
        last.update(text=text, shape=shape, at=now)
        out = sys.__stdout__
        out.write(f"[{(now - START) / 60:5.1f} min] {text.strip()}\n")
        out.flush()

    return status


class TimeBoxExpired(KeyboardInterrupt):
    """Raised by the alarm: mutmut stops on KeyboardInterrupt and keeps what it finished."""


def run_mutmut(patterns: list[str], tests: list[str], minutes: float, jobs: int) -> str:
    """Run ``mutmut run`` in this process (so the test selection can be overridden) under the
    time box; returns how it ended."""
    os.chdir(ROOT)
    # `python bench/mutation.py` put bench/ first on sys.path; mutmut takes "." off it itself.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker on a shared machine
    import mutmut.__main__ as mm  # noqa: PLC0415  (sets the fork start method on import)
    from mutmut.configuration import config  # noqa: PLC0415

    if not sys.stdout.isatty():
        import mutmut.stats  # noqa: PLC0415

        mm.print_status = mutmut.stats.print_status = quiet_status()
    cfg = config()
    if tests:
        # Replace the test paths, keep the options (--deselect ... pairs) of the configured list.
        kept, args, i = [], cfg.pytest_add_cli_args_test_selection, 0
        while i < len(args):
            if args[i].startswith("-"):
                kept.append(args[i])
                if i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i]:
                    kept.append(args[i + 1])
                    i += 1
            i += 1
        cfg.pytest_add_cli_args_test_selection = [*tests, *kept]
    print(
        f"mutmut run {' '.join(patterns)} (tests: {' '.join(cfg.pytest_add_cli_args_test_selection)})"
    )

    def expire(signum, frame):
        raise TimeBoxExpired()

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(minutes * 60)))
    try:
        mm.cli.main(["run", "--max-children", str(jobs), *patterns], standalone_mode=False)
        ended = "finished"
    except TimeBoxExpired:
        ended = f"stopped by the time box ({minutes:g} min)"
    except KeyboardInterrupt:
        ended = "interrupted"
    except SystemExit as e:
        ended = f"mutmut exited with {e.code}"
    except AssertionError as e:  # mutmut: "Filtered for specific mutants, but nothing matches"
        ended = f"mutmut stopped: {e}"
    finally:
        signal.alarm(0)
    # mutmut handles the interrupt itself (returns, or exits when it came in a pytest run).
    if time.monotonic() - START >= minutes * 60 - 1:
        ended = f"stopped by the time box ({minutes:g} min)"
    return ended


def function_start_lines(path: Path) -> dict[str, int]:
    """Line of each function's ``def``, keyed as mutmut keys them (x_f, x\u01c1Class\u01c1f)."""
    tree = ast.parse(path.read_text())
    lines = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines[f"x_{node.name}"] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines[f"x\u01c1{node.name}\u01c1{item.name}"] = item.lineno
    return lines


def describe(mutant: str, meta_relative: str, starts: dict[str, int]) -> tuple[int, str]:
    """(line in the source file, the mutation as `old` -> `new`), from mutmut's copies of the
    function: the unmutated one and the mutant, read out of mutants/."""
    import difflib  # noqa: PLC0415

    import libcst as cst  # noqa: PLC0415
    from mutmut.mutation import diff_apply as d  # noqa: PLC0415

    try:
        functions = d.read_functions_from_index(mutant, meta_relative)
        if functions is None:
            module = d.read_mutants_module(meta_relative)
            functions = (
                d.read_original_function(module, mutant),
                d.read_mutant_function(module, mutant),
            )
    except Exception as e:  # noqa: BLE001  (a stale mutants/ dir: report what we can)
        return 0, f"(no diff: {e})"
    orig, mutated = (cst.Module([f]).code.splitlines() for f in functions)
    ops = [op for op in difflib.SequenceMatcher(a=orig, b=mutated, autojunk=False).get_opcodes()]
    tag, i1, i2, j1, j2 = next((op for op in ops if op[0] != "equal"), ("equal", 0, 0, 0, 0))
    old = " ".join(t.strip() for t in orig[i1:i2])
    new = " ".join(t.strip() for t in mutated[j1:j2])
    # ast gives the `def` line; the copy may start with comments (and @staticmethod) above it.
    def_index = next(
        (k for k, t in enumerate(orig) if t.lstrip().startswith(("def ", "async def "))), 0
    )
    function = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    start = starts.get(function, 0)
    return (start + i1 - def_index if start else 0), f"`{old}` -> `{new}`"


def collect() -> tuple[dict, list, dict, tuple[int, float]]:
    """Per file: counts by outcome; the survivors; the run mutants' durations; and the mutants
    not run yet with the time of their tests in the stats run (all of them: a survivor's cost)."""
    per_file: dict[str, Counter] = defaultdict(Counter)
    survivors: list[tuple[str, int, str, str]] = []
    durations: dict[str, float] = {}
    os.chdir(ROOT)
    stats_file = MUTANTS / "mutmut-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    tests_of = stats.get("tests_by_mangled_function_name", {})
    test_s = stats.get("duration_by_test", {})
    left, left_s = 0, 0.0
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        rel = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        name = source_path(rel)  # the file itself (rel is through the link for the kernels)
        if not (ROOT / name).exists():
            continue
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        if not codes:
            continue
        starts = function_start_lines(ROOT / name)
        for mutant, code in codes.items():
            c = per_file[name]
            c["mutants"] += 1
            if code is None:
                c["not run"] += 1
                left += 1
                tests = tests_of.get(mutant.partition("__mutmut_")[0], ())
                left_s += sum(test_s.get(t, 0.0) for t in tests)
            elif code in KILLED:
                c["killed"] += 1
            elif code == 0:
                c["survived"] += 1
                lineno, what = describe(mutant, rel, starts)
                survivors.append((name, lineno, what, mutant))
            elif code in TIMEOUT:
                c["timeouts"] += 1
            elif code in (5, 33):
                c["no tests"] += 1
            else:
                c["other"] += 1
        durations.update(
            {
                k: v
                for k, v in data.get("durations_by_key", {}).items()
                if codes.get(k) not in (None, 5, 33)
            }
        )
    return per_file, sorted(survivors), durations, (left, left_s)


def report(ended: str | None, args_line: str, wall_s: float | None) -> None:
    per_file, survivors, durations, (left, left_s) = collect()
    if not per_file or not durations:
        print(f"no mutant has a result under mutants/: {SUMMARY.relative_to(ROOT)} left as it was")
        return
    by_file: dict[str, list] = defaultdict(list)
    for name, lineno, what, mutant in survivors:
        by_file[name].append((lineno, what, mutant))

    print("\nsurvivors, by file:")
    for name in sorted(by_file):
        print(f"{name}:")
        for lineno, what, mutant in by_file[name]:
            print(f"  {name}:{lineno}: {what}  [{mutant}]")
    if not by_file:
        print("  (none)")

    cols = ["mutants", "killed", "survived", "timeouts", "no tests", "not run"]
    table = ["| file | " + " | ".join(cols) + " | kill rate |", "|---" * (len(cols) + 2) + "|"]
    total = Counter()
    for name in sorted(per_file):
        c = per_file[name]
        total.update(c)
        table.append(f"| {name} | " + " | ".join(str(c[k]) for k in cols) + f" | {rate(c)} |")
    table.append("| **all** | " + " | ".join(str(total[k]) for k in cols) + f" | {rate(total)} |")
    print("\n" + "\n".join(table))

    times = sorted(durations.values())
    timing = "no mutant has run yet"
    if times:
        timing = (
            f"{len(times)} mutants run: median {statistics.median(times):.1f} s, "
            f"mean {statistics.fmean(times):.1f} s, max {times[-1]:.1f} s of wall time each "
            f"(their tests only, in a forked worker)"
        )
    if left:
        timing += (
            f"; {left} not run yet, whose tests take {left_s / 60:.0f} min in all (the cost if"
            " every one survives; a killed mutant stops at its first failing test)"
        )
    print("\n" + timing)

    notes, runs = NOTES_DEFAULT, []
    if SUMMARY.exists():
        old = SUMMARY.read_text()
        if NOTES_HEADING in old:
            notes = old.split(NOTES_HEADING, 1)[1].lstrip("\n")
        if RUNS_HEADING in old:
            section = old.split(RUNS_HEADING, 1)[1].split("\n## ", 1)[0]
            runs = [t for t in section.splitlines() if t.startswith("- ")]
    if wall_s is not None:  # not --report-only: this run goes on top of the list
        when = datetime.datetime.now(datetime.timezone.utc)
        runs.insert(
            0, f"- {when:%Y-%m-%d %H:%M} UTC: `{args_line}`: {ended}, {wall_s / 60:.1f} min"
        )
    lines = [
        "# Mutation testing",
        "",
        HEADER.rstrip("\n"),
        "",
        *table,
        "",
        timing + ".",
        "",
        RUNS_HEADING,
        "",
        *runs[:10],
        "",
        "## Survivors",
        "",
        "`file:line: mutation` and the mutant's name (`.venv/bin/mutmut show NAME` in the",
        "repository root prints its diff; `mutmut apply NAME` writes it into the source).",
        "",
    ]
    for name in sorted(by_file):
        lines.append(f"### {name}")
        lines.append("")
        lines += [f"- {name}:{lineno}: {what} `{mutant}`" for lineno, what, mutant in by_file[name]]
        lines.append("")
    if not by_file:
        lines += ["(none)", ""]
    lines += [NOTES_HEADING, "", notes.rstrip("\n"), ""]
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text("\n".join(lines))
    print(f"\nwrote {SUMMARY.relative_to(ROOT)}")


def rate(c: Counter) -> str:
    run = c["killed"] + c["survived"] + c["timeouts"] + c["other"]
    return f"{100 * (c['killed'] + c['timeouts']) / run:.1f}%" if run else "-"


START = time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--paths", nargs="*", default=[], help="files or folders (default: all)")
    ap.add_argument("--tests", nargs="*", default=[], help="test paths (default: the configured)")
    ap.add_argument("--minutes", type=float, default=60.0, help="time box for the whole run")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants at once")
    ap.add_argument("--report-only", action="store_true", help="only read mutants/ and report")
    args = ap.parse_args()
    args_line = (
        "make mutate"
        + "".join(
            f" {k}={' '.join(v)}" for k, v in (("PATHS", args.paths), ("TESTS", args.tests)) if v
        )
        + f" MUTATE_MINUTES={args.minutes:g} MUTATE_JOBS={args.jobs}"
    )
    if args.report_only:
        report(None, "make mutate-report", None)
        return
    patterns = mutant_patterns(args.paths)
    ours = kernels_link()
    try:
        ended = run_mutmut(patterns, args.tests, args.minutes, args.jobs)
    finally:
        if ours:
            remove_kernels_link()
    wall = time.monotonic() - START
    print(f"\nmutmut: {ended} after {wall / 60:.1f} min")
    report(ended, args_line, wall)
    if ended.startswith("mutmut"):  # it could not run (its own message is above)
        sys.exit(1)


if __name__ == "__main__":
    main()

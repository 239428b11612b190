"""The eval job: accuracy (a task scorer) and TPF / expected wrong commits of one checkpoint under several decoders,
as a table. Each decoder's completions are kept as JSONL next to the table (written atomically by the decode job).

Input: a JSONL of {"prompt": text, "answer": text} (other keys ignored).
"""

from __future__ import annotations

import dataclasses
import json
import os

from dlmjax.decode.job import DecodeJobConfig, PromptError
from dlmjax.decode.job import run as run_decode

from dlmjax.rewards import SCORERS, get_scorer  # noqa: F401  (SCORERS: the eval job's --scorer choices)


def read_answers(path: str) -> list[str]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ans = rec["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
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
                     "tokens_per_s": summ["tokens_per_s"], "n": len(ok)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| decoder | accuracy | TPF | expected wrong commits | tokens/s | n |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['accuracy']:.3f} | {r['mean_tpf']:.2f} | "
                     f"{r['mean_expected_wrong_commits']:.3f} | {r['tokens_per_s']:.0f} | {r['n']} |")
    return "\n".join(lines)


def plot_accuracy_vs_tpf(rows: list[dict], stem: str, title: str = "accuracy vs tokens per forward") -> list[str]:
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
    ax.set_ylabel("accuracy")
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
    data: str  # JSONL of {"prompt": text, "answer": text}
    workdir: str  # one JSONL per run, table.md, accuracy_vs_tpf.{png,svg}
    runs: tuple[EvalRun, ...]
    scorer: str = "exact"
    batch_size: int = 16
    seed: int = 0
    dtype: str = "float32"
    layer_loop: str = "auto"

    def __post_init__(self):
        if not self.runs:
            raise ValueError("EvalJobConfig.runs: at least one decoder run is needed")
        if self.scorer not in SCORERS:
            raise ValueError(f"EvalJobConfig.scorer={self.scorer!r}: not one of {tuple(SCORERS)}")


def run_eval_job(job: EvalJobConfig, log=print) -> list[dict]:
    """evaluate() + the table (printed and written to <workdir>/table.md) + the accuracy-vs-TPF plot."""
    rows = evaluate(job.ckpt, job.data, list(job.runs), job.workdir, scorer=job.scorer, batch_size=job.batch_size,
                    seed=job.seed, dtype=job.dtype, layer_loop=job.layer_loop)
    table = format_table(rows)
    log(table)
    with open(os.path.join(job.workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_accuracy_vs_tpf(rows, os.path.join(job.workdir, "accuracy_vs_tpf"))
    return rows

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

SCORERS = ("addition", "exact", "math")


def _scorer(name: str):
    if name == "addition":
        from dlmjax.data.addition import score

        return score
    if name == "exact":
        return lambda text, answer: text.strip() == answer.strip()
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("--scorer=math needs the math-verify package (pip install math-verify)") from None
    return lambda text, answer: bool(verify(parse(answer), parse(text)))


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
    score = _scorer(scorer)
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


def plot_svg(rows: list[dict], path: str, title: str = "accuracy vs tokens per forward"):
    """A dependency-free scatter plot (SVG) of accuracy against TPF, one labelled point per decoder."""
    w, h, pad = 480, 320, 50
    xs = [r["mean_tpf"] for r in rows]
    x_lo, x_hi = 0.0, max(max(xs) * 1.15, 1.5)
    def px(x):
        return pad + (x - x_lo) / (x_hi - x_lo) * (w - 2 * pad)
    def py(y):
        return h - pad - y * (h - 2 * pad)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">tokens per forward (TPF)</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">accuracy</text>']
    for i in range(6):
        y = i / 5
        parts.append(f'<text x="{pad - 6}" y="{py(y) + 4}" text-anchor="end">{y:.1f}</text>')
        parts.append(f'<line x1="{pad}" y1="{py(y)}" x2="{w - pad}" y2="{py(y)}" stroke="#ddd"/>')
    for i in range(5):
        x = x_lo + i * (x_hi - x_lo) / 4
        parts.append(f'<text x="{px(x)}" y="{h - pad + 16}" text-anchor="middle">{x:.1f}</text>')
    for r in rows:
        x, y = px(r["mean_tpf"]), py(r["accuracy"])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#1f77b4"/>')
        parts.append(f'<text x="{x + 8:.1f}" y="{y - 8:.1f}">{r["decoder"]}</text>')
    parts.append("</svg>")
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)

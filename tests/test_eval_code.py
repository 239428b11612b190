"""The eval job on code sets (issue 14 §3) through the real CLI on a tiny SDAR checkpoint with a byte-level
tokenizer: an MBPP-style JSONL (a problem whose prefix already holds a correct program, one holding a wrong one, a
stdio problem) and HumanEval (offline, 2 problems); the table's avg@n / pass@1 / TPF / EWC per step equal a NumPy
recount from the per-sample records; prompts follow spec §0.1; bad input is one `error: path:line: ...`, exit 2; a
sandbox that cannot start fails the eval before any decoding."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from dlmjax import evaluate as E
from dlmjax.checkpoint import save_checkpoint
from dlmjax.config import ModelConfig
from dlmjax.model.transformer import init_params
from tests.launcher import launch

if os.geteuid() != 0:
    pytest.skip("the sandbox drops programs to unprivileged uids and needs root", allow_module_level=True)

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|MASK|>"]

GOOD = {"task_id": "good", "question": "Write add(a, b).", "test_list": ["assert add(1, 2) == 3",
                                                                         "assert add(2, 2) == 4"],
        "prefix": "```python\ndef add(a, b):\n    return a + b\n```\n"}  # a closed, correct block: always passes
BAD = {"task_id": "bad", "question": "Write sub(a, b).", "test_list": ["assert sub(3, 1) == 2"],
       "prefix": "```python\ndef sub(a, b):\n    return a + b\n```\n"}  # closed but wrong: always fails
STDIO = {"task_id": "sum", "test_method": "stdio", "question": "Print the sum of two integers.",
         "test_input": ["1 2\n", "5 5\n"], "test_output": ["3", "10"], "test_time_limit": 2}


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + 4 specials, no merges) with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.test_trims_score import B2U as b2u
    tk = Tokenizer(models.BPE({b2u[b]: i for i, b in enumerate(range(256))}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|MASK|>"])
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("codeckpt")
    tok = byte_tokenizer()
    tok.save_pretrained(str(root / "tok"))
    ids = tok.convert_tokens_to_ids
    cfg = ModelConfig(family="sdar", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True,
                      attention="block_causal", block_size=4, mask_token_id=ids("<|MASK|>"),
                      eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    params = init_params(cfg, jax.random.key(0))
    save_checkpoint(cfg, jax.tree.map(np.asarray, params), str(root / "ckpt"), tokenizer_dir=str(root / "tok"))
    return str(root / "ckpt"), tok


def _table(path):
    lines = [x for x in open(path).read().splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for x in lines[2:]:
        cells = [c.strip() for c in x.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return head, rows


def _pooled_ewc(dec):
    """EWC per denoising step pooled over (sample, step) pairs (spec §7), from the decode job's per-step lists (every
    committed slot; older records: the kept-token sum over the SDAR denoising forwards)."""
    dec = list(dec)
    if all("ewc_per_step" in d for d in dec):
        assert all(len(d["ewc_per_step"]) == d["denoise_forwards"] for d in dec)
        return np.sum([np.sum(d["ewc_per_step"]) for d in dec]) / np.sum([len(d["ewc_per_step"]) for d in dec])
    return np.sum([d["expected_wrong_commits"] for d in dec]) / np.sum([d["denoise_forwards"] for d in dec])


def _recount(workdir, row, n_problems, n):
    """(avg@n, pass@1, mean tpf, ewc/step) recounted with NumPy from the written records."""
    recs = [json.loads(x) for x in open(os.path.join(workdir, f"{row}.samples.jsonl"))]
    dec = {r["index"]: r for r in map(json.loads, open(os.path.join(workdir, f"{row}.jsonl")))}
    assert len(recs) == n_problems * n and sorted(dec) == list(range(n_problems * n))
    c = np.zeros((n_problems, n))
    for r in recs:
        assert r["correct"] == all(r["passed"]) and len(r["passed"]) == r["n_tests"]
        c[r["problem"], r["sample"]] = r["correct"]
        d = dec[r["index"]]
        assert r["tpf"] == d["tpf"] and r["steps"] == d["denoise_forwards"] and d["text"] == r["text"]
        assert r["expected_wrong_commits"] == d["expected_wrong_commits"]
    tpf = np.mean([d["tpf"] for d in dec.values()])
    ewc = _pooled_ewc(dec.values())
    return c, c.mean(), c.mean(axis=1).mean(), tpf, ewc, recs


def _check_row(cells, c, avg, p1, tpf, ewc, n_problems, n):
    assert float(cells["avg@n"]) == pytest.approx(avg, abs=1e-4)
    assert float(cells["pass@1"]) == pytest.approx(p1, abs=1e-4)
    assert float(cells["TPF"]) == pytest.approx(tpf, abs=0.01)
    assert float(cells["EWC/step"]) == pytest.approx(ewc, abs=1e-4)
    assert int(cells["problems"]) == n_problems and int(cells["n"]) == n


@pytest.mark.slow
def test_mbpp_style_file_table_matches_recount(ckpt, tmp_path):
    path, tok = ckpt
    data = tmp_path / "mbpp.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (GOOD, BAD, STDIO)) + "\n")
    wd = tmp_path / "ev"
    r = launch("--job=eval", f"--ckpt={path}", f"--data={data}", "--scorer=code", f"--workdir={wd}",
               "--decoder=sdar", "--rules=tau_budget,dynamic", "--samples=2", "--max_new_tokens=8", "--block_size=4",
               "--steps=4", "--batch_size=8", "--sandbox_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    head, rows = _table(wd / "table.md")
    assert head == ["decoder", "avg@n", "pass@1", "TPF", "EWC/step", "expected wrong commits", "tokens/s",
                    "problems", "n"]
    assert set(rows) == {"sdar:tau_budget", "sdar:dynamic"}
    assert (wd / "accuracy_vs_tpf.png").exists() and (wd / "accuracy_vs_tpf.svg").exists()
    for name, cells in rows.items():
        c, avg, p1, tpf, ewc, recs = _recount(str(wd), name, 3, 2)
        _check_row(cells, c, avg, p1, tpf, ewc, 3, 2)
        # the prefix's correct program passes through the sandbox whatever the model wrote; the others fail
        np.testing.assert_array_equal(c, [[1, 1], [0, 0], [0, 0]])
        assert [r["passed"] for r in recs if r["problem"] == 0] == [[True, True]] * 2
        assert [r["task_id"] for r in recs] == ["good", "good", "bad", "bad", "sum", "sum"]
    # the prompts: spec §0.1 through the chat template, the prefix after the assistant tag; n copies each
    prompts = [json.loads(x) for x in open(wd / "code_prompts.jsonl")]
    assert [p["problem"] for p in prompts] == [0, 0, 1, 1, 2, 2]
    text = [tok.decode(p["prompt_ids"]) for p in prompts[::2]]
    assert text[0] == ("<|im_start|>user\nWrite add(a, b).\nPlace your code within a single Python code block "
                       "```python ```. Do not include more than one code block. <|im_end|>\n<|im_start|>assistant\n"
                       + GOOD["prefix"])
    assert text[2] == ("<|im_start|>user\nThis is the problem:\nPrint the sum of two integers.\nYou should put your "
                       "code in ```python ```. Use input() to read input and print() to produce output in your "
                       "script.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_humaneval_offline_table_matches_recount(ckpt, tmp_path):
    path, tok = ckpt
    wd = tmp_path / "he"
    r = launch("--job=eval", f"--ckpt={path}", "--code_set=humaneval", "--code_limit=2", f"--workdir={wd}",
               "--decoder=sdar", "--rules=dynamic", "--samples=2", "--max_new_tokens=8", "--block_size=4",
               "--steps=4", "--batch_size=4", "--sandbox_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = _table(wd / "table.md")
    assert list(rows) == ["sdar:dynamic"]
    c, avg, p1, tpf, ewc, recs = _recount(str(wd), "sdar:dynamic", 2, 2)
    _check_row(rows["sdar:dynamic"], c, avg, p1, tpf, ewc, 2, 2)
    assert [r["task_id"] for r in recs] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(r["n_tests"] == 1 for r in recs)
    assert recs[0]["text"] != recs[1]["text"] and recs[2]["text"] != recs[3]["text"]  # n samples, not n copies
    first = tok.decode(json.loads(open(wd / "code_prompts.jsonl").readline())["prompt_ids"])
    from dlmjax.rewards.code import load_humaneval

    he0 = load_humaneval(1)[0]
    assert he0.prefix == "```python\n" + he0.question and "def has_close_elements(" in he0.question
    assert first == ("<|im_start|>user\n" + he0.question + E.FUNCTION_INSTRUCTION +
                     "<|im_end|>\n<|im_start|>assistant\n" + he0.prefix)


def test_bad_code_file_is_one_error_line(ckpt, tmp_path):
    path, _ = ckpt
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"question": "no tests", "test_method": "function"}) + "\n")
    r = launch("--job=eval", f"--ckpt={path}", f"--data={data}", "--scorer=code", f"--workdir={tmp_path / 'x'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: {data}:2: missing 'test_list'"
    # flag combinations are usage errors (exit 1)
    r = launch("--job=eval", f"--ckpt={path}", "--code_set=humaneval", "--scorer=exact", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "--scorer=code" in r.stderr
    r = launch("--job=eval", f"--ckpt={path}", f"--data={data}", "--samples=3", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "--samples is for code evaluation" in r.stderr


def test_sandbox_that_cannot_start_fails_before_decoding(ckpt, tmp_path, monkeypatch):
    """No unsandboxed fallback: the pool is started before any decoding, and its failure is the eval's."""
    from dlmjax.decode.sdar import BlockDecodeConfig
    from dlmjax.rewards import code as C
    from dlmjax.rewards import sandbox as S

    def refuse(*a, **k):
        raise S.SandboxUnavailable("user namespaces are disabled (test)")

    monkeypatch.setattr(S, "SandboxPool", refuse)
    decoded = []
    monkeypatch.setattr(E, "run_decode", lambda *a, **k: decoded.append(a))
    task = C.CodeTask("q", test_list=("assert True",))
    runs = [E.EvalRun("sdar:dynamic", "sdar", BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=4))]
    with pytest.raises(S.SandboxUnavailable):
        E.evaluate_code(ckpt[0], [task], runs, str(tmp_path / "ev"), samples=1)
    assert decoded == []


def test_eval_config_checks():
    from dlmjax.decode.sdar import BlockDecodeConfig

    runs = (E.EvalRun("sdar:dynamic", "sdar", BlockDecodeConfig()),)
    E.EvalJobConfig(ckpt="c", data=None, workdir="w", runs=runs, scorer="code", code_set="humaneval", samples=9)
    with pytest.raises(ValueError, match="either code_set or data"):
        E.EvalJobConfig(ckpt="c", data="d", workdir="w", runs=runs, scorer="code", code_set="humaneval")
    with pytest.raises(ValueError, match="scorer 'code' only"):
        E.EvalJobConfig(ckpt="c", data="d", workdir="w", runs=runs, scorer="exact", samples=2)
    with pytest.raises(ValueError, match="needs scorer"):
        E.EvalJobConfig(ckpt="c", data=None, workdir="w", runs=runs, scorer="math", code_set="humaneval")


@pytest.mark.slow
def test_text_table_reports_ewc_per_step(ckpt, tmp_path):
    """The text-scorer table keeps its columns and gains EWC/step = Σ ewc / Σ denoising steps over the samples."""
    path, _ = ckpt
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "answer": "4"}) for p in ("2+2?", "two plus two?", "4?")))
    wd = tmp_path / "ev"
    r = launch("--job=eval", f"--ckpt={path}", f"--data={data}", "--scorer=exact", f"--workdir={wd}",
               "--decoder=sdar", "--rules=dynamic", "--max_new_tokens=8", "--block_size=4", "--steps=4",
               "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    head, rows = _table(wd / "table.md")
    assert head == ["decoder", "accuracy", "TPF", "expected wrong commits", "EWC/step", "tokens/s", "n"]
    dec = [json.loads(x) for x in open(wd / "sdar:dynamic.jsonl")]
    ewc = _pooled_ewc(dec)
    cells = rows["sdar:dynamic"]
    assert float(cells["EWC/step"]) == pytest.approx(ewc, abs=1e-4) and int(cells["n"]) == 3
    assert float(cells["expected wrong commits"]) == pytest.approx(np.mean([d["expected_wrong_commits"]
                                                                            for d in dec]), abs=1e-3)

"""Launcher end to end for the TRIMS pipeline (trims_score job -> scored JSONL -> sft --objective=trims) and the eval
job (table rows re-scored here from the completions it wrote)."""

import json
import shutil

import jax
import numpy as np
import pytest

from dlmjax.checkpoint import save_checkpoint
from dlmjax.config import ModelConfig
from dlmjax.data import addition
from dlmjax.model.transformer import init_params
from tests.test_trims_score import DATA, student_tokenizer, teacher_tokenizer
from tests.launcher import launch

STUDENT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% else %}"
                    "<|assistant|>{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")




@pytest.mark.slow
def test_trims_score_then_trims_sft(imported, tmp_path):
    _, qwen3_ckpt, _, _ = imported("qwen3")
    teacher = tmp_path / "teacher"
    shutil.copytree(qwen3_ckpt, teacher)
    teacher_tokenizer().save_pretrained(str(teacher))
    stok = student_tokenizer()
    stok.chat_template = STUDENT_TEMPLATE
    v = -(-len(stok) // 8) * 8 + 8
    mask_id = v - 1
    cfg = ModelConfig(family="llada", vocab_size=v, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, intermediate_size=64, rms_norm_eps=1e-5, rope_theta=1e4, attention="bidirectional",
                      mask_token_id=mask_id, eos_token_id=stok.eos_token_id)
    student = tmp_path / "student"
    stok.save_pretrained(str(tmp_path / "stok"))
    save_checkpoint(cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), str(student),
                    tokenizer_dir=str(tmp_path / "stok"))
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": q, "response": r} for q, r in DATA if r] * 2
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scored = tmp_path / "scored.jsonl"
    r = launch("--job=trims_score", f"--teacher_ckpt={teacher}", f"--init_ckpt={student}", f"--data={data}",
                f"--out={scored}", "--max_length=40", "--num_buckets=4", "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(recs) == len(rows)
    for rec in recs:
        b = np.array(rec["bucket"])
        assert b.max() <= 4 and b.min() == 0 and (b > 0).any()
    r = launch("--job=sft", f"--init_ckpt={student}", f"--data={scored}", f"--workdir={tmp_path / 'run'}",
                "--objective=trims", "--num_buckets=4", "--train_steps=2", "--batch_size=4", "--max_length=40",
                "--log_every=1", "--noexport", "--notensorboard")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2" in r.stdout
    # trims on data without buckets is refused with the reason
    r = launch("--job=sft", f"--init_ckpt={student}", f"--data={data}", f"--workdir={tmp_path / 'run2'}",
                "--objective=trims", "--train_steps=2", "--batch_size=4", "--max_length=40")
    assert r.returncode != 0 and "bucket" in r.stderr


@pytest.mark.slow
def test_eval_job_table_matches_rescoring(tmp_path):
    tok = addition.make_tokenizer()
    cfg = ModelConfig(family="llada", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, intermediate_size=64, rms_norm_eps=1e-5, rope_theta=1e4,
                      attention="bidirectional", mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(tmp_path / "tok"))
    ckpt = tmp_path / "ckpt"
    params = init_params(cfg, jax.random.key(1))
    # make the random model answer "1" everywhere sometimes right: bias the LM head towards digit tokens
    save_checkpoint(cfg, jax.tree.map(np.asarray, params), str(ckpt), tokenizer_dir=str(tmp_path / "tok"))
    _, test = addition.make_splits(10, 12, 1, seed=3)
    data = tmp_path / "test.jsonl"
    addition.write_jsonl(str(data), test)
    r = launch("--job=eval", f"--ckpt={ckpt}", f"--data={data}", f"--workdir={tmp_path / 'ev'}", "--decoder=llada",
                "--rules=low_confidence,tau_budget", "--scorer=addition", "--max_new_tokens=8", "--block_size=8",
                "--steps=8", "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "ev" / "table.md").read_text()
    assert "llada:low_confidence" in table and "llada:tau_budget" in table
    assert (tmp_path / "ev" / "accuracy_vs_tpf.svg").exists()
    for rule in ("low_confidence", "tau_budget"):
        recs = [json.loads(x) for x in (tmp_path / "ev" / f"llada:{rule}.jsonl").read_text().splitlines()]
        assert len(recs) == len(test)
        acc = np.mean([(x["text"] or "").replace(" ", "").split("=")[-1] == test[x["index"]]["answer"]
                       for x in recs])
        tpf = np.mean([x["tpf"] for x in recs])
        row = next(line for line in table.splitlines() if f"llada:{rule} " in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(acc, abs=1e-3) and float(cells[2]) == pytest.approx(tpf, abs=0.01)

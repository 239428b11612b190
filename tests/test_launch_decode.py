"""`python -m dlmjax.launch --job=decode`: JSONL in, JSONL out, flags validated, malformed input named by line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate
from tests.launcher import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(90)]


def _tokenizer_files(dst):
    """A tiny real `tokenizers` WordLevel tokenizer (ids 0..89 = w0..w89, plus specials) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({"<unk>": 90, "<eos>": 91, "<user>": 92, "<bot>": 93})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<bot>{% endif %}")
    fast.save_pretrained(dst)




@pytest.fixture(scope="module")
def sdar_ckpt(imported, tmp_path_factory):
    _, ckpt, _, _ = imported("sdar")
    d = tmp_path_factory.mktemp("sdar_tok") / "ckpt"
    shutil.copytree(ckpt, d)
    _tokenizer_files(str(d))
    return str(d)


@pytest.mark.slow
def test_decode_job_sdar_end_to_end(sdar_ckpt, tmp_path):
    lines = [{"prompt_ids": [3, 17, 22, 9, 41]}, {"prompt": "w5 w6 w7"}, {"prompt_ids": [8, 8, 30]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out" / "r.jsonl"
    r = launch("--job=decode", f"--ckpt={sdar_ckpt}", f"--prompts={tmp_path / 'p.jsonl'}", f"--out={out}",
                "--decoder=sdar", "--greedy", "--forbid_mask_token", "--max_new_tokens=8", "--batch_size=2",
                "--rule=tau_budget", "--tau=0.3", "--stop_ids=91")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decode summary:" in r.stdout and "mean_tpf=" in r.stdout and "tokens_per_s=" in r.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in recs] == [0, 1, 2] and not os.path.exists(str(out) + ".partial")
    assert recs[1]["prompt_ids"] == [92, 5, 6, 7, 93]  # chat template through the checkpoint's tokenizer
    assert recs[1]["text"] is not None and all(len(x["step_map"]) == len(x["ids"]) for x in recs)
    # the job's first row equals a direct call of the jitted loop with the same settings
    cfg, params = load_checkpoint(sdar_ckpt)
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=8, rule="tau_budget", tau=0.3, greedy=True,
                           forbid_mask_token=True, stop_ids=(91,))
    arr = np.zeros((2, 16), np.int32)
    arr[0, :5], arr[1, :5] = lines[0]["prompt_ids"], [92, 5, 6, 7, 93]
    direct = jax.device_get(block_generate(cfg, dc, params, arr, np.array([5, 5], np.int32), jax.random.key(0)))
    n = int(direct["lengths"][0])
    assert recs[0]["ids"] == direct["tokens"][0, :n].tolist()
    assert recs[0]["step_map"] == direct["step_map"][0, :n].tolist()
    assert recs[0]["forwards"] == recs[0]["denoise_forwards"] + recs[0]["cache_forwards"]


@pytest.mark.slow
def test_decode_job_llada_and_flagfile(imported, tmp_path):
    _, ckpt, _, _ = imported("llada")
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [5, 9, 33]}\n{"prompt_ids": [40, 2, 17, 8, 8]}\n')
    (tmp_path / "f.flags").write_text("--job=decode\n--decoder=llada\n--max_new_tokens=8\n--block_size=4\n"
                                      "--steps=8\n--rule=fast_dllm_threshold\n--tau=0.5\n--llada_cache=dual\n")
    r = launch(f"--flagfile={tmp_path / 'f.flags'}", f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.jsonl'}",
                f"--out={tmp_path / 'o.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(len(x["ids"]) == 8 and x["text"] is None for x in recs)


def test_decode_job_rejects_bad_input(imported, tmp_path):
    _, ckpt, _, _ = imported("sdar")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [1, "x"]}\n')
    out = tmp_path / "o.jsonl"
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}")
    assert r.returncode == 2 and f"{p}:2: 'prompt_ids' must be a non-empty list of integers" in r.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    p.write_text('{"prompt": "hello"}\n')
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}")
    assert r.returncode == 2 and f"{p}:1: text prompt but the checkpoint has no tokenizer files" in r.stderr
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}", "--no_such_flag=3")
    assert r.returncode != 0 and "no_such_flag" in r.stderr
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}", "--decoder=sdar",
                "--factor=2")
    assert r.returncode != 0 and "--factor is not used by --decoder=sdar" in r.stderr
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}", "--rule=sometimes")
    assert r.returncode != 0 and "rule: 'sometimes' is not one of" in r.stderr
    r = launch("--job=decode", f"--prompts={p}", f"--out={out}")
    assert r.returncode != 0 and "--ckpt is required" in r.stderr


@pytest.mark.slow
def test_decode_job_dream_flagfile(imported, tmp_path):
    _, ckpt, _, _ = imported("dream")
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [5, 9, 33]}\n{"prompt_ids": [40, 2, 17, 8, 8]}\n')
    r = launch(f"--flagfile={os.path.join(ROOT, 'launch/flags/dream_entropy.flags')}", f"--ckpt={ckpt}",
                f"--prompts={tmp_path / 'p.jsonl'}", f"--out={tmp_path / 'o.jsonl'}", "--max_new_tokens=8",
                "--steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(len(x["ids"]) == 8 and x["forwards"] == 8 for x in recs)
    r = launch("--job=decode", "--decoder=dream", f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.jsonl'}",
                f"--out={tmp_path / 'o2.jsonl'}", "--block_size=4")
    assert r.returncode != 0 and "--block_size is not used by --decoder=dream" in r.stderr
    r = launch("--job=decode", "--decoder=dream", f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.jsonl'}",
                f"--out={tmp_path / 'o3.jsonl'}", "--dream_alg=confidence_threshold", "--max_new_tokens=8", "--steps=3")
    assert r.returncode != 0 and "max_new_tokens=8 is not divisible by steps=3" in r.stderr


_PARSE = r"""
import json, sys
from absl import flags
from dlmjax import launch
from dlmjax.launch import decode_flags

F = flags.FLAGS
out = {}
for path in json.loads(sys.argv[1]):
    F.unparse_flags()
    F(["launch", f"--flagfile={path}"])
    launch.check_job_flags(F.job)
    _, dc = decode_flags.decode_configs(check_io=False)
    out[path.rsplit("/", 1)[1]] = [type(dc).__name__, {k: v for k, v in vars(dc).items() if not k.startswith("_")}]
print("RESULT " + json.dumps(out, default=str))
"""


def test_decode_recipe_flagfiles_parse():
    """Every published decode setting in launch/flags parses and builds its decoder config (flag checks and the
    config's cross-field checks), with the values the recipe names."""
    import subprocess
    import sys

    names = ["sdar_tau_budget.flags", "tracerl_dynamic.flags", "llada_low_confidence.flags",
             "fast_dllm_threshold.flags", "dream_entropy.flags", "fast_dllm_dream.flags"]
    paths = [os.path.join(ROOT, "launch", "flags", n) for n in names]
    r = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(paths)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert sorted(got) == sorted(names)
    kind, sdar = got["sdar_tau_budget.flags"]
    assert kind == "BlockDecodeConfig" and (sdar["rule"], sdar["block_size"], sdar["tau"], sdar["budget_m"]) == \
        ("tau_budget", 16, 0.9, 1.0)
    assert got["tracerl_dynamic.flags"][1]["rule"] == "dynamic" and got["tracerl_dynamic.flags"][1]["block_size"] == 4
    kind, llada = got["llada_low_confidence.flags"]
    assert kind == "LLaDADecodeConfig" and (llada["gen_length"], llada["block_length"], llada["steps"]) == \
        (256, 32, 256)
    assert got["fast_dllm_threshold.flags"][1]["rule"] == "fast_dllm_threshold"
    assert got["dream_entropy.flags"][0] == "DreamDecodeConfig" and got["dream_entropy.flags"][1]["alg"] == "entropy"
    kind, fd = got["fast_dllm_dream.flags"]
    assert kind == "DreamCacheDecodeConfig" and (fd["cache"], fd["rule"], fd["block_length"], fd["tau"]) == \
        ("prefix", "confidence_threshold", 32, 0.9)

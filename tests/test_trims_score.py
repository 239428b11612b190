"""TRIMS offline stage: teacher scores vs transformers, char-offset alignment and rank buckets vs plain re-statements
of spec trims_mdlm.md §5.1 / §5.2, and the end-to-end scoring job with two different tiny real fast tokenizers."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from dlmjax.checkpoint import load_checkpoint
from dlmjax.data.trims_score import (TrimsScoreConfig, align_scores, rank_buckets, run_trims_score, score_dataset,
                                     student_spans, teacher_inputs, teacher_token_scores, write_scored_jsonl)

# ---------------------------------------------------------------------------------------------------------------
# Independent references


def torch_scores(model, ids):
    """Per-token NLL and entropy of one unpadded sequence under the transformers model, float64; index j = token j
    given < j (NaN at 0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll = np.full(len(ids), np.nan)
    ent = np.full(len(ids), np.nan)
    for j in range(1, len(ids)):
        nll[j] = -logp[j - 1, ids[j]].item()
        ent[j] = -(logp[j - 1].exp() * logp[j - 1]).sum().item()
    return nll, ent


def ref_align(student_spans, teacher_spans, teacher_scores):
    """Spec §5.1, literally: teacher token k goes to the student token containing its first character (a <= c < b;
    else the first student token it overlaps); student score = sum of what it is given. A student token that is given
    nothing but overlaps teacher token k shares k's score evenly with k's owner (and with the other such tokens).
    Tokens with no share at all: NaN."""
    ns = len(student_spans)

    def overlaps(s, t):
        return max(s[0], t[0]) < min(s[1], t[1])

    owner = []
    for c, e in teacher_spans:
        o = next((j for j, (a, b) in enumerate(student_spans) if a <= c < b), None)
        if o is None:
            o = next((j for j, s in enumerate(student_spans) if overlaps(s, (c, e))), None)
        owner.append(o)
    given = {o for o in owner if o is not None}
    total = [0.0] * ns
    got = [False] * ns
    for k, (t, d) in enumerate(zip(teacher_spans, teacher_scores)):
        if owner[k] is None:
            continue
        sharers = [owner[k]] + [j for j, s in enumerate(student_spans) if j not in given and overlaps(s, t)]
        for j in sharers:
            total[j] += d / len(sharers)
            got[j] = True
    return np.array([total[j] if got[j] else np.nan for j in range(ns)])


def ref_buckets(scores, K):
    """rank(i) = #{j: s_j > s_i} + #{j < i: s_j == s_i}; b = 1 + floor(K rank / N)."""
    n = len(scores)
    out = []
    for i in range(n):
        r = sum(1 for j in range(n) if scores[j] > scores[i]) + sum(1 for j in range(i) if scores[j] == scores[i])
        out.append(1 + (K * r) // n)
    return np.array(out)


def bytes_to_unicode():
    """GPT-2's byte -> printable char table (the ByteLevel alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()
U2B = {v: k for k, v in B2U.items()}


def ref_student_spans(tok, ids):
    """Byte-level student: token i covers every character it holds at least one byte of."""
    data = [bytes(U2B[ch] for ch in tok.convert_ids_to_tokens(int(i))) for i in ids]
    spans, cum = [], b""
    for piece in data:
        a = len(cum.decode("utf-8", errors="ignore"))  # characters complete before this token
        cum += piece
        spans.append((a, len(cum.decode("utf-8", errors="replace"))))
    return spans, b"".join(data).decode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Tiny tokenizers: a Qwen-like char-level BPE teacher (<= 96 ids, the fixture model's vocab) and a LLaDA-like
# byte-level BPE student with whole-word merges. Different splits exercise the char-offset alignment.

T_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\n:-é")
T_MERGES = [("t", "h"), ("th", "e"), ("i", "n"), ("in", "g"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
            ("s", " "), ("s ", "a"), (" ", "the"), ("e", "s"), ("o", "u"), ("l", "l"), (".", " "), ("w", "o")]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")
S_WORDS = ["this", " is", " the", " test", " hello", " world", "hello", " two", " plus", " equals", " four",
           " answer", "ing", " caf", " sum", " of"]


def teacher_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + T_CHARS)}
    for a, b in T_MERGES:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, T_MERGES, unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    tk.add_tokens(["<think>", "</think>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    assert len(fast) <= 96
    return fast


def student_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [B2U[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for w in S_WORDS:
        u = "".join(B2U[b] for b in w.encode())
        for k in range(2, len(u) + 1):
            if u[:k] not in vocab:
                merges.append((u[:k - 1], u[k - 1]))
                vocab[u[:k]] = len(vocab)
    specials = ["<|user|>", "<|assistant|>", "<|eot_id|>", "<|endoftext|>"]
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|eot_id|>"])


DATA = [("what is two plus two?", "two plus two equals four."),
        ("say hello.", "hello world! this is the test, with a café."),
        ("sum of 3 and 4?", "the sum of 3 and 4 is 7. the answer: 7"),
        ("one word", "ok"),
        ("long one", "this is the test of the thing, and this is the rest of it. we are testing the ends."),
        ("empty?", "")]


def make_examples(stok, n_pad=(2, 1, 0, 3, 0, 1), truncate=None):
    """Records + tokenised student examples: <|user|> q <|assistant|> response <|eot_id|> <|endoftext|>*pads."""
    user, asst, eot, eos = (stok.convert_tokens_to_ids(t) for t in
                            ("<|user|>", "<|assistant|>", "<|eot_id|>", "<|endoftext|>"))
    records, examples = [], []
    for i, (q, r) in enumerate(DATA):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        prompt = [user] + stok(q, add_special_tokens=False)["input_ids"] + [asst]
        resp = stok(r, add_special_tokens=False)["input_ids"]
        ids = prompt + resp + [eot] + [eos] * n_pad[i]
        if truncate is not None and i == truncate:
            ids = ids[:len(prompt) + len(resp) // 2]  # right-truncated mid-response: no EOT
        records.append({"id": i, "messages": msgs})
        examples.append({"input_ids": np.asarray(ids, np.int32), "prompt_len": len(prompt), "messages": msgs})
    return records, examples


@pytest.fixture(scope="module")
def qwen3(imported):
    model, ckpt, _, _ = imported("qwen3")
    cfg, params = load_checkpoint(ckpt)
    return model, ckpt, cfg, params


# ---------------------------------------------------------------------------------------------------------------
# 1. Teacher scores


@pytest.mark.parametrize("family,metric,chunk,attn_chunk", [("qwen3", "nll", 16, 16), ("qwen3", "entropy", 16, 0),
                                                            ("llama", "nll", 128, 0)])
def test_teacher_scores_match_transformers(imported, family, metric, chunk, attn_chunk):
    model, ckpt, _, _ = imported(family)
    cfg, params = load_checkpoint(ckpt)
    rng = np.random.default_rng(1)
    lens = [40, 23, 1]
    ids = np.zeros((3, 40), np.int32)
    valid = np.zeros((3, 40), bool)
    for r, n in enumerate(lens):
        ids[r, :n] = rng.integers(0, 96, n)
        ids[r, n:] = rng.integers(0, 96, 40 - n)  # garbage in the padding must not matter
        valid[r, :n] = True
    got = teacher_token_scores(cfg, params, ids, valid, metric, chunk=chunk, attn_chunk=attn_chunk)
    assert got.shape == (3, 40) and got.dtype == np.float32
    for r, n in enumerate(lens):
        nll, ent = torch_scores(model, ids[r, :n])
        want = nll if metric == "nll" else ent
        assert np.isnan(got[r, 0]) and np.all(np.isnan(got[r, n:]))
        np.testing.assert_allclose(got[r, 1:n], want[1:], atol=1e-4, rtol=1e-5)
    assert np.nanmax(got) > 1.0  # a non-trivial distribution


def test_teacher_scores_need_a_causal_model(qwen3):
    _, _, cfg, params = qwen3
    with pytest.raises(ValueError, match="attention == 'causal'"):
        teacher_token_scores(cfg.replace(attention="bidirectional"), params, np.zeros((1, 8), np.int32),
                             np.ones((1, 8), bool))


# ---------------------------------------------------------------------------------------------------------------
# 2. Teacher input


def test_teacher_inputs_template_response_and_spans():
    tok = teacher_tokenizer()
    msgs = [{"role": "user", "content": "what is two plus two?"}]
    resp = "the answer is four. thing"
    ids, start, spans = teacher_inputs(tok, msgs, resp)
    want_prompt = (tok("<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                       "</think>\n\n", add_special_tokens=False)["input_ids"])
    assert ids.dtype == np.int32 and list(ids[:start]) == want_prompt  # enable_thinking=False reached the template
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    resp_ids = list(ids[start:-1])
    assert resp_ids == tok(resp, add_special_tokens=False)["input_ids"] and len(spans) == len(resp_ids)
    assert "".join(resp[c:e] for c, e in spans) == resp
    assert [resp[c:e] for c, e in spans] == tok.convert_ids_to_tokens(resp_ids)


# ---------------------------------------------------------------------------------------------------------------
# 3. Alignment


@pytest.mark.parametrize("student,teacher,scores,want", [
    ([(0, 2), (2, 4), (4, 5)], [(0, 2), (2, 4), (4, 5)], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),  # 1:1
    ([(0, 2), (2, 4)], [(0, 4)], [3.0], [1.5, 1.5]),  # one teacher token over two student tokens: split
    ([(0, 4)], [(0, 2), (2, 4)], [1.0, 2.5], [3.5]),  # two teacher tokens in one student token: sum
    ([(0, 2), (2, 3), (3, 6)], [(0, 3), (3, 4), (4, 6)], [3.0, 1.0, 2.0], [1.5, 1.5, 3.0]),
    ([(0, 3), (3, 5)], [(0, 4), (4, 5)], [2.0, 1.0], [2.0, 1.0]),  # overlapped token receives its own: no split
    ([(0, 2), (3, 5), (6, 7)], [(2, 4), (4, 5)], [1.0, 2.0], [np.nan, 3.0, np.nan]),  # gaps: first-overlap owner
    ([(0, 1), (0, 1), (1, 3)], [(0, 1), (1, 3)], [4.0, 1.0], [2.0, 2.0, 1.0]),  # byte pieces of one character
    ([(0, 3), (3, 5)], [(0, 1), (0, 1), (1, 5)], [1.0, 2.0, 3.0], [4.5, 1.5]),  # teacher byte pieces; split
])
def test_align_hand_made(student, teacher, scores, want):
    ref = ref_align(student, teacher, scores)
    np.testing.assert_allclose(ref, want, atol=1e-12)  # the reference itself reads the spec as intended
    got = align_scores(student, teacher, scores)
    assert got.dtype == np.float32 and got.shape == (len(student),)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_align_random_partitions():
    rng = np.random.default_rng(0)

    def partition(n, p):
        cuts = [0] + sorted(set(rng.choice(np.arange(1, n), size=p, replace=False).tolist())) + [n]
        return list(zip(cuts[:-1], cuts[1:]))

    for _ in range(40):
        n = int(rng.integers(5, 40))
        s, t = partition(n, int(rng.integers(1, n - 1))), partition(n, int(rng.integers(1, n - 1)))
        d = rng.uniform(0, 5, len(t))
        got = align_scores(s, t, d)
        np.testing.assert_allclose(got, ref_align(s, t, d), rtol=1e-5)
        assert np.isclose(np.nansum(got), d.sum(), rtol=1e-5)  # mass-preserving on a partition
        assert not np.any(np.isnan(got))


def test_student_spans_match_byte_reference():
    tok = student_tokenizer()
    text = "hello world! this is the test, with a café and ≤ 3 → 4."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want, decoded = ref_student_spans(tok, ids)
    assert decoded == text
    assert student_spans(tok, ids) == want
    assert any(a == b - 1 and (a, b) == want[k + 1] for k, (a, b) in enumerate(want[:-1]))  # split characters seen


# ---------------------------------------------------------------------------------------------------------------
# 4. Buckets


def test_rank_buckets_descending_ascending():
    rng = np.random.default_rng(3)
    for n, k in ((37, 8), (64, 8), (10, 4), (5, 8), (200, 16)):
        s = np.round(rng.exponential(1.0, n), 1)  # plenty of ties
        got = rank_buckets(s, k)
        want = ref_buckets(s.tolist(), k)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want)
        counts = np.bincount(got, minlength=k + 1)[1:]
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
        if n >= k:
            assert np.all(np.abs(counts - n / k) <= 1)
        assert got[np.argmax(s)] == 1
        np.testing.assert_array_equal(rank_buckets(s, k, "ascending"), k + 1 - want)
    np.testing.assert_array_equal(rank_buckets(np.zeros(8), 4), [1, 1, 2, 2, 3, 3, 4, 4])  # ties: by position


def test_rank_buckets_random():
    s = np.arange(4000, dtype=float)
    a = rank_buckets(s, 8, "random", seed=5)
    assert a.dtype == np.int8 and a.min() == 1 and a.max() == 8
    np.testing.assert_array_equal(a, rank_buckets(-s, 8, "random", seed=5))  # drawn once, independent of scores
    assert not np.array_equal(a, rank_buckets(s, 8, "random", seed=6))
    counts = np.bincount(a, minlength=9)[1:]
    assert np.all(np.abs(counts - 500) < 100)
    assert abs(np.corrcoef(a, s)[0, 1]) < 0.1


def test_configs_name_the_field():
    with pytest.raises(ValueError, match="TrimsScoreConfig.K"):
        TrimsScoreConfig("t", "s", K=0)
    with pytest.raises(ValueError, match="TrimsScoreConfig.order"):
        TrimsScoreConfig("t", "s", order="sideways")
    with pytest.raises(ValueError, match="TrimsScoreConfig.metric"):
        TrimsScoreConfig("t", "s", metric="margin")
    with pytest.raises(ValueError, match="TrimsScoreConfig.batch_size"):
        TrimsScoreConfig("t", "s", batch_size=0)
    with pytest.raises(ValueError, match="TrimsScoreConfig.teacher_ckpt"):
        TrimsScoreConfig("", "s")


# ---------------------------------------------------------------------------------------------------------------
# 5. End to end


def reference_scores(model, ttok, stok, ex):
    """Student-token scores per spec §5.1 from scratch: byte-level student spans, transformers NLL, ref_align."""
    ids, p = [int(x) for x in ex["input_ids"]], ex["prompt_len"]
    special = set(stok.all_special_ids)
    text_pos = [j for j in range(p, len(ids)) if ids[j] not in special]
    spans, text = ref_student_spans(stok, [ids[j] for j in text_pos])
    prompt = ttok.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, enable_thinking=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    enc = ttok(text, add_special_tokens=False, return_offsets_mapping=True)
    nll, _ = torch_scores(model, prompt + enc["input_ids"] + [ttok.convert_tokens_to_ids("<|im_end|>")])
    d = nll[len(prompt):len(prompt) + len(enc["input_ids"])]
    out = np.full(len(ids), np.nan)
    out[text_pos] = ref_align(spans, enc["offset_mapping"], d)
    return out


def test_score_dataset_end_to_end(qwen3):
    model, _, cfg, params = qwen3
    ttok, stok = teacher_tokenizer(), student_tokenizer()
    _, examples = make_examples(stok, truncate=4)
    K = 4
    res = score_dataset(cfg, params, ttok, stok, examples, K=K, batch_size=4, length_bucket=64, progress=False)
    specials = set(stok.all_special_ids)
    pooled = []
    for ex, b, s in zip(examples, res.bucket, res.score):
        ids, p = ex["input_ids"], ex["prompt_len"]
        assert b.dtype == np.int8 and len(b) == len(ids) == len(s)
        assert np.all(b[:p] == 0) and np.all(np.isnan(s[:p]))
        assert np.all((b[p:] >= 1) & (b[p:] <= K))
        sp = np.array([int(t) in specials for t in ids]) & (np.arange(len(ids)) >= p)  # EOT / EOS pads
        assert np.all(b[sp] == K) and np.all(np.isnan(s[sp]))
        np.testing.assert_allclose(s, reference_scores(model, ttok, stok, ex), atol=1e-4, rtol=1e-5)
        pooled.append(s[np.isfinite(s)])
    pooled = np.concatenate(pooled)
    flat_b = np.concatenate([b[np.isfinite(s)] for b, s in zip(res.bucket, res.score)])
    np.testing.assert_array_equal(flat_b, ref_buckets(pooled.tolist(), K))  # one global ranking
    st = res.stats
    assert st["scored_tokens"] == len(pooled) and sum(st["tokens_per_bucket"]) == len(pooled)
    assert max(st["tokens_per_bucket"]) - min(st["tokens_per_bucket"]) <= 1
    assert st["mean_score_per_bucket"] == sorted(st["mean_score_per_bucket"], reverse=True)  # 1 = hardest
    assert st["fast_path_examples"] == 1  # only the empty response tokenises identically
    assert st["truncated_examples"] == 0 and st["examples"] == len(DATA)
    assert examples[4]["input_ids"][-1] not in specials  # the truncated example really lost its EOT


def test_score_dataset_fast_path_and_teacher_truncation(qwen3):
    model, _, cfg, params = qwen3
    ttok = teacher_tokenizer()  # the student uses the teacher's tokenizer: 1:1 mapping (Dream vs Qwen3)
    eot = ttok.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for q, r in DATA[:3]:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        prompt = ttok.apply_chat_template(msgs[:-1], add_generation_prompt=True, enable_thinking=False)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        ids = prompt + ttok(r, add_special_tokens=False)["input_ids"] + [eot]
        examples.append({"input_ids": np.array(ids, np.int32), "prompt_len": len(prompt), "messages": msgs})
    res = score_dataset(cfg, params, ttok, ttok, examples, K=8, batch_size=4, progress=False)
    assert res.stats["fast_path_examples"] == 3
    for ex, s in zip(examples, res.score):
        nll, _ = torch_scores(model, list(ex["input_ids"]))
        p = ex["prompt_len"]
        np.testing.assert_allclose(s[p:-1], nll[p:-1], atol=1e-4, rtol=1e-5)  # 1:1, same positions
        assert np.isnan(s[-1])  # EOT: special, fixed bucket
    # Teacher rows capped at max_length: response tokens past it get no score and bucket K.
    cap = len(examples[0]["input_ids"]) - 5
    res2 = score_dataset(cfg, params, ttok, ttok, examples[:1], K=8, batch_size=4, max_length=cap, progress=False)
    assert res2.stats["truncated_examples"] == 1
    s, b = res2.score[0], res2.bucket[0]
    assert np.all(np.isnan(s[cap:])) and np.all(b[cap:] == 8) and np.all(np.isfinite(s[examples[0]["prompt_len"]:cap]))
    np.testing.assert_allclose(s[:cap], res.score[0][:cap], atol=1e-5)


def test_run_trims_score_writes_jsonl_atomically(qwen3, tmp_path):
    _, ckpt, _, _ = qwen3
    tdir = tmp_path / "teacher"
    shutil.copytree(ckpt, tdir)
    teacher_tokenizer().save_pretrained(str(tdir))
    stok = student_tokenizer()
    stok.save_pretrained(str(tmp_path / "student"))
    records, examples = make_examples(stok)
    out = tmp_path / "out" / "scored.jsonl"
    cfg = TrimsScoreConfig(str(tdir), str(tmp_path / "student"), K=4, batch_size=4, dtype="float32")
    logs = []
    st = run_trims_score(cfg, records, examples, str(out), log=logs.append)
    assert "trims_score summary:" in logs[0] and st["examples"] == len(DATA)
    assert not os.path.exists(str(out) + ".partial")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(records)
    for rec, ex, line in zip(records, examples, lines):
        assert line["id"] == rec["id"] and line["messages"] == rec["messages"]
        assert line["bucket_len"] == len(ex["input_ids"]) == len(line["bucket"])
        b = np.array(line["bucket"])
        assert np.all(b[:ex["prompt_len"]] == 0) and np.all((b[ex["prompt_len"]:] >= 1) & (b[ex["prompt_len"]:] <= 4))

    # An exception mid-write leaves neither the output nor the partial file.
    bad = tmp_path / "bad" / "scored.jsonl"
    recs = [dict(r) for r in records]
    recs[2]["oops"] = object()
    with pytest.raises(TypeError):
        write_scored_jsonl(recs, [np.zeros(3, np.int8)] * len(recs), str(bad))
    assert not bad.exists() and not os.path.exists(str(bad) + ".partial")

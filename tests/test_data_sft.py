"""SFT data path: records -> tokenized examples -> static-shape grain batches.

Expected ids are built by hand from the tiny char-level vocabulary below (not by the code under test).
"""

import json
from dataclasses import replace

import numpy as np
import pytest

from dlmjax.data import (
    DataError, SFTDataConfig, build_examples, collate, make_iterator, num_steps, read_records, sft_special_ids,
    steps_per_epoch, tokenize_record,
)

SPECIALS = ["<pad>", "<s>", "<|eos|>", "<|start|>", "<|end|>", "<|eot|>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + CHARS)}
PAD, BOS, EOS, START, END, EOT = (VOCAB[t] for t in SPECIALS[:6])
# LLaDA-like: BOS once, then <|start|>role<|end|>\n content <|eot|> per turn; the generation prompt opens a turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|end|>\n{{ m['content'] }}<|eot|>"
            "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|end|>\n{% endif %}")


def make_tokenizer(template=TEMPLATE, bos="<s>", eos="<|eos|>", pad=None):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    kw = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad).items() if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                  additional_special_tokens=["<|start|>", "<|end|>", "<|eot|>"], **kw)
    tok.chat_template = template
    return tok


def hand(*pieces):
    """Ids by hand: ints pass through, strings are one id per character."""
    out = []
    for p in pieces:
        out += [p] if isinstance(p, int) else [VOCAB[c] for c in p]
    return out


def turn(role, content):
    return hand(START, role, END, "\n", content, EOT)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


# ---------------------------------------------------------------- tokenize_record


def test_chat_template_ids_and_prompt_len(tok):
    rec = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]}
    ex = tokenize_record(tok, rec, max_length=100)
    prompt = hand(BOS) + turn("user", "hi there") + hand(START, "assistant", END, "\n")
    assert ex["input_ids"].dtype == np.int32
    assert ex["input_ids"].tolist() == prompt + hand("yo", EOT)
    assert ex["prompt_len"] == len(prompt)


def test_multi_turn_prompt_covers_earlier_assistant_turns(tok):
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "dd"}]
    ex = tokenize_record(tok, {"messages": msgs}, max_length=200)
    prompt = hand(BOS) + turn("system", "be") + turn("user", "a") + turn("assistant", "b") + turn("user", "c") + \
        hand(START, "assistant", END, "\n")
    assert ex["input_ids"].tolist() == prompt + hand("dd", EOT)
    assert ex["prompt_len"] == len(prompt)


def test_no_template_bos_prompt_response_eos(tok):
    rec = {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]}
    ex = tokenize_record(tok, rec, max_length=50, chat_template=False)
    assert ex["input_ids"].tolist() == hand(BOS, "ab", "cd", EOS)
    assert ex["prompt_len"] == 3
    nobos = make_tokenizer(bos=None, eos=None, pad="<pad>")  # eos := pad (dLLM's fix), no BOS
    ex = tokenize_record(nobos, rec, max_length=50, chat_template=False)
    assert ex["input_ids"].tolist() == hand("ab", "cd", PAD)
    assert ex["prompt_len"] == 2


def test_prompt_not_a_prefix_is_an_error():
    # the generation prompt adds two newlines, the rendered assistant turn one: not a prefix
    bad = make_tokenizer(TEMPLATE.replace("<|end|>\n{% endif %}", "<|end|>\n\n{% endif %}"))
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="rec7.*not a prefix"):
        tokenize_record(bad, rec, 100, where="rec7")


def test_truncation_right_and_filter(tok):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcdef"}]}
    prompt = hand(BOS) + turn("user", "q") + hand(START, "assistant", END, "\n")
    p, full = len(prompt), prompt + hand("abcdef", EOT)
    # right: clipped; the response loses its EOT
    ex = tokenize_record(tok, rec, p + 3, "right")
    assert ex["input_ids"].tolist() == prompt + hand("abc")
    assert ex["prompt_len"] == p and ex["full_len"] == len(full)
    assert EOT not in ex["input_ids"][p:].tolist()
    assert tokenize_record(tok, rec, p + 1, "right")["input_ids"].tolist() == prompt + hand("a")
    assert tokenize_record(tok, rec, p, "right") is None  # no response token would be left
    assert tokenize_record(tok, rec, p - 1, "right") is None  # prompt longer than max_length
    assert tokenize_record(tok, rec, len(full), "right")["input_ids"].tolist() == full
    # filter: anything longer than max_length goes, exactly max_length stays
    assert tokenize_record(tok, rec, len(full) - 1, "filter") is None
    assert tokenize_record(tok, rec, len(full), "filter")["input_ids"].tolist() == full


def test_bucket_length_checked_and_clipped(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcd"}]
    n = len(hand(BOS) + turn("user", "q") + turn("assistant", "abcd"))
    bucket = [(i % 7) + 1 for i in range(n)]
    ex = tokenize_record(tok, {"messages": msgs, "bucket": bucket}, n - 2)
    assert ex["bucket"].dtype == np.int8 and ex["bucket"].tolist() == bucket[:n - 2]
    assert len(ex["bucket"]) == len(ex["input_ids"])
    with pytest.raises(DataError, match=rf"'bucket' has 3 entries .* {n} tokens"):
        tokenize_record(tok, {"messages": msgs, "bucket": [1, 2, 3]}, 100)


def test_special_ids():
    assert sft_special_ids(make_tokenizer(pad="<pad>")) == (PAD, EOS)
    assert sft_special_ids(make_tokenizer()) == (EOS, EOS)  # pad := eos
    assert sft_special_ids(make_tokenizer(eos=None, pad="<pad>")) == (PAD, PAD)  # eos := pad
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        sft_special_ids(make_tokenizer(eos=None))


# ---------------------------------------------------------------- read_records


def test_read_records_normalises_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "response": "r", "bucket": [1, 2], "id": 7}, "", "   ",
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "x": 1}]}])
    recs, skipped = read_records(path)
    assert skipped == 0 and len(recs) == 2
    assert recs[0]["messages"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert recs[0]["bucket"] == [1, 2] and recs[0]["id"] == 7
    assert recs[1]["messages"][1] == {"role": "assistant", "content": "a", "x": 1}


BAD_LINES = [
    ('{"prompt": "p", "response": ', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ({"prompt": "p"}, "missing 'response'"),
    ({"prompt": 3, "response": "r"}, "'prompt' must be a string"),
    ({"prompt": "p", "response": ["r"]}, "'response' must be a string"),
    ({"prompt": "p", "response": "  "}, "empty response"),
    ({"prompt": "p", "response": "r", "messages": []}, "exactly one"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}, r"messages\[0\]"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}, "assistant"),
    ({"prompt": "p", "response": "r", "bucket": [1, 200]}, "'bucket' must be"),
    ({"prompt": "p", "response": "r", "bucket": "12"}, "'bucket' must be"),
]


@pytest.mark.parametrize("bad,why", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    good = {"prompt": "p", "response": "r"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError, match=rf"d\.jsonl:4: .*{why}"):
        read_records(path)
    recs, skipped = read_records(path, skip_malformed=True)
    assert (len(recs), skipped) == (3, 1)


def test_bad_utf8_and_missing_file(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: "):
        read_records(str(p))
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot open"):
        read_records(missing)


# ---------------------------------------------------------------- collate / build_examples


def test_collate_pads_with_eos_and_masks_prompt():
    exs = [{"input_ids": np.array([1, 10, 11, 12, 13], np.int32), "prompt_len": 2, "bucket": np.int8([5, 5, 3, 1, 2])},
           {"input_ids": np.array([1, 20, 21, 22, 23, 24, 25, 26], np.int32), "prompt_len": 4,
            "bucket": np.int8([9, 9, 9, 9, 4, 4, 6, 7])}]
    b = collate(exs, 8, pad_id=EOS, pad_bucket=8, example_ids=[5, 3])
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0].tolist() == [1, 10, 11, 12, 13, EOS, EOS, EOS]
    assert b["input_ids"][1].tolist() == [1, 20, 21, 22, 23, 24, 25, 26]
    assert b["maskable"].dtype == bool
    assert b["maskable"].tolist() == [[False, False] + [True] * 6, [False] * 4 + [True] * 4]
    assert b["bucket"].dtype == np.int8
    assert b["bucket"].tolist() == [[0, 0, 3, 1, 2, 8, 8, 8], [0, 0, 0, 0, 4, 4, 6, 7]]
    for k, v in dict(prompt_len=[2, 4], length=[5, 8], example_id=[5, 3]).items():
        assert b[k].dtype == np.int32 and b[k].tolist() == v
    assert "bucket" not in collate([{"input_ids": np.int32([1, 2]), "prompt_len": 1}], 4, EOS)


def records(n):
    """n prompt/response records of varying lengths; record i's prompt spells i (so ids are recoverable)."""
    return [{"prompt": f"q{i}", "response": "r" * (1 + i % 5)} for i in range(n)]


def test_build_examples_stats(tmp_path, tok):
    recs = records(6) + [{"prompt": "x" * 40, "response": "y"},  # prompt longer than L: dropped
                         {"prompt": "z", "response": "w" * 30}]  # clipped
    path = write_jsonl(tmp_path / "d.jsonl", recs[:3] + ["{oops"] + recs[3:])
    cfg = SFTDataConfig(path=path, max_length=32, global_batch_size=2, skip_malformed=True)
    exs, stats = build_examples(cfg, tok)
    assert stats == {"read": 8, "skipped_malformed": 1, "dropped_truncation": 1, "clipped": 1, "examples": 7,
                     "tokens": sum(len(e["input_ids"]) for e in exs)}
    assert [e["line"] for e in exs] == [1, 2, 3, 5, 6, 7, 9]
    assert all(len(e["input_ids"]) <= 32 for e in exs)
    _, stats = build_examples(SFTDataConfig(path=path, max_length=32, global_batch_size=2, skip_malformed=True,
                                            truncation="filter"), tok)
    assert (stats["dropped_truncation"], stats["clipped"]) == (2, 0)
    with pytest.raises(DataError, match=r"d\.jsonl:4: "):
        build_examples(SFTDataConfig(path=path, max_length=32, global_batch_size=2), tok)
    bpath = write_jsonl(tmp_path / "b.jsonl", [recs[0], dict(recs[1], bucket=[1, 2])])
    with pytest.raises(DataError, match=r"b\.jsonl:2 \(record 1\): 'bucket' has 2 entries"):
        build_examples(SFTDataConfig(path=bpath, max_length=32, global_batch_size=2), tok)
    with pytest.raises(DataError, match="no chat template"):
        build_examples(SFTDataConfig(path=path, max_length=32, global_batch_size=2), make_tokenizer(template=None))


@pytest.mark.parametrize("field,value", [("max_length", 0), ("global_batch_size", -1), ("truncation", "left"),
                                         ("num_epochs", 0), ("pad_bucket", 200), ("seed", -1), ("path", "")])
def test_config_validation_names_field(field, value):
    kw = dict(path="x.jsonl", max_length=8, global_batch_size=2)
    with pytest.raises(ValueError, match=rf"SFTDataConfig\.{field}="):
        SFTDataConfig(**dict(kw, **{field: value}))


# ---------------------------------------------------------------- pipeline


N, L, B = 12, 40, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    path = write_jsonl(tmp_path_factory.mktemp("sft") / "d.jsonl", records(N))
    cfg = SFTDataConfig(path=path, max_length=L, global_batch_size=B, seed=3, prefetch=2)
    exs, stats = build_examples(cfg, tok)
    assert stats["examples"] == N and stats["clipped"] == 0
    return cfg, exs


def take(it, k):
    return [next(it) for _ in range(k)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batches_static_and_consistent_with_examples(data):
    import grain

    cfg, exs = data
    it = make_iterator(cfg, exs, pad_id=EOS)
    assert isinstance(it, grain.DatasetIterator)
    for b in take(it, 7):
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "input_ids": ((B, L), np.int32), "maskable": ((B, L), bool), "prompt_len": ((B,), np.int32),
            "length": ((B,), np.int32), "example_id": ((B,), np.int32)}
        for r, i in enumerate(b["example_id"]):
            want = hand(BOS) + turn("user", f"q{i}") + turn("assistant", "r" * (1 + i % 5))
            n = len(want)
            assert b["length"][r] == n
            assert b["input_ids"][r].tolist() == want + [EOS] * (L - n)
            assert not b["maskable"][r, :b["prompt_len"][r]].any() and b["maskable"][r, b["prompt_len"][r]:].all()


def test_epochs_cover_every_example_and_seed_controls_order(data):
    cfg, exs = data
    ids = lambda c, k: np.concatenate([b["example_id"] for b in take(make_iterator(c, exs, pad_id=EOS), k)])
    a = ids(cfg, 3 * N // B)  # three epochs
    for e in range(3):
        assert sorted(a[e * N:(e + 1) * N].tolist()) == list(range(N))
    assert len({tuple(a[e * N:(e + 1) * N]) for e in range(3)}) == 3  # reshuffled per epoch
    assert np.array_equal(a, ids(cfg, 3 * N // B))  # same seed, same order
    assert not np.array_equal(a[:N], ids(replace(cfg, seed=4), N // B))
    # seed s+1 does not replay seed s's next epoch (grain reseeds epoch e with seed + e)
    b = ids(replace(cfg, seed=4), 2 * N // B)
    assert not np.array_equal(a[N:2 * N], b[:N])
    ordered = ids(replace(cfg, shuffle=False), 2)
    assert ordered.tolist() == list(range(2 * B))


def test_finite_epochs_drop_only_the_last_partial_batch(data):
    cfg, exs = data
    c = replace(cfg, num_epochs=2, global_batch_size=5)
    got = [b["example_id"] for b in make_iterator(c, exs, pad_id=EOS)]
    assert len(got) == num_steps(N, 5, 2) == 4 and steps_per_epoch(N, 5) == 2
    flat = np.concatenate(got)
    assert sorted(flat[:N].tolist()) == list(range(N))  # the first epoch is whole; batch 3 straddles epochs


def test_process_split_reassembles_the_global_batch(data):
    cfg, exs = data
    glob = take(make_iterator(cfg, exs, pad_id=EOS), 5)
    parts = [take(make_iterator(cfg, exs, pad_id=EOS, process_index=p, process_count=2), 5) for p in range(2)]
    for g, p0, p1 in zip(glob, *parts):
        assert p0["input_ids"].shape == (B // 2, L)
        for k in g:
            assert np.array_equal(np.concatenate([p0[k], p1[k]]), g[k]), k
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make_iterator(cfg, exs, pad_id=EOS, process_index=0, process_count=3)


def test_resume_from_state(data):
    cfg, exs = data
    it = make_iterator(cfg, exs, pad_id=EOS)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip (what a checkpoint stores)
    after = take(it, 2)
    it2 = make_iterator(cfg, exs, pad_id=EOS)
    it2.set_state(state)
    assert same(take(it2, 2), after)


def test_bucket_batches_and_orbax_checkpoint(tmp_path, tok):
    from orbax.checkpoint import v1 as ocp

    n = len(hand(BOS) + turn("user", "q") + turn("assistant", "abc"))
    recs = [{"prompt": "q", "response": "abc", "bucket": [(i + j) % 7 + 1 for j in range(n)]} for i in range(6)]
    cfg = SFTDataConfig(path=write_jsonl(tmp_path / "d.jsonl", recs), max_length=n + 3, global_batch_size=2,
                        pad_bucket=8, prefetch=0)
    exs, _ = build_examples(cfg, tok)
    it = make_iterator(cfg, exs, pad_id=EOS)
    b = next(it)
    p = exs[0]["prompt_len"]
    for r, i in enumerate(b["example_id"]):
        assert b["bucket"][r].tolist() == [0] * p + recs[i]["bucket"][p:] + [8] * 3
    ocp.save_checkpointables(str(tmp_path / "ckpt"), {"dataset": it})
    after = take(it, 2)
    it2 = make_iterator(cfg, exs, pad_id=EOS)
    ocp.load_checkpointables(str(tmp_path / "ckpt"), {"dataset": it2})
    assert same(take(it2, 2), after)

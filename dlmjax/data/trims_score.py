"""TRIMS offline stage (spec trims_mdlm.md §5.1, §5.2): AR-teacher token difficulty -> student tokens -> buckets.

Pipeline per training example (student `input_ids`, already truncated, with `prompt_len` and the chat `messages`):
  1. S = the student's response text: decode(input_ids[prompt_len:] without special tokens).
  2. Teacher input = teacher chat template(prompt messages, generation prompt, enable_thinking=False)
     + teacher tokens of S + the teacher's end-of-turn token; one causal forward in teacher forcing gives
     d_j = -log p(t_j | t_<j) (or the entropy of that distribution) for every response token of the teacher.
  3. Scores move to student tokens by character offsets in S (`align_scores`), or 1:1 when both tokenizers
     produce the same ids for S (Dream / Qwen2.5 vs Qwen3).
  4. All scored response tokens of the whole data set are pooled and ranked into K equal-mass buckets
     (`rank_buckets`): 1 = hardest ... K = easiest. Prompt positions get 0; special tokens (EOT / EOS / pads,
     no text) and tokens with no teacher evidence get K.
Spec [GUESS] choices made here are listed in BUILD_NOTES.md ("TRIMS scoring").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import DTYPES, ModelConfig
from dlmjax.model.masks import causal_mask
from dlmjax.model.transformer import hidden_states

METRICS = ("nll", "entropy")
ORDERS = ("descending", "ascending", "random")
# End-of-turn tokens of common chat templates, tried in this order before falling back to eos_token.
_EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrimsScoreConfig:
    """The `trims_score` job: which teacher, which student tokenizer, and how to bucket."""

    teacher_ckpt: str  # dlmjax checkpoint of an AR model (llama / qwen2 / qwen3), tokenizer files inside
    student_tokenizer: str  # directory with the student's (fast) tokenizer files
    K: int = 8  # number of buckets
    order: str = "descending"  # descending (hardest -> bucket 1) | ascending | random
    metric: str = "nll"  # nll | entropy
    batch_size: int = 8  # teacher rows per forward (the last batch is padded with empty rows)
    max_length: int = 4096  # cap on teacher tokens per example; response tokens past it get bucket K
    seed: int = 0  # only used by order="random"
    teacher_tokenizer: str = ""  # "" = the tokenizer files in teacher_ckpt
    dtype: str = "bfloat16"  # teacher params and activations (log-softmax is always float32)
    length_bucket: int = 64  # teacher rows are padded to a multiple of this (few distinct jit shapes)
    chunk: int = 128  # LM head + log-softmax over sequence chunks of this many positions

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"TrimsScoreConfig.{field}: {why}")

        for f in ("teacher_ckpt", "student_tokenizer"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                bad(f, "must be a non-empty path")
        if not isinstance(self.K, int) or not 1 <= self.K <= 127:
            bad("K", f"must be an int in 1..127 (buckets are int8), got {self.K!r}")
        if self.order not in ORDERS:
            bad("order", f"{self.order!r} is not one of {ORDERS}")
        if self.metric not in METRICS:
            bad("metric", f"{self.metric!r} is not one of {METRICS}")
        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} is not one of {DTYPES}")
        for f, lo in (("batch_size", 1), ("max_length", 2), ("length_bucket", 1), ("chunk", 1)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(f, f"must be an int >= {lo}, got {v!r}")


# ----------------------------------------------------------------------------------------------------------------
# 1. Teacher scores


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _token_scores(cfg: ModelConfig, params, ids, valid, metric: str, chunk: int, attn_chunk: int):
    """[B, L] scores, entry j = score of token j given tokens < j (NaN at j = 0 and where j or j-1 is padding)."""
    b, n = ids.shape
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    h, _ = hidden_states(cfg, params, ids, positions, causal_mask(valid), causal_chunk=attn_chunk)  # [B, L, D]
    tgt = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # [B, L]: the token predicted at each position
    c = min(chunk, n)
    nc = -(-n // c)
    h = jnp.pad(h, ((0, 0), (0, nc * c - n), (0, 0))).reshape(b, nc, c, -1).swapaxes(0, 1)  # [NC, B, C, D]
    tgt = jnp.pad(tgt, ((0, 0), (0, nc * c - n))).reshape(b, nc, c).swapaxes(0, 1)  # [NC, B, C]
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]  # [V, D]

    def one(xs):
        hc, tc = xs
        # f32 logits straight from the f32-accumulated matmul (lm_head would round them to the compute dtype)
        logits = jnp.einsum("bcd,vd->bcv", hc, w.astype(hc.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        if metric == "nll":
            return lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        p = jnp.exp(logits - lse[..., None])
        return lse - jnp.sum(p * logits, axis=-1)  # H = -sum p log p

    s = jax.lax.map(one, (h, tgt)).swapaxes(0, 1).reshape(b, nc * c)[:, :n]  # [B, L]: score of token j+1 at j
    out = jnp.concatenate([jnp.full((b, 1), jnp.nan, jnp.float32), s[:, :-1]], axis=1)
    ok = valid & jnp.concatenate([jnp.zeros((b, 1), bool), valid[:, :-1]], axis=1)
    return jnp.where(ok, out, jnp.nan)


def teacher_token_scores(cfg: ModelConfig, params, ids, valid, metric: str = "nll", chunk: int = 128,
                         attn_chunk: int = 0) -> np.ndarray:
    """Teacher-forcing difficulty of every token: np.float32 [B, L], NaN at position 0 and on padding.

    ids [B, L] int32, valid [B, L] bool (right padding, positions 0..L-1). nll: -log p(ids[j] | ids[<j]) from the
    logits at j-1; entropy: entropy of that distribution. Log-softmax in float32 over `chunk` positions at a time
    (never [B, L, V] f32 at once); attn_chunk > 0 skips the causal upper triangle in attention. Jitted per
    (cfg, [B, L], metric, chunk): callers pad L to a bucketed length.
    """
    if cfg.attention != "causal":
        raise ValueError(f"teacher_token_scores: the teacher must be an AR model (cfg.attention == 'causal'); got "
                         f"family={cfg.family!r} attention={cfg.attention!r}. Use a llama / qwen2 / qwen3 checkpoint.")
    if metric not in METRICS:
        raise ValueError(f"teacher_token_scores: metric={metric!r} is not one of {METRICS}")
    ids, valid = np.asarray(ids, np.int32), np.asarray(valid, bool)
    if ids.ndim != 2 or ids.shape != valid.shape:
        raise ValueError(f"teacher_token_scores: ids {ids.shape} and valid {valid.shape} must both be [B, L]")
    return np.asarray(_token_scores(cfg, params, jnp.asarray(ids), jnp.asarray(valid), metric, int(chunk),
                                    int(attn_chunk)), np.float32)


# ----------------------------------------------------------------------------------------------------------------
# 2. Teacher input


def _as_ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def end_of_turn_id(tok) -> int | None:
    """The teacher's end-of-turn token: the first of <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|> in its vocab,
    else its eos token, else None."""
    vocab = tok.get_vocab()
    for t in _EOT_CANDIDATES:
        if t in vocab:
            return int(vocab[t])
    return None if tok.eos_token_id is None else int(tok.eos_token_id)


def teacher_inputs(teacher_tok, messages_prompt: Sequence[dict], response_text: str):
    """(ids np.int32[n], resp_start, resp_char_spans): chat template(prompt) + generation prompt + response + EOT.

    The template gets enable_thinking=False (a plain template variable: templates that do not read it ignore it).
    The response is tokenised on its own (add_special_tokens=False) so that its fast-tokenizer offset_mapping gives
    the character span (c, e) of each response token in `response_text`. At the seam this can differ from
    tokenising template + response jointly (a merge across the boundary); templates end the generation prompt in
    a newline / special token that pre-tokenizers split on, and only the first response token could change, so the
    effect on the scores is at most one token per example. The EOT token is never scored (its student counterpart
    is a special token with a fixed bucket); it only makes the input look like a finished turn.
    """
    if not getattr(teacher_tok, "is_fast", False):
        raise ValueError("teacher_inputs: the teacher tokenizer must be a fast tokenizer (offset_mapping)")
    if not messages_prompt:
        raise ValueError("teacher_inputs: needs at least one prompt message")
    prompt = _as_ids(teacher_tok.apply_chat_template(list(messages_prompt), add_generation_prompt=True, tokenize=True,
                                                     enable_thinking=False))
    enc = teacher_tok(response_text, add_special_tokens=False, return_offsets_mapping=True)
    resp = list(enc["input_ids"])
    spans = [(int(c), int(e)) for c, e in enc["offset_mapping"]]
    eot = end_of_turn_id(teacher_tok)
    ids = np.asarray(prompt + resp + ([] if eot is None else [eot]), np.int32)
    return ids, len(prompt), spans


# ----------------------------------------------------------------------------------------------------------------
# 3. Alignment to student tokens


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix_len(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest m with b.startswith(a[:m]) (monotone in m)
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def student_spans(tok, ids, text: str | None = None) -> list[tuple[int, int]]:
    """Char spans [a, b) of each of `ids` in text = decode(ids), from prefix decodes (robust to any tokenizer).

    Token i starts where decode(ids[:i]) stops agreeing with `text` and ends where decode(ids[:i+1]) does; a token
    that leaves a character incomplete (a UTF-8 byte piece: the prefix decode ends in U+FFFD) also covers that
    character, so every byte piece of a split character overlaps it and shares its score. O(n^2) decode work on
    the Rust side (~0.1 s per 1k-token response); `score_dataset` skips it when the 1:1 fast path applies.
    """
    ids = list(ids)
    if text is None:
        text = _decode(tok, ids)
    spans, done = [], 0
    for i in range(1, len(ids) + 1):
        t = _decode(tok, ids[:i])
        partial = not text.startswith(t)
        new = _common_prefix_len(t, text) if partial else len(t)
        new = min(max(done, new), len(text))  # chars of `text` complete after token i
        stop = min(new + 1, len(text)) if partial else new
        spans.append((done, stop))
        done = new
    return spans


def align_scores(student_spans, teacher_spans, teacher_scores) -> np.ndarray:
    """Teacher token scores -> student tokens by char offsets (spec §5.1): np.float32 [n_student].

    owner(k) = the student token j with a_j <= c_k < b_j (the first such j); if the teacher token's first char is
    in no student span, the first student token overlapping [c_k, e_k); if none, the score is dropped.
    E_k = student tokens overlapping teacher token k that are owners of no teacher token ("receive nothing").
    Teacher token k gives d_k / (1 + |E_k|) to its owner and to each token of E_k (E_k empty: the owner gets d_k).
    Student score = sum of what it gets; NaN if it gets nothing (no overlap with any scored teacher token).
    The split is mass-preserving: sum of student scores = sum of owned teacher scores.
    """
    a, b = (np.asarray([s[i] for s in student_spans], np.int64).reshape(-1) for i in (0, 1))
    c, e = (np.asarray([s[i] for s in teacher_spans], np.int64).reshape(-1) for i in (0, 1))
    d = np.asarray(teacher_scores, np.float64).reshape(-1)
    if len(c) != len(d):
        raise ValueError(f"align_scores: {len(c)} teacher spans but {len(d)} teacher scores")
    ns = len(a)
    if ns == 0:
        return np.zeros(0, np.float32)
    contains = (a[None] <= c[:, None]) & (c[:, None] < b[None])  # [T, S]
    overlap = np.maximum(a[None], c[:, None]) < np.minimum(b[None], e[:, None])  # [T, S] non-empty intersection
    owner = np.where(contains.any(1), contains.argmax(1), np.where(overlap.any(1), overlap.argmax(1), -1))  # [T]
    has = owner >= 0
    receives = np.zeros(ns, bool)
    receives[owner[has]] = True
    # Decision (spec §5.1 item 5): the teacher score is split evenly over the owner AND the receive-nothing tokens
    # it overlaps, so the owner keeps only its share and the total is preserved (a multi-piece word is not
    # counted twice).
    extra = overlap & ~receives[None] & has[:, None]  # [T, S]; owners are never in E_k
    share = np.where(has, d / (1 + extra.sum(1)), 0.0)  # [T]
    out = np.bincount(owner[has], weights=share[has], minlength=ns) + (extra * share[:, None]).sum(0)
    touched = receives | extra.any(0)
    return np.where(touched, out, np.nan).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# 4. Buckets


def rank_buckets(scores, K: int, order: str = "descending", seed: int = 0) -> np.ndarray:
    """Global equal-mass buckets (spec §5.2): np.int8 [N] in 1..K.

    descending: rank r = position in a descending sort (ties: earlier index first), b = 1 + floor(K r / N), so
    bucket 1 holds the hardest N/K tokens and every bucket holds N/K +- 1. ascending: K + 1 - b.
    random: b ~ U{1..K} i.i.d., drawn once from `seed` (independent of the scores).
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    if not isinstance(K, (int, np.integer)) or not 1 <= K <= 127:
        raise ValueError(f"rank_buckets: K must be an int in 1..127, got {K!r}")
    if order not in ORDERS:
        raise ValueError(f"rank_buckets: order={order!r} is not one of {ORDERS}")
    n = len(s)
    if order == "random":
        return np.random.default_rng(seed).integers(1, K + 1, size=n).astype(np.int8)
    if not np.all(np.isfinite(s)):
        raise ValueError("rank_buckets: scores must be finite")
    rank = np.empty(n, np.int64)
    rank[np.argsort(-s, kind="stable")] = np.arange(n)
    bucket = 1 + (K * rank) // max(n, 1)
    if order == "ascending":
        bucket = K + 1 - bucket
    return bucket.astype(np.int8)


# ----------------------------------------------------------------------------------------------------------------
# 5. The whole data set


@dataclasses.dataclass(frozen=True)
class ScoredDataset:
    """Per example, aligned to its `input_ids`: bucket int8 (0 prompt, 1..K response) and the student-token score
    float32 (NaN on the prompt, special tokens and tokens without teacher evidence); plus summary stats."""

    bucket: list
    score: list
    stats: dict


def special_ids(tok) -> set[int]:
    """Ids the tokenizer marks special (EOS / EOT / pad / mask / added special tokens): no text, fixed bucket."""
    out = {int(i) for i in (tok.all_special_ids or [])}
    out |= {int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return out


def score_dataset(teacher_cfg: ModelConfig, teacher_params, teacher_tok, student_tok, examples: Sequence[dict],
                  K: int = 8, order: str = "descending", metric: str = "nll", batch_size: int = 8, seed: int = 0,
                  max_length: int = 4096, length_bucket: int = 64, chunk: int = 128,
                  progress: bool = True) -> ScoredDataset:
    """Teacher scores -> student tokens -> global buckets for every example {"input_ids", "prompt_len", "messages"}.

    The response text is the student's own (truncated) response, decode(input_ids[prompt_len:] minus special ids);
    the prompt is messages[:-1] (the last message is the response). Teacher rows are sorted by length, batched
    [batch_size, multiple of length_bucket] and truncated to max_length.
    """
    from tqdm import tqdm

    if order not in ORDERS:
        raise ValueError(f"score_dataset: order={order!r} is not one of {ORDERS}")
    specials = np.asarray(sorted(special_ids(student_tok)), np.int64)
    prep = []
    for i, ex in enumerate(examples):
        ids = np.asarray(ex["input_ids"], np.int64).reshape(-1)
        p = int(ex["prompt_len"])
        msgs = ex.get("messages")
        if not 0 <= p <= len(ids):
            raise ValueError(f"score_dataset: example {i}: prompt_len={p} outside 0..{len(ids)}")
        if not msgs or len(msgs) < 2:
            raise ValueError(f"score_dataset: example {i}: 'messages' needs prompt message(s) and the response")
        is_text = ~np.isin(ids[p:], specials)  # [n - p]
        text_ids = ids[p:][is_text]
        text = _decode(student_tok, text_ids)
        t_ids, t_start, t_spans = teacher_inputs(teacher_tok, msgs[:-1], text)
        if len(t_ids) and t_ids.max() >= teacher_cfg.vocab_size:
            raise ValueError(f"score_dataset: example {i}: teacher token id {int(t_ids.max())} >= teacher vocab_size "
                             f"{teacher_cfg.vocab_size} (tokenizer and checkpoint do not match)")
        n_t = len(t_spans)
        fast = n_t == len(text_ids) and np.array_equal(t_ids[t_start:t_start + n_t], text_ids)
        prep.append(dict(n=len(ids), p=p, is_text=is_text, t_ids=t_ids[:max_length], t_full=len(t_ids),
                         t_start=t_start, t_spans=t_spans, fast=fast,
                         s_spans=None if fast else student_spans(student_tok, text_ids, text)))

    # Teacher forward: rows sorted by length, fixed batch, widths rounded up to length_bucket.
    resp_scores = [None] * len(prep)
    order_idx = sorted(range(len(prep)), key=lambda j: len(prep[j]["t_ids"]))
    batches = [order_idx[j:j + batch_size] for j in range(0, len(order_idx), batch_size)]
    for rows in tqdm(batches, desc=f"trims_score[{metric}]", unit="batch", disable=not progress):
        width = max(1, -(-max(len(prep[j]["t_ids"]) for j in rows) // length_bucket)) * length_bucket
        arr = np.zeros((batch_size, width), np.int32)
        valid = np.zeros((batch_size, width), bool)
        for r, j in enumerate(rows):
            t = prep[j]["t_ids"]
            arr[r, :len(t)], valid[r, :len(t)] = t, True
        sc = teacher_token_scores(teacher_cfg, teacher_params, arr, valid, metric, chunk)
        for r, j in enumerate(rows):
            q = prep[j]
            full = np.full(q["t_full"], np.nan, np.float32)
            full[:len(q["t_ids"])] = sc[r, :len(q["t_ids"])]
            resp_scores[j] = full[q["t_start"]:q["t_start"] + len(q["t_spans"])]

    # Alignment, then one global ranking over every scored student response token.
    scores, pool = [], []
    for q, ts in zip(prep, resp_scores):
        if q["fast"]:
            s = ts
        else:
            keep = np.isfinite(ts)
            s = align_scores(q["s_spans"], [sp for sp, k in zip(q["t_spans"], keep) if k], ts[keep])
        full = np.full(q["n"], np.nan, np.float32)
        full[q["p"]:][q["is_text"]] = s  # a view: writes into full
        scores.append(full)
        pool.append(full[np.isfinite(full)])
    pooled = np.concatenate(pool) if pool else np.zeros(0, np.float32)
    ranked = rank_buckets(pooled, K, order, seed)
    buckets, off = [], 0
    for q, s in zip(prep, scores):
        b = np.zeros(q["n"], np.int8)
        b[q["p"]:] = K  # special tokens / no teacher evidence: the easiest stage (spec §5.2 [GUESS])
        fin = np.isfinite(s)
        b[fin] = ranked[off:off + int(fin.sum())]
        off += int(fin.sum())
        buckets.append(b)

    n_text = sum(int(q["is_text"].sum()) for q in prep)
    n_resp = sum(q["n"] - q["p"] for q in prep)
    per_bucket = [int((ranked == k).sum()) for k in range(1, K + 1)]
    mean_score = [float(pooled[ranked == k].mean()) if per_bucket[k - 1] else float("nan") for k in range(1, K + 1)]
    stats = dict(examples=len(prep), response_tokens=n_resp, scored_tokens=int(len(pooled)),
                 special_tokens=n_resp - n_text, unscored_text_tokens=n_text - int(len(pooled)),
                 fast_path_examples=sum(q["fast"] for q in prep),
                 truncated_examples=sum(q["t_full"] > len(q["t_ids"]) for q in prep),
                 teacher_tokens=sum(len(q["t_ids"]) for q in prep), K=K, order=order, metric=metric,
                 tokens_per_bucket=per_bucket, mean_score_per_bucket=mean_score)
    return ScoredDataset(bucket=buckets, score=scores, stats=stats)


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_scored_jsonl(records: Sequence[dict], buckets: Sequence, out_path: str):
    """Each record + "bucket" (aligned to its tokenised input_ids) + "bucket_len", one JSON line each.

    Written to `<out>.partial` and renamed at the end; on any exception the partial file is removed.
    """
    if len(records) != len(buckets):
        raise ValueError(f"write_scored_jsonl: {len(records)} records but {len(buckets)} bucket arrays")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    partial = out_path + ".partial"
    try:
        with open(partial, "w") as f:
            for rec, b in zip(records, buckets):
                b = [int(x) for x in np.asarray(b).reshape(-1)]
                f.write(json.dumps({**rec, "bucket": b, "bucket_len": len(b)}, default=_json_default) + "\n")
        os.replace(partial, out_path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def run_trims_score(cfg: TrimsScoreConfig, records: Sequence[dict], examples: Sequence[dict], out_path: str,
                    log=print, pad_to: Sequence[int] | None = None) -> dict:
    """The trims_score job: load teacher + tokenizers, score, bucket, write `out_path`; returns the stats.

    pad_to: per example, the untruncated token count; buckets are extended to it with K (the SFT reader clips the
    record's bucket together with its ids, so the clipped tail's value never reaches training)."""
    from transformers import AutoTokenizer

    from dlmjax.checkpoint import load_checkpoint

    if len(records) != len(examples):
        raise ValueError(f"run_trims_score: {len(records)} records but {len(examples)} tokenised examples")
    tcfg, params = load_checkpoint(cfg.teacher_ckpt, dtype=cfg.dtype, compute_dtype=cfg.dtype)
    t_tok = AutoTokenizer.from_pretrained(cfg.teacher_tokenizer or cfg.teacher_ckpt)
    s_tok = AutoTokenizer.from_pretrained(cfg.student_tokenizer)
    res = score_dataset(tcfg, params, t_tok, s_tok, examples, K=cfg.K, order=cfg.order, metric=cfg.metric,
                        batch_size=cfg.batch_size, seed=cfg.seed, max_length=cfg.max_length,
                        length_bucket=cfg.length_bucket, chunk=cfg.chunk)
    buckets = res.bucket
    if pad_to is not None:
        buckets = [np.concatenate([b, np.full(max(n - len(b), 0), cfg.K, np.int8)]) for b, n in zip(buckets, pad_to)]
    write_scored_jsonl(records, buckets, out_path)
    st = res.stats
    log(f"trims_score summary: examples={st['examples']} scored_tokens={st['scored_tokens']} "
        f"special_tokens={st['special_tokens']} unscored_text_tokens={st['unscored_text_tokens']} "
        f"fast_path_examples={st['fast_path_examples']} truncated_examples={st['truncated_examples']} "
        f"tokens_per_bucket={st['tokens_per_bucket']} "
        f"mean_score_per_bucket={[round(x, 4) for x in st['mean_score_per_bucket']]} -> {out_path}")
    return st


@dataclasses.dataclass(frozen=True)
class TrimsScoreRunConfig:
    """The whole `trims_score` job: the scoring settings, the SFT data file it reads (tokenised for the student as the
    SFT job will tokenise it) and the scored JSONL it writes."""

    score: TrimsScoreConfig
    data: str  # JSONL of {prompt, response} or {messages} records
    out: str  # scored JSONL (written as <out>.partial, renamed when complete)
    max_length: int = 1024  # student tokens per row L, as in the SFT run that reads `out`
    truncation: str = "right"  # right | filter, as in the SFT run
    chat_template: bool = True
    skip_malformed: bool = False

    def __post_init__(self):
        from dlmjax.data.sft import TRUNCATIONS

        if not self.data or not self.out:
            raise ValueError("TrimsScoreRunConfig: data and out are required")
        if self.max_length < 2:
            raise ValueError(f"TrimsScoreRunConfig.max_length={self.max_length}: must be >= 2")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"TrimsScoreRunConfig.truncation={self.truncation!r}: must be one of {TRUNCATIONS}")


def run_trims_score_job(run: TrimsScoreRunConfig, log=print) -> dict:
    """Read and tokenise `run.data` with the student tokenizer (the SFT job's reader), then `run_trims_score`.
    The records are written back as they were read, plus their buckets."""
    from transformers import AutoTokenizer

    from dlmjax.data.sft import read_records, tokenize_record

    tok = AutoTokenizer.from_pretrained(run.score.student_tokenizer)
    records, skipped = read_records(run.data, skip_malformed=run.skip_malformed)
    kept, examples = [], []
    for i, rec in enumerate(records):
        ex = tokenize_record(tok, rec, run.max_length, run.truncation, run.chat_template,
                             where=f"{run.data} record {i}")
        if ex is not None:  # write back the record as it was read (read_records adds "messages" to prompt/response)
            kept.append({k: v for k, v in rec.items() if k != "messages"} if "prompt" in rec else rec)
            examples.append({**ex, "messages": rec["messages"]})
    log(f"trims_score: {len(examples)} examples ({skipped} malformed skipped, {len(records) - len(kept)} dropped "
        "by truncation)")
    return run_trims_score(run.score, kept, examples, run.out, log=log, pad_to=[ex["full_len"] for ex in examples])

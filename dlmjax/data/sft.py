"""SFT records -> tokenized examples: dLLM's `default_sft_map_fn` + `post_process_dataset` (trims_mdlm.md §3.4).

A JSONL line is {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]} ending with the assistant
turn; other keys are kept (e.g. "bucket": the TRIMS teacher's per-token bucket ids, aligned to the untruncated
`input_ids`). Every record is validated before tokenization; an error names the file and the line.
"""

from __future__ import annotations


import numpy as np

from dlmjax import jsonl

TRUNCATIONS = ("right", "filter")
BUCKET_MAX = 127  # buckets are stored as int8


class DataError(ValueError):
    """A malformed SFT data file or record; the message names the file and the line (or the record)."""


def sft_special_ids(tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id) with dLLM's `get_tokenizer` fixes: pad := eos if missing, eos := pad if missing."""
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if pad is None and eos is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; SFT pads with EOS and needs one of them")
    return (eos if pad is None else pad), (pad if eos is None else eos)


def _check_record(rec) -> dict:
    """The record normalised to carry "messages"; raises ValueError saying what is wrong (no location)."""
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    pair, chat = ("prompt" in rec or "response" in rec), "messages" in rec
    if pair == chat:
        raise ValueError("expected either 'prompt' and 'response', or 'messages' (exactly one of the two forms)")
    if pair:
        for k in ("prompt", "response"):
            if k not in rec:
                raise ValueError(f"missing '{k}'")
            if not isinstance(rec[k], str):
                raise ValueError(f"'{k}' must be a string, got {type(rec[k]).__name__}")
        rec = dict(rec, messages=[{"role": "user", "content": rec["prompt"]},
                                  {"role": "assistant", "content": rec["response"]}])
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{j}] must be an object with string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's (role 'assistant'), got {msgs[-1]['role']!r}")
    if not msgs[-1]["content"].strip():
        raise ValueError("empty response (the last message's content)")
    if "bucket" in rec:
        b = rec["bucket"]
        if not (isinstance(b, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= BUCKET_MAX
                                            for x in b)):
            raise ValueError(f"'bucket' must be a list of integers in [0, {BUCKET_MAX}]")
    return rec


def _read(path: str, skip_malformed: bool) -> tuple[list[dict], list[int], int]:
    """(records, their 1-based line numbers, n_skipped)."""
    records, lines, skipped = [], [], 0
    for n, raw in jsonl.lines(path, "SFT data file", DataError):
        try:
            rec = _check_record(jsonl.parse(raw))
        except ValueError as e:
            if not skip_malformed:
                raise DataError(f"{path}:{n}: {e}") from None
            skipped += 1
            continue
        records.append(rec)
        lines.append(n)
    return records, lines, skipped


def read_records(path: str, skip_malformed: bool = False) -> tuple[list[dict], int]:
    """(records, n_skipped): every JSONL record normalised to carry "messages"; blank lines are ignored."""
    records, _, skipped = _read(path, skip_malformed)
    return records, skipped


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers v5 returns a BatchEncoding


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_record(tokenizer, record: dict, max_length: int, truncation: str = "right", chat_template: bool = True,
                    *, where: str = "record") -> dict | None:
    """{"input_ids": int32[n], "prompt_len", "full_len", ("bucket": int8[n])} or None when truncation drops it.

    `input_ids` = chat template over all messages; `prompt_len` = length of the template over messages[:-1] with the
    generation prompt (it must be a prefix). Without a template: [bos] + prompt | response + [eos]. "right": drop if
    prompt_len >= max_length (no response token would be left), else right-clip (a clipped response loses its EOS, as
    in dLLM); "filter": drop if longer than max_length. `where` names the record in errors.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATIONS}")
    msgs = record["messages"]
    if chat_template:
        ids = _template(tokenizer, msgs, add_generation_prompt=False)
        prompt = _template(tokenizer, msgs[:-1], add_generation_prompt=True)
        if ids[:len(prompt)] != prompt:
            raise DataError(f"{where}: the chat template over messages[:-1] with the generation prompt "
                            f"({len(prompt)} tokens) is not a prefix of the full conversation ({len(ids)} tokens); "
                            "the loss region would be wrong")
        prompt_len = len(prompt)
    else:
        _, eos = sft_special_ids(tokenizer)
        bos = getattr(tokenizer, "bos_token_id", None)
        head = ([bos] if bos is not None else []) + _encode(tokenizer, "\n".join(m["content"] for m in msgs[:-1]))
        ids = head + _encode(tokenizer, msgs[-1]["content"]) + [eos]
        prompt_len = len(head)
    full_len = len(ids)
    if full_len <= prompt_len:
        raise DataError(f"{where}: the response adds no token after the prompt ({prompt_len} tokens)")
    bucket = record.get("bucket")
    if bucket is not None and len(bucket) != full_len:
        raise DataError(f"{where}: 'bucket' has {len(bucket)} entries but the tokenized conversation has {full_len} "
                        "tokens (the teacher pass must use the same tokenizer, template and record)")
    if truncation == "filter" and full_len > max_length:
        return None
    if truncation == "right" and prompt_len >= max_length:
        return None
    n = min(full_len, max_length)
    out = {"input_ids": np.asarray(ids[:n], np.int32), "prompt_len": prompt_len, "full_len": full_len}
    if bucket is not None:
        out["bucket"] = np.asarray(bucket[:n], np.int8)
    return out

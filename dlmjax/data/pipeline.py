"""Tokenized SFT examples -> a checkpointable grain iterator of static-shape batches (host-side, numpy only).

Order: range(n) -> shuffle (seed, per epoch) -> repeat(num_epochs) -> batch(global B, drop_remainder) -> this
process's contiguous row block -> collate. Every process computes the same global index order and collates only its
rows, so the global batch does not depend on the process count; assemble it with
`jax.make_array_from_process_local_data`. Batches run across epoch boundaries (repeat before batch), so only the last
partial batch of the whole run is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import grain
import numpy as np

from dlmjax.data.sft import BUCKET_MAX, TRUNCATIONS, DataError, _read, tokenize_record


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    path: str
    max_length: int = 1024  # L: every batch is [B, L]
    global_batch_size: int = 32  # sequences per optimizer step, over all processes
    seed: int = 0
    truncation: str = "right"  # right | filter (dLLM DataArguments.truncation)
    skip_malformed: bool = False
    chat_template: bool = True
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    pad_bucket: int = 8  # TRIMS bucket id of trained pad (EOS) positions: K, the easiest (trims_mdlm.md §10.11)
    prefetch: int = 4  # batches prepared ahead in one background thread; 0: in the calling thread

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SFTDataConfig.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.path, str) or not self.path:
            bad("path", "must be a non-empty path")
        for field in ("max_length", "global_batch_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                bad(field, "must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be a non-negative integer")
        if self.truncation not in TRUNCATIONS:
            bad("truncation", f"must be one of {TRUNCATIONS}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs <= 0):
            bad("num_epochs", "must be a positive integer or None (repeat forever)")
        if not isinstance(self.pad_bucket, int) or not 0 <= self.pad_bucket <= BUCKET_MAX:
            bad("pad_bucket", f"must be an integer in [0, {BUCKET_MAX}]")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            bad("prefetch", "must be a non-negative integer")


def file_fingerprint(path: str, window: int = 1 << 20) -> str:
    """`<size> bytes, sha256 <16 hex>` of the file's size and its first and last `window` bytes (the whole file when
    it is smaller than 2 windows): cheap on any data size, and it changes with any edit that changes the length or
    touches either end (appended, removed, reordered or rewritten records; an in-place edit of the same length in the
    middle of a file > 2 MiB is the one change it misses). Recorded in SFT checkpoints, compared on resume."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = hashlib.sha256(str(size).encode())
            if size <= 2 * window:
                h.update(f.read())
            else:
                h.update(f.read(window))
                f.seek(size - window)
                h.update(f.read(window))
    except OSError as e:
        raise DataError(f"{path}: cannot open SFT data file ({e.strerror})") from None
    return f"{size} bytes, sha256 {h.hexdigest()[:16]}"


def build_examples(cfg: SFTDataConfig, tokenizer) -> tuple[list[dict], dict]:
    """(examples, stats): every record of cfg.path tokenized once; stats count read / skipped / dropped / clipped."""
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{cfg.path}: chat_template=True but the tokenizer has no chat template; "
                        "set chat_template=False to use [bos] + prompt + response + [eos]")
    records, lines, skipped = _read(cfg.path, cfg.skip_malformed)
    examples, dropped, clipped = [], 0, 0
    for i, (rec, line) in enumerate(zip(records, lines)):
        ex = tokenize_record(tokenizer, rec, cfg.max_length, cfg.truncation, cfg.chat_template,
                             where=f"{cfg.path}:{line} (record {i})")
        if ex is None:
            dropped += 1
            continue
        clipped += ex["full_len"] > len(ex["input_ids"])
        ex["line"] = line
        examples.append(ex)
    if not examples:
        raise DataError(f"{cfg.path}: no examples left ({len(records)} records read, {skipped} malformed skipped, "
                        f"{dropped} dropped by truncation={cfg.truncation!r} at max_length={cfg.max_length})")
    stats = {"read": len(records), "skipped_malformed": skipped, "dropped_truncation": dropped, "clipped": clipped,
             "examples": len(examples), "tokens": int(sum(len(e["input_ids"]) for e in examples))}
    return examples, stats


def collate(examples: list[dict], max_length: int, pad_id: int, pad_bucket: int = 8,
            example_ids=None) -> dict[str, np.ndarray]:
    """Right-pad to max_length with pad_id (= EOS: LLaDA trains on the padded EOS, trims_mdlm.md §3.2).

    maskable = response tokens and pads (dLLM's labels != -100); bucket (when examples carry one) = 0 on the prompt,
    the record's ids on the response, pad_bucket on pads. example_ids default to -1 (unknown).
    """
    b, el = len(examples), max_length
    ids = np.full((b, el), pad_id, np.int32)  # [B, L]
    prompt_len = np.array([e["prompt_len"] for e in examples], np.int32)  # [B]
    length = np.array([len(e["input_ids"]) for e in examples], np.int32)  # [B]
    if (length > el).any():
        raise ValueError(f"an example has {length.max()} tokens, more than max_length={el}")
    with_bucket = ["bucket" in e for e in examples]
    if any(with_bucket) and not all(with_bucket):
        raise ValueError("some examples carry a 'bucket' and some do not")
    bucket = np.full((b, el), pad_bucket, np.int8) if all(with_bucket) and b else None  # [B, L]
    for i, e in enumerate(examples):
        ids[i, :length[i]] = e["input_ids"]
        if bucket is not None:
            bucket[i, :length[i]] = e["bucket"]
    maskable = np.arange(el)[None, :] >= prompt_len[:, None]  # [B, L]
    out = {"input_ids": ids, "maskable": maskable, "prompt_len": prompt_len, "length": length,
           "example_id": np.asarray(example_ids if example_ids is not None else [-1] * b, np.int32).reshape(b)}
    if bucket is not None:
        bucket[~maskable] = 0
        out["bucket"] = bucket
    return out


def _local_batch(indices, *, examples, lo, hi, max_length, pad_id, pad_bucket):
    """batch_fn: the global batch's example indices -> this process's rows [lo, hi), collated."""
    mine = [int(i) for i in indices[lo:hi]]
    return collate([examples[i] for i in mine], max_length, pad_id, pad_bucket, example_ids=mine)


def shuffle_seed(seed: int) -> int:
    """The 32-bit grain shuffle seed for `seed`, well mixed: grain reshuffles epoch e with (shuffle_seed + e) mod 2^32,
    so raw seeds s and s+1 would share epoch orders one epoch apart."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def make_iterator(cfg: SFTDataConfig, examples: list[dict], *, pad_id: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """This process's rows of every global batch, as a grain DatasetIterator (get_state/set_state; an orbax
    checkpointable). Epoch e's order depends on (seed, e) only."""
    gb, n = cfg.global_batch_size, len(examples)
    if not isinstance(process_count, int) or process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if gb % process_count:
        raise ValueError(f"global_batch_size={gb} is not divisible by process_count={process_count}")
    if n == 0:
        raise ValueError("no examples")
    if cfg.num_epochs is not None and cfg.num_epochs * n < gb:
        raise ValueError(f"{cfg.num_epochs} epochs of {n} examples do not fill one global batch of {gb}")
    per = gb // process_count
    ds = grain.MapDataset.range(n)
    if cfg.shuffle:
        ds = ds.shuffle(seed=shuffle_seed(cfg.seed))  # reshuffles per epoch (index // n) when repeated
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.batch(gb, drop_remainder=True, batch_fn=functools.partial(
        _local_batch, examples=examples, lo=process_index * per, hi=(process_index + 1) * per,
        max_length=cfg.max_length, pad_id=pad_id, pad_bucket=cfg.pad_bucket))
    opts = grain.ReadOptions(num_threads=1 if cfg.prefetch else 0, prefetch_buffer_size=cfg.prefetch)
    return iter(ds.to_iter_dataset(opts))


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    """Whole global batches in one epoch (n // B); a run of E epochs yields num_steps(n, B, E) = E*n // B batches."""
    if n_examples < global_batch_size:
        raise ValueError(f"{n_examples} examples do not fill one global batch of {global_batch_size}")
    return n_examples // global_batch_size


def num_steps(n_examples: int, global_batch_size: int, num_epochs: int) -> int:
    """Exactly how many batches make_iterator yields for num_epochs (batches run across epoch boundaries)."""
    return num_epochs * n_examples // global_batch_size

"""The decode job: a JSONL of prompts -> batched jitted decoding (`decode.api.generate`, data-parallel over the local
devices when there are several) -> a JSONL of completions with step maps and stats.

Input lines: {"prompt": text} (through the checkpoint's tokenizer and chat template) or {"prompt_ids": [ints]}.
Every line is parsed and validated before any decoding starts (UTF-8, JSON, at least one prompt token, prompt +
max_new_tokens within the model's max_position_embeddings); an error names the file and the line. `--out` is checked
(not a directory, its directory writable) before the checkpoint is loaded. Results are appended to `<out>.partial`
batch by batch (flushed) and renamed to `<out>` at the end, so an interrupted run (Ctrl-C) keeps every finished batch
and never leaves a truncated `<out>`; a run that fails (bad input, disk full, ...) removes its `.partial` and the
directories it created.

Each output line carries expected wrong commits (EWC) two ways: `ewc_per_step` (one value per denoising step the row
ran: Σ(1 - p) over every slot committed at that step, including slots a block commits past the stop token or past
max_new_tokens and that are cut afterwards, as SLIM-RL's engine counts them), its mean `ewc_per_step_mean` (the
quantity of SLIM-RL's `ewc_mean` and the paper's Figure 5), and `ewc_kept_sum`, Σ(1 - p) over the kept tokens only
(the old `expected_wrong_commits`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import numpy as np

from dlmjax import jsonl
from dlmjax import model as M
from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode import api
from dlmjax.decode.sdar import BlockDecodeConfig

DECODERS = ("sdar", "llada", "dream")
LAYER_LOOPS = ("auto", "scan", "unrolled")


def unrolled_layers(layer_loop: str) -> bool:
    """Whether decoding runs the unrolled layer loop: on XLA:CPU a scan copies every layer's weights and cache
    slice per forward (and converts whole bf16 stacks), so `auto` unrolls there; TPU/GPU keep the scan."""
    return layer_loop == "unrolled" or (layer_loop == "auto" and jax.default_backend() == "cpu")


class PromptError(ValueError):
    """A malformed prompts file; the message names the file and the line."""


class OutputError(ValueError):
    """An output path that cannot be written (a directory, a read-only or full file system); names the path."""


@dataclasses.dataclass(frozen=True)
class DecodeJobConfig:
    ckpt: str
    prompts: str
    out: str
    decoder: str  # sdar | llada | dream
    batch_size: int = 8
    seed: int = 0
    chat_template: bool = True
    length_bucket: int = 16  # prompt widths are padded up to a multiple of this (fewer compilations)
    dtype: str = "float32"  # params + compute dtype
    layer_loop: str = "auto"  # scan | unrolled (unstacked params) | auto = unrolled on CPU, scan elsewhere

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"--decoder={self.decoder!r} is not one of {DECODERS}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"--layer_loop={self.layer_loop!r} is not one of {LAYER_LOOPS}")
        if self.batch_size <= 0:
            raise ValueError("--batch_size must be positive")


def read_prompts(path: str, tokenizer, chat_template: bool, vocab_size: int,
                 max_positions: int | None = None, max_new_tokens: int = 0) -> list[tuple[str | None, list[int]]]:
    """[(text or None, ids)] for every line; blank lines are skipped. With max_positions, a prompt whose tokens +
    max_new_tokens exceed it is refused (naming the line)."""
    out = []
    for n, raw in jsonl.lines(path, "prompts file", PromptError):
        where = f"{path}:{n}"
        try:
            rec = jsonl.parse(raw)
        except ValueError as e:
            raise PromptError(f"{where}: {e}") from None
        if not isinstance(rec, dict) or ("prompt" in rec) == ("prompt_ids" in rec):
            raise PromptError(f"{where}: expected an object with exactly one of 'prompt' or 'prompt_ids'")
        if "prompt_ids" in rec:
            ids = rec["prompt_ids"]
            if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in ids)):
                raise PromptError(f"{where}: 'prompt_ids' must be a non-empty list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise PromptError(f"{where}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
            text = None
        else:
            text = rec["prompt"]
            if not isinstance(text, str):
                raise PromptError(f"{where}: 'prompt' must be a string")
            if tokenizer is None:
                raise PromptError(f"{where}: text prompt but the checkpoint has no tokenizer files; use "
                                  "'prompt_ids'")
            if chat_template:
                if not getattr(tokenizer, "chat_template", None):
                    raise PromptError(f"{where}: the checkpoint's tokenizer has no chat template; pass "
                                      "--nochat_template or use 'prompt_ids'")
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:  # one behaviour for every decoder: a prompt needs at least one token
                raise PromptError(f"{where}: the prompt is empty (0 tokens); every decoder needs at least one "
                                  "prompt token")
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            raise PromptError(f"{where}: the prompt's {len(ids)} tokens + max_new_tokens={max_new_tokens} = "
                              f"{len(ids) + max_new_tokens} positions exceed the model's "
                              f"max_position_embeddings ({max_positions})")
        out.append((text, ids))
    if not out:
        raise PromptError(f"{path}: no prompts")
    return out


def new_tokens(decode_cfg) -> int:
    """The completion length of a decoder config (SDAR / Dream max_new_tokens, LLaDA gen_length)."""
    for name in ("max_new_tokens", "gen_length"):
        if getattr(decode_cfg, name, None) is not None:
            return int(getattr(decode_cfg, name))
    raise TypeError(f"{type(decode_cfg).__name__} has no max_new_tokens / gen_length")


class OutputFile:
    """`<out>` written through `<out>.partial`: checked (not a directory, writable) before any work, renamed when
    complete. On failure, `discard()` removes the partial file and the directories this object created, so a failed
    run leaves nothing behind (an interrupt keeps the finished batches in `.partial`)."""

    def __init__(self, out: str, flag: str = "--out"):
        self.out, self.partial = out, out + ".partial"
        if os.path.isdir(out) or os.path.isdir(self.partial):
            raise OutputError(f"{flag}={out}: is a directory (give a file path)")
        parent = os.path.dirname(os.path.abspath(out))
        self.created, p = [], parent
        while not os.path.exists(p):
            self.created.append(p)
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise OutputError(f"{flag}={out}: {p} is not a directory")
        try:
            os.makedirs(parent, exist_ok=True)
            self.f = open(self.partial, "w")
            self.f.write("\n")  # probe: a full file system fails here, before the work, not after it
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.seek(0)
            self.f.truncate()
        except OSError as e:
            self.discard()
            raise OutputError(f"{flag}={out}: cannot write {e.filename or self.partial} ({e.strerror})") from None

    def write(self, text: str):
        try:
            self.f.write(text)
            self.f.flush()
        except OSError as e:
            raise OutputError(f"{self.partial}: write failed ({e.strerror})") from None

    def commit(self):
        try:
            self.f.close()
            os.replace(self.partial, self.out)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot finish the output ({e.strerror})") from None

    def discard(self, keep_finished: bool = False):
        f = getattr(self, "f", None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        if keep_finished and os.path.exists(self.partial) and os.path.getsize(self.partial) > 0:
            return
        with contextlib.suppress(OSError):
            os.remove(self.partial)
        for d in self.created:  # deepest first; only directories left empty
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _load_tokenizer(ckpt: str):
    if not any(os.path.exists(os.path.join(ckpt, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def _data_mesh(batch_size: int):
    """A data-parallel mesh over every local device when there are several and they split the batch; else None
    (one device). Single-process only: the job feeds host arrays."""
    n = jax.device_count()
    if n == 1 or jax.process_count() > 1 or batch_size % n:
        return None
    from dlmjax import sharding

    return sharding.make_mesh(sharding.MeshConfig())


def _pack(batch: list[list[int]], width: int, pad: int, left: bool):
    arr = np.full((len(batch), width), pad, np.int32)
    valid = np.zeros((len(batch), width), bool)
    for i, ids in enumerate(batch):
        if left:
            arr[i, width - len(ids):], valid[i, width - len(ids):] = ids, True
        else:
            arr[i, :len(ids)], valid[i, :len(ids)] = ids, True
    return arr, valid


def run(job: DecodeJobConfig, decode_cfg, log=print) -> dict:
    """Decode every prompt; returns the summary dict (also printed as one line)."""
    out = OutputFile(job.out)
    try:
        summary = _run(job, decode_cfg, out)
    except BaseException as e:
        out.discard(keep_finished=isinstance(e, KeyboardInterrupt))
        raise
    log("decode summary: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
    return summary


def _record(res, i: int, index: int, text, pid, tok) -> dict:
    """One output line: row i of a Rollout."""
    n = int(res.lengths[i])
    steps = int(res.n_steps[i])
    toks = res.tokens[i, :n].tolist()
    ewc_steps = np.asarray(res.ewc_per_step[i, :steps], np.float64)
    rec = {"index": index, "prompt": text, "prompt_ids": pid, "ids": toks,
           "text": tok.decode(toks, skip_special_tokens=True) if tok is not None else None,
           "step_map": res.step_map[i, :n].tolist(), "tpf": float(res.tpf[i]),
           # EWC as SLIM-RL counts it: every slot committed at each denoising step (incl. ones cut afterwards)
           "ewc_per_step": [float(x) for x in ewc_steps],
           "ewc_per_step_mean": float(ewc_steps.sum() / steps) if steps else 0.0,
           "commits_per_step": res.commits_per_step[i, :steps].tolist(),
           # Σ(1 - p) over the kept tokens only (the old `expected_wrong_commits`, kept under its old name too)
           "ewc_kept_sum": float(res.ewc_sum[i]), "expected_wrong_commits": float(res.ewc_sum[i]),
           "forwards": int(res.n_forwards[i])}
    if res.n_full is not None:  # Fast-dLLM Dream block + cache: block-start full forwards among `forwards`
        rec.update(full_forwards=int(res.n_full[i]))
    if res.n_save is not None:  # SDAR: denoising + cache-saving forwards
        rec.update(denoise_forwards=steps, cache_forwards=int(res.n_save[i]))
    return rec


def _run(job: DecodeJobConfig, decode_cfg, out: OutputFile) -> dict:
    from tqdm import tqdm

    from dlmjax.checkpoint import CheckpointError

    cfg, params = load_checkpoint(job.ckpt, dtype=job.dtype, compute_dtype=job.dtype)
    if cfg.mask_token_id is None:
        raise CheckpointError(f"{job.ckpt}: the checkpoint has no mask_token_id (an autoregressive {cfg.family} "
                              f"model?); the {job.decoder} decoder needs a diffusion LM checkpoint")
    if unrolled_layers(job.layer_loop):
        params = M.unstack_layers(params)
    if api.decoder_name(decode_cfg) != job.decoder:
        raise ValueError(f"--decoder={job.decoder} but the decoder config is a {type(decode_cfg).__name__}")
    if isinstance(decode_cfg, BlockDecodeConfig) and not decode_cfg.stop_ids and cfg.eos_token_id is not None:
        decode_cfg = dataclasses.replace(decode_cfg, stop_ids=(cfg.eos_token_id,))  # default: stop at EOS
    tok = _load_tokenizer(job.ckpt)
    prompts = read_prompts(job.prompts, tok, job.chat_template, cfg.vocab_size, cfg.max_position_embeddings,
                           new_tokens(decode_cfg))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id or 0
    key = jax.random.key(job.seed)
    mesh = _data_mesh(job.batch_size)
    totals = dict(tokens=0, forwards=0, tpf=[], ewc=[], ewc_steps=0.0, steps=0, seconds=0.0)
    with tqdm(total=len(prompts), desc=f"decode[{job.decoder}]", unit="prompt") as bar:
        for b0 in range(0, len(prompts), job.batch_size):
            chunk = prompts[b0:b0 + job.batch_size]
            ids = [c[1] for c in chunk]
            ids += [ids[0]] * (job.batch_size - len(ids))  # static batch: pad with copies, dropped below
            width = -(-max(map(len, ids)) // job.length_bucket) * job.length_bucket
            t0 = time.perf_counter()
            arr, _ = _pack(ids, width, pad, left=True)
            res = api.generate(decode_cfg, cfg, params, arr, np.array([len(i) for i in ids], np.int32),
                               jax.random.fold_in(key, b0), mesh=mesh)
            res = jax.device_get(res)
            dt = time.perf_counter() - t0
            lines = []
            for i, (text, pid) in enumerate(chunk):
                rec = _record(res, i, b0 + i, text, pid, tok)
                lines.append(json.dumps(rec) + "\n")
                totals["tokens"] += len(rec["ids"])
                totals["forwards"] += rec["forwards"]
                totals["tpf"].append(rec["tpf"])
                totals["ewc"].append(rec["ewc_kept_sum"])
                totals["ewc_steps"] += float(np.sum(rec["ewc_per_step"]))
                totals["steps"] += len(rec["ewc_per_step"])
            out.write("".join(lines))
            totals["seconds"] += dt
            bar.update(len(chunk))
            bar.set_postfix(tpf=f"{np.mean(totals['tpf']):.2f}", tok_s=f"{totals['tokens'] / totals['seconds']:.1f}")
    out.commit()
    mean_kept = float(np.mean(totals["ewc"]))
    return {"prompts": len(prompts), "mean_tpf": float(np.mean(totals["tpf"])),
            # pooled over every (prompt, denoising step) pair, as SLIM-RL's ewc_mean
            "ewc_per_step": totals["ewc_steps"] / max(totals["steps"], 1),
            "mean_ewc_kept_sum": mean_kept, "mean_expected_wrong_commits": mean_kept,
            "tokens_per_s": totals["tokens"] / totals["seconds"],
            "forwards_per_s": totals["forwards"] / totals["seconds"], "seconds": totals["seconds"],
            "out": job.out}

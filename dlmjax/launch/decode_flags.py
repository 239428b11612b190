"""The decode job family's flags (`--job=decode`; the eval job reads the same decoder settings through
`decode_configs(check_io=False)`) and their mapping into `DecodeJobConfig` + the decoder's frozen config."""

from __future__ import annotations

from absl import app, flags

from dlmjax.launch.common_flags import F, reject, require

# decode: I/O (ckpt and dtype: eval too)
flags.DEFINE_string("ckpt", None, "decode / eval: dlmjax checkpoint directory (python -m convert import ...).")
flags.DEFINE_string("prompts", None, "decode: JSONL, one {\"prompt\": text} or {\"prompt_ids\": [...]} per line.")
flags.DEFINE_enum("decoder", "sdar", ("sdar", "llada", "dream"), "decode: sdar = block decoding with KV cache "
                  "(SDAR/TraDo); llada = LLaDA canvas with semi-autoregressive blocks; dream = Dream's "
                  "diffusion_generate (shifted logits).")
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "decode / eval: params and compute dtype.")
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
# every decoder setting (eval reads these too); decode_configs rejects the ones the chosen decoder does not use
DECODER_FLAGS = ("decoder", "max_new_tokens", "block_size", "steps", "rule", "tau", "budget_m", "temperature",
                 "conf_dtype", "forbid_mask_token", "top_k", "top_p", "layer_loop") + _SDAR_ONLY + _LLADA_ONLY + \
    _DREAM_ONLY
DECODE_FLAGS = ("ckpt", "prompts", "out", "batch_size", "seed", "chat_template", "dtype") + DECODER_FLAGS


def decode_configs(check_io: bool = True):
    """(DecodeJobConfig or None, decoder config) from flags, with cross-field checks."""
    from dlmjax.decode.api import decoder_config
    from dlmjax.decode.job import DecodeJobConfig

    if check_io:
        require(("ckpt", "prompts", "out"), "decode")
    d = F.decoder
    others = {n for k, v in _ONLY.items() if k != d for n in v} - set(_ONLY[d])
    reject(sorted(others), f"is not used by --decoder={d}")
    if d == "dream" and F.dream_cache == "none":
        reject(("block_size",), "is not used by --decoder=dream")
    if d == "dream" and F.dream_cache != "none":
        reject(("rule", "budget_m"), f"is not used by --dream_cache={F.dream_cache} (its step rule is "
                                      "--dream_alg: confidence_threshold | entropy)")
    block = F.block_size or (4 if d == "sdar" else 32)
    try:
        if d == "sdar":
            try:
                stop = tuple(int(t) for t in F.stop_ids) if F.stop_ids else ()
            except ValueError:
                raise app.UsageError(f"--stop_ids must be integers, got {F.stop_ids}") from None
            dc = decoder_config("sdar", block_size=block, steps=F.steps or block,
                                max_new_tokens=F.max_new_tokens, rule=F.rule or "dynamic", tau=F.tau,
                                budget_m=F.budget_m,
                                temperature=1.0 if F.temperature is None else F.temperature,
                                top_k=F.top_k, top_p=F.top_p, greedy=F.greedy,
                                conf_dtype=F.conf_dtype or "float32", stop_ids=stop,
                                forbid_mask_token=F.forbid_mask_token, nlc_budget=F.nlc_budget,
                                eb_threshold=F.eb_threshold)
        elif d == "dream" and F.dream_cache != "none":
            dc = decoder_config("dream", cache=F.dream_cache, max_new_tokens=F.max_new_tokens,
                                block_length=block, steps=F.steps or F.max_new_tokens, eps=F.eps,
                                rule=F.dream_alg if F["dream_alg"].present else "confidence_threshold",
                                tau=F.tau, alg_temp=F.alg_temp, temperature=F.temperature or 0.0,
                                top_p=F.top_p if F.top_p < 1.0 else None, top_k=F.top_k or None,
                                conf_dtype=F.conf_dtype, forbid_mask_token=F.forbid_mask_token)
        elif d == "dream":
            dc = decoder_config("dream", max_new_tokens=F.max_new_tokens, steps=F.steps or F.max_new_tokens,
                                eps=F.eps, alg=F.dream_alg, alg_temp=F.alg_temp,
                                temperature=F.temperature or 0.0,
                                top_p=F.top_p if F.top_p < 1.0 else None, top_k=F.top_k or None,
                                conf_dtype=F.conf_dtype, rule=F.rule or "schedule", tau=F.tau,
                                budget_m=F.budget_m, forbid_mask_token=F.forbid_mask_token)
        else:
            dc = decoder_config("llada", gen_length=F.max_new_tokens, block_length=block,
                                steps=F.steps or F.max_new_tokens, rule=F.rule or "low_confidence",
                                temperature=F.temperature or 0.0, tau=F.tau, budget_m=F.budget_m,
                                factor=F.factor, conf_dtype=F.conf_dtype or "",
                                logits_eos_inf=F.logits_eos_inf,
                                confidence_eos_eot_inf=F.confidence_eos_eot_inf,
                                forbid_mask_token=F.forbid_mask_token, cache=F.llada_cache,
                                cfg_scale=F.cfg_scale)
        if not check_io:
            return None, dc
        job = DecodeJobConfig(ckpt=F.ckpt, prompts=F.prompts, out=F.out, decoder=d,
                              batch_size=F.batch_size, seed=F.seed, chat_template=F.chat_template,
                              dtype=F.dtype, layer_loop=F.layer_loop)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return job, dc


def run_decode() -> int:
    from dlmjax.decode.job import run

    job, dc = decode_configs()
    run(job, dc)
    return 0

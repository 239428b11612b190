"""The demo (README's first command): build a small dLLM from scratch, SFT it with MDLM on synthetic addition,
checkpoint it, then decode held-out problems with low-confidence, dynamic-threshold and tau-budget rules and print
accuracy, TPF and expected wrong commits side by side (plus a matplotlib plot of accuracy vs TPF, PNG and SVG).

Everything is a function of the seed: the problems, the init, the noise, the decoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from dlmjax.config import ModelConfig
from dlmjax.data import addition
from dlmjax.data.pipeline import SFTDataConfig
from dlmjax.decode.llada import LLaDADecodeConfig
from dlmjax.evaluate import EvalRun, evaluate, format_table, plot_accuracy_vs_tpf
from dlmjax.train.config import ObjectiveConfig, OptimConfig
from dlmjax.train.loop import LoopConfig
from dlmjax.train.sft import SFTRunConfig, build_model, run_sft


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    workdir: str = "runs/demo"
    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    antithetic: bool = True  # md4's stratified times across the batch (lower-variance MDLM gradients)
    max_digits: int = 3
    n_train: int = 20000
    n_test: int = 256
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    gen_length: int = 12  # decoding canvas after the prompt: the worked answer (2d+3 tokens) + EOS padding
    tau: float = 0.9

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.n_test <= 0:
            raise ValueError("demo: steps, batch_size and n_test must be positive")
        if self.gen_length < 2 * self.max_digits + 4:
            raise ValueError(f"demo: gen_length={self.gen_length} cannot hold a {self.max_digits}-digit worked answer "
                             f"(--demo_digits at most {(self.gen_length - 4) // 2})")

    def check_data(self):
        """The demo's splits fit the problem space (a separate check: tests build small-digit configs for their
        model and tokenizer only)."""
        drawable = (10 ** self.max_digits) ** 2 // 2  # addition.make_splits draws at most half the problem space
        if self.n_train + self.n_test > drawable:
            raise ValueError(f"demo: max_digits={self.max_digits} (--demo_digits) allows {drawable} distinct "
                             f"problems, fewer than the {self.n_train} train + {self.n_test} held-out the demo draws; "
                             "use 3 or more digits")
        return self

    @property
    def max_length(self) -> int:
        """Training rows = prompt ([user] a+b [assistant], fixed width) + exactly the decoding canvas, so the model
        sees at training time the same number of EOS-padded slots it gets at decoding time."""
        return 2 * self.max_digits + 3 + self.gen_length


def model_config(dc: DemoConfig, tok) -> ModelConfig:
    v = len(tok)
    return ModelConfig(family="llada", vocab_size=v, hidden_size=dc.hidden, num_layers=dc.layers,
                       num_heads=dc.heads, num_kv_heads=dc.heads, head_dim=dc.hidden // dc.heads,
                       intermediate_size=3 * dc.hidden, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_full_precision=True, attention="bidirectional",
                       mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, max_position_embeddings=256)


def decoders(dc: DemoConfig) -> list[EvalRun]:
    g = dc.gen_length
    common = dict(gen_length=g, block_length=g, steps=g, conf_dtype="float32")
    return [EvalRun("low_confidence", "llada", LLaDADecodeConfig(rule="low_confidence", **common)),
            EvalRun(f"dynamic(tau={dc.tau})", "llada", LLaDADecodeConfig(rule="fast_dllm_threshold", tau=dc.tau,
                                                                         **common)),
            EvalRun(f"tau_budget(tau={dc.tau},m=1)", "llada", LLaDADecodeConfig(rule="tau_budget", tau=dc.tau,
                                                                                budget_m=1.0, **common))]


def run_demo(dc: DemoConfig, log=print) -> dict:
    t0 = time.perf_counter()
    os.makedirs(dc.workdir, exist_ok=True)
    tok = addition.make_tokenizer()
    tok_dir = os.path.join(dc.workdir, "tokenizer")
    tok.save_pretrained(tok_dir)
    train, test = addition.make_splits(dc.n_train, dc.n_test, dc.max_digits, dc.seed)
    train_path, test_path = os.path.join(dc.workdir, "train.jsonl"), os.path.join(dc.workdir, "test.jsonl")
    addition.write_jsonl(train_path, train)
    addition.write_jsonl(test_path, test)
    log(f"demo: {len(train)} training / {len(test)} held-out {dc.max_digits}-digit addition problems in {dc.workdir}")

    cfg = model_config(dc, tok)
    params = build_model(cfg, dc.seed)
    n_params = sum(x.size for x in __import__("jax").tree.leaves(params))
    log(f"demo: model {cfg.num_layers} layers x {cfg.hidden_size} hidden, {n_params / 1e6:.2f}M params (LLaDA-style, "
        f"bidirectional)")
    run = SFTRunConfig(
        loop=LoopConfig(workdir=os.path.join(dc.workdir, "sft"), steps=dc.steps, log_every=max(dc.steps // 10, 1),
                        save_every=dc.steps, keep=1, resume=False),
        data=SFTDataConfig(path=train_path, max_length=dc.max_length, global_batch_size=dc.batch_size, seed=dc.seed),
        objective=ObjectiveConfig(antithetic=dc.antithetic),
        optim=OptimConfig(lr=dc.lr, total_steps=dc.steps, warmup_steps=dc.steps // 20, weight_decay=dc.weight_decay),
        tokenizer_dir=tok_dir)
    summ = run_sft(run, cfg, params, tok, log=log)
    t_train = time.perf_counter() - t0
    rows = evaluate(summ["final"], test_path, decoders(dc), os.path.join(dc.workdir, "eval"), scorer="addition",
                    batch_size=64, seed=dc.seed)
    table = format_table(rows)
    plot = os.path.join(dc.workdir, "accuracy_vs_tpf")
    plot_accuracy_vs_tpf(rows, plot, f"demo: {dc.max_digits}-digit addition, {dc.steps} MDLM steps")
    log("\n" + table)
    log(f"demo: trained in {t_train:.0f} s, total {time.perf_counter() - t0:.0f} s; checkpoint {summ['final']}; "
        f"plot {plot}.png")
    with open(os.path.join(dc.workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "final_loss": summ["history"][-1]["loss"], "train_seconds": t_train}, f, indent=2)
    return {"rows": rows, "summary": summ, "table": table}

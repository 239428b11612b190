"""Bad input through the real CLI (`python -m dlmjax.launch`, a subprocess, as a user runs it): every case exits with
code 2 and one `error: ...` line naming the culprit (file:line, flag, path), no traceback, and leaves nothing at the
destination. Read-only and full disks are small tmpfs mounts (skipped, with the reason, where mounting is refused).
Also: the decode job's EWC per step against a NumPy recount from the step map and confidences, the slots cut after a
stop token and past max_new_tokens included (issue 13).
"""

import contextlib
import json
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

from tests.launcher import launch

SFT_ARGS = ("--job=sft", "--train_steps=6", "--batch_size=8", "--max_length=16", "--log_every=2", "--save_every=2",
            "--notensorboard")


# What orbax's threads may print when a save fails (its asyncio loop closes before tensorstore's last callbacks):
# third-party noise printed from C++ callbacks in other threads, timing-dependent, never from our code path.
# The pieces of tensorstore's `Event loop is closed` reports (asyncio frames only). Two threads may print them
# interleaved, even mid-line, and the exit after the error line may cut one short, so they are removed piece by
# piece, traceback headers included; a genuine traceback still shows its frames ('File "...') and exception line.
_LOOP_PIECES = re.compile(r'File "[^"]*asyncio/base_events\.py", line \d+, in \w+|self\._check_closed\(\)'
                          r"|raise RuntimeError\('Event loop is closed'\)|RuntimeError: Event loop is closed"
                          r"|Traceback \(most recent call last\):")
_EXC_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Interrupt|Exit)\b.*:", re.M)


def _strip_loop_closed(stderr: str) -> str:
    """stderr without the loop-closed reports (see _LOOP_PIECES)."""
    return _LOOP_PIECES.sub("", stderr)


def _one_error(r, *names, orbax_noise=False) -> str:
    """Exit code 2, exactly one `error:` line containing every one of `names`, no traceback; returns the line."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errs = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errs) == 1, r.stderr[-3000:]
    rest = _strip_loop_closed(r.stderr) if orbax_noise else r.stderr
    assert "Traceback" not in rest and 'File "' not in rest, r.stderr[-3000:]
    assert not _EXC_LINE.search("\n".join(x for x in rest.splitlines() if not x.startswith("error:"))), r.stderr[-3000:]
    for n in names:
        assert str(n) in errs[0], (n, errs[0])
    return errs[0]


@contextlib.contextmanager
def _tmpfs(path, ro=False, fill=None):
    """A 64 KiB tmpfs at `path` (read-only with ro; `fill` bytes written first when given, None = empty)."""
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        if fill is not None:  # fill bytes, or until the file system is full
            fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT)
            try:
                for _ in range(0, fill, 4096):
                    os.write(fd, b"x" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _listing(path):
    return sorted(os.listdir(path))


# ---------------------------------------------------------------------------------------------------------- decode
@pytest.fixture(scope="module")
def tok_ckpts(imported, tmp_path_factory):
    """family -> a copy of the tiny imported checkpoint with a real tokenizer (ids 0..93) and chat template."""
    from tests.test_launch_decode import _tokenizer_files

    out = {}
    for fam in ("sdar", "llada", "dream"):
        _, ckpt, _, _ = imported(fam)
        d = tmp_path_factory.mktemp(f"{fam}_tok") / "ckpt"
        shutil.copytree(ckpt, d)
        _tokenizer_files(str(d))
        out[fam] = str(d)
    return out


def _decode(ckpt, prompts, out, *extra):
    return launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={prompts}", f"--out={out}", "--max_new_tokens=8",
                  *extra, timeout=300)


def test_decode_non_utf8_prompts(imported, tmp_path):
    _, ckpt, _, _ = imported("sdar")
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"prompt_ids": [1, 2]}\n{"prompt_ids": [3, 4]} \xff\xfe\n')
    out = tmp_path / "new" / "o.jsonl"
    _one_error(_decode(ckpt, p, out), f"{p}:2:", "UTF-8", "0xff")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("n_prompt,new", [(300, 8), (200, 100)])
def test_decode_prompt_past_max_position_embeddings(imported, tmp_path, n_prompt, new):
    _, ckpt, _, _ = imported("sdar")  # max_position_embeddings 256
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_ids": [5, 6]}\n' + json.dumps({"prompt_ids": [7] * n_prompt}) + "\n")
    out = tmp_path / "o.jsonl"
    r = launch("--job=decode", f"--ckpt={ckpt}", f"--prompts={p}", f"--out={out}", f"--max_new_tokens={new}",
               timeout=300)
    _one_error(r, f"{p}:2:", f"max_new_tokens={new}", "max_position_embeddings (256)")
    assert _listing(tmp_path) == ["p.jsonl"]


@pytest.mark.parametrize("decoder", ["sdar", "llada", "dream"])
def test_decode_zero_token_prompt_refused_by_every_decoder(tok_ckpts, tmp_path, decoder):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "w1 w2"}\n{"prompt": "   "}\n')  # the second tokenizes to no ids at all
    out = tmp_path / "o.jsonl"
    extra = ("--block_size=8",) if decoder == "llada" else ()
    r = _decode(tok_ckpts[decoder], p, out, f"--decoder={decoder}", "--nochat_template", *extra)
    _one_error(r, f"{p}:2:", "0 tokens")
    assert _listing(tmp_path) == ["p.jsonl"]


def test_decode_out_is_a_directory_found_first(imported, tmp_path):
    _, ckpt, _, _ = imported("sdar")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_ids": [1, 2]}\n')
    (tmp_path / "o").mkdir()
    _one_error(_decode(ckpt, p, tmp_path / "o"), f"--out={tmp_path / 'o'}", "is a directory")
    # checked before the checkpoint is even read: a missing checkpoint is not what is reported
    _one_error(_decode(tmp_path / "no_ckpt", p, tmp_path / "o"), "is a directory")
    assert _listing(tmp_path / "o") == []


def test_decode_read_only_and_full_out(imported, tmp_path):
    _, ckpt, _, _ = imported("sdar")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_ids": [1, 2]}\n')
    with _tmpfs(tmp_path / "ro", ro=True) as d:
        _one_error(_decode(ckpt, p, f"{d}/sub/o.jsonl"), f"--out={d}/sub/o.jsonl", "Read-only file system")
        assert _listing(d) == []
    with _tmpfs(tmp_path / "full", fill=1 << 20) as d:  # every page taken: found before the work
        _one_error(_decode(ckpt, p, f"{d}/sub/o.jsonl"), f"--out={d}/sub/o.jsonl", "No space left on device")
        assert _listing(d) == ["filler"]


def test_decode_disk_fills_while_writing(imported, tmp_path):
    """One free page: the writability check passes, the first batch of results does not fit -> the OSError at
    write time is the one-line error, and the partial output and the directory the job created are removed."""
    _, ckpt, _, _ = imported("sdar")
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt_ids": [3 + i, 17, 22, 9, 41]}) + "\n" for i in range(16)))
    with _tmpfs(tmp_path / "full", fill=60 * 1024) as d:
        r = _decode(ckpt, p, f"{d}/sub/o.jsonl", "--batch_size=16")
        _one_error(r, f"{d}/sub/o.jsonl.partial", "No space left on device")
        assert _listing(d) == ["filler"]


def test_decode_autoregressive_checkpoint(imported, tmp_path):
    _, ckpt, _, _ = imported("qwen3")  # an AR model: no mask_token_id
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_ids": [1, 2]}\n')
    r = _decode(ckpt, p, tmp_path / "new" / "o.jsonl", "--decoder=llada", "--block_size=8")
    _one_error(r, ckpt, "no mask_token_id", "llada")
    assert _listing(tmp_path) == ["p.jsonl"]


def test_decode_ewc_per_step_recount(imported, tmp_path):
    """EWC per step (SLIM-RL): every slot committed at a step counts, including the ones cut after the stop token
    and the ones the last block commits past max_new_tokens. Recount: decode the same rows with no stop and a longer
    completion (greedy: the blocks both runs decode are identical), then sum (1 - p) of every slot by its step."""
    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.decode import api
    from dlmjax.decode import job as J
    from dlmjax.decode.sdar import BlockDecodeConfig

    _, ckpt, _, _ = imported("sdar")
    cfg, params = load_checkpoint(ckpt)
    prompts = [[3, 17, 22, 9, 41], [8, 8, 30]]
    g, k = 10, 4  # prompts end at 16 (left-padded to 16): blocks 16..27, slots 26, 27 are past max_new_tokens
    base = dict(block_size=k, steps=k, rule="tau_budget", tau=0.3, greedy=True, forbid_mask_token=True)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id or 0  # as the job pads
    arr, _ = J._pack(prompts, 16, pad, left=True)
    lens = np.array([len(x) for x in prompts], np.int32)
    never = (cfg.mask_token_id,)  # never produced (forbid_mask_token): no stop
    ref = jax.device_get(api.generate(BlockDecodeConfig(max_new_tokens=g + 2 * k, stop_ids=never, **base), cfg,
                                      params, arr, lens, jax.random.key(0)))
    # a stop token the first row produces mid-block, at its first occurrence: the block's later slots are cut
    toks = ref.tokens[0, :g].tolist()
    pick = [j for j in range(g - 1) if toks.index(toks[j]) == j and (16 + j) % k != k - 1
            and toks[j] not in ref.tokens[1, :g + 2 * k].tolist()]
    stop = (toks[pick[0]],) if pick else never
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt_ids": x}) + "\n" for x in prompts))
    out = tmp_path / "o.jsonl"
    J.run(J.DecodeJobConfig(ckpt=ckpt, prompts=str(p), out=str(out), decoder="sdar", batch_size=2,
                            chat_template=False, layer_loop="scan"),
          BlockDecodeConfig(max_new_tokens=g, stop_ids=stop, **base), log=lambda *_: None)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    cut_any = past_any = False
    for i, rec in enumerate(recs):
        steps = len(rec["ewc_per_step"])
        assert steps == rec["denoise_forwards"] and len(rec["commits_per_step"]) == steps
        sm, conf = ref.step_map[i], ref.conf[i]  # every completion slot of the longer, unstopped run
        assert rec["step_map"] == sm[:len(rec["ids"])].tolist()  # the same decoding
        want_ewc, want_n = np.zeros(steps), np.zeros(steps, int)
        for t in range(1, steps + 1):
            sel = sm == t
            want_ewc[t - 1], want_n[t - 1] = np.sum(1.0 - conf[sel], dtype=np.float64), sel.sum()
        np.testing.assert_allclose(rec["ewc_per_step"], want_ewc, rtol=1e-5, atol=1e-6)
        assert rec["commits_per_step"] == want_n.tolist()
        assert rec["ewc_per_step_mean"] == pytest.approx(want_ewc.sum() / steps, rel=1e-5, abs=1e-7)
        kept = np.asarray(rec["step_map"]) > 0
        assert rec["ewc_kept_sum"] == pytest.approx(np.sum(1.0 - conf[:len(rec["ids"])][kept]), abs=1e-5)
        assert rec["expected_wrong_commits"] == rec["ewc_kept_sum"]
        n_counted = int(want_n.sum())
        cut_any |= n_counted > len(rec["ids"]) and len(rec["ids"]) < g
        past_any |= bool(np.any(sm[g:] > 0) and np.any((sm[g:] > 0) & (sm[g:] <= steps)))
    assert past_any  # slots past max_new_tokens were counted
    assert cut_any or not pick  # slots cut after the stop token were counted (when the draw allowed a stop)


# ------------------------------------------------------------------------------------------------------------- sft
@pytest.fixture(scope="module")
def sft_init(tmp_path_factory):
    """(init checkpoint dir, data path) of a tiny LLaDA-style model on the synthetic addition task."""
    from dlmjax.checkpoint import save_checkpoint
    from dlmjax.data import addition
    from dlmjax.demo import DemoConfig, model_config
    from dlmjax.train.sft import build_model

    d = tmp_path_factory.mktemp("sft_init")
    tok = addition.make_tokenizer()
    train, _ = addition.make_splits(96, 8, 2, seed=0)
    addition.write_jsonl(str(d / "train.jsonl"), train)
    cfg = model_config(DemoConfig(hidden=32, layers=2, heads=2, max_digits=2, gen_length=8), tok)
    tok.save_pretrained(str(d / "tok"))
    save_checkpoint(cfg, jax.tree.map(np.asarray, build_model(cfg, 0)), str(d / "init"), tokenizer_dir=str(d / "tok"))
    return str(d / "init"), str(d / "train.jsonl")


def _sft(init, data, workdir, *extra):
    return launch(*SFT_ARGS, f"--init_ckpt={init}", f"--data={data}", f"--workdir={workdir}", *extra, timeout=600)


def test_sft_mesh_larger_than_the_machine(sft_init, tmp_path):
    init, data = sft_init
    _one_error(_sft(init, data, tmp_path / "w", "--mesh_data=3"), "--mesh_data=3", "needs 3 devices, have 1")
    assert not (tmp_path / "w").exists()


def test_sft_read_only_and_full_workdir(sft_init, tmp_path):
    init, data = sft_init
    with _tmpfs(tmp_path / "ro", ro=True) as d:
        _one_error(_sft(init, data, f"{d}/w"), f"--workdir={d}/w", "Read-only file system")
        assert _listing(d) == []
    with _tmpfs(tmp_path / "full", fill=1 << 20) as d:
        _one_error(_sft(init, data, f"{d}/w"), f"--workdir={d}/w", "No space left on device")
        assert _listing(d) == ["filler"]


def test_sft_disk_fills_during_a_save(sft_init, tmp_path):
    """The first checkpoint does not fit: one error line naming the checkpoint directory, and the failed run leaves
    no (empty) workdir behind."""
    init, data = sft_init
    with _tmpfs(tmp_path / "small") as d:
        _one_error(_sft(init, data, f"{d}/w"), f"{d}/w/checkpoints", "No space left on device", orbax_noise=True)
        assert _listing(d) == []


def test_sft_resume_refusals_stale_export_and_quiet_orbax(sft_init, tmp_path):
    init, src = sft_init
    data = tmp_path / "train.jsonl"
    shutil.copy(src, data)
    w = tmp_path / "w"
    (w / ".final.tmp-abc123").mkdir(parents=True)  # what kill -9 during the final export leaves
    (w / ".final.tmp-abc123" / "params.safetensors").write_bytes(b"\0" * 64)
    r = _sft(init, data, w, "--stop_at=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(x.startswith(".final.") for x in os.listdir(w))
    assert "checkpoint_manager.py" not in r.stderr and "orbax" not in r.stderr  # orbax's INFO lines are silenced
    assert _listing(w / "checkpoints") == ["2", "4"]
    # the data file changed under the same path: refused, naming the file
    original = data.read_bytes()
    data.write_bytes(original + original.splitlines(keepends=True)[0])
    _one_error(_sft(init, data, w), str(data), "changed since this checkpoint was written")
    data.write_bytes(original)
    # a damaged latest checkpoint: stop, naming it and the intact step before it
    for root, _, files in os.walk(w / "checkpoints" / "4" / "state"):
        for f in files:
            if os.path.basename(root) == "d":
                os.truncate(os.path.join(root, f), 8)
    _one_error(_sft(init, data, w), f"{w}/checkpoints/4", "damaged", "step 2", orbax_noise=True)
    assert _listing(w / "checkpoints") == ["2", "4"]
    shutil.rmtree(w / "checkpoints" / "4" / "meta")
    _one_error(_sft(init, data, w), f"{w}/checkpoints/4", "damaged", orbax_noise=True)


# ------------------------------------------------------------------------------------------------------------ eval
def test_eval_bad_data_and_read_only_workdir(imported, tmp_path):
    """eval: a missing --data names the flag, non-UTF-8 answers name file:line, a read-only --workdir fails before
    any decoding; nothing is left at the workdir."""
    _, ckpt, _, _ = imported("sdar")
    base = ("--job=eval", f"--ckpt={ckpt}", "--decoder=sdar", "--max_new_tokens=4")
    r = launch(*base, f"--data={tmp_path / 'nope.jsonl'}", f"--workdir={tmp_path / 'w1'}")
    _one_error(r, "--data", "nope.jsonl", "cannot open")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt_ids": [5, 6], "answer": "1"}\n{"prompt_ids": [5, 6], "answer": "\xff"}\n')
    r = launch(*base, f"--data={bad}", f"--workdir={tmp_path / 'w2'}")
    _one_error(r, "bad.jsonl:2", "UTF-8")
    assert not (tmp_path / "w2").exists() or _listing(tmp_path / "w2") == []
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt_ids": [5, 6], "answer": "1"}\n')
    with _tmpfs(tmp_path / "ro", ro=True) as ro:
        r = launch(*base, f"--data={good}", f"--workdir={ro}/w")
        _one_error(r, "--workdir=", "cannot write")

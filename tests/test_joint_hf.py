"""The joint recipe on transformers for every family, in one process and under torchrun, end to end.

- a tiny Llama gives the same losses and gradients through transformers + PEFT as through the hand-written
  `FrozenLlama` + `LoRA` (the same adapters, Q/K rows permuted between the two layouts);
- for each family the converter supports, a tiny random checkpoint folder (tests/test_hf_families.py's
  builder) is trained with `safechat train joint --base FOLDER`, folded with `safechat convert`, passes
  `safechat verify`, and `runtime.load(...).chat(...)` checks inside the answer; the runtime's p_unsafe at
  the prompt is the torch model's with the trained adapters, and the planted signal was learned;
- Qwen2 trains under `torchrun --nproc-per-node 2` (gloo, 2 CPU processes), is SIGKILLed mid-run and
  resumed, and gives the one-process loss curve and artifact (tolerances below) on the same global batch,
  as do one process with --accum 3 and 2 processes with --fsdp (the decoder layers sharded).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import runtime  # noqa: E402
from runtime.artifact import load_artifact  # noqa: E402
from runtime.merge import load_deltas  # noqa: E402
from runtime.strategy import SafetyPolicy  # noqa: E402
from safechat.convert.hf_frozen import FrozenHF  # noqa: E402
from safechat.convert.hf_import import hf_to_gguf  # noqa: E402
from safechat.convert.hf_reference import to_hf  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402
from safechat.train.joint import CHECKPOINT, JointSeq, adapters, joint_loss, layout  # noqa: E402
from safechat.train.joint_measure import score  # noqa: E402
from tests.test_hf_families import _checkpoint  # noqa: E402
from tests.tiny_model import write_toy_prep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    """`safechat ARGV` in this process. Imported when called, not at collection: runtime/cli.py binds sys.stdout as a
    default argument when first imported, so importing it at collection would send other tests' output past capsys."""
    from safechat.cli import main as safechat_main
    return safechat_main(argv)

TRAIN = ["--rank", "4", "--alpha", "8", "--lr", "1e-2", "--cls-lr", "3e-2", "--batch-tokens", "2048",
         "--gen-tokens", "8", "--device", "cpu", "--threads", "1", "--eval", "none", "--log-every", "1"]
PAIRS = [("the rain on the hill", "the rain on the hill qz qz qz"), ("a lamp and a book", "a lamp and a book qz qz qz")]


@pytest.mark.timeout(60)
def test_transformers_path_equals_the_hand_written_llama(tiny_base):
    """Same adapters on both paths: losses equal to 1e-6 relative, every gradient ([CLS] row, head rows, each
    adapter's A and B) to 1e-5 absolute (gradients are O(1))."""
    torch.set_num_threads(1)
    hand, hf = FrozenLlama(tiny_base), FrozenHF(tiny_base)
    la, lb = adapters(hand, "all", 4, 8, seed=0), adapters(hf, "all", 4, 8, seed=0)
    assert sorted(la.names) == sorted(lb.names) and len(la.names) == 14
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in la.names:
            la.b[n].copy_(torch.randn(la.b[n].shape, generator=g) * 0.1)
    lb.load_state(la.state())  # GGUF layout in, transformers' layout inside (Q/K rows un-permuted)
    seqs = [JointSeq(list(range(3 + i, 3 + i + n)), [4, n - 2], i % 2, lm_from=5) for i, n in enumerate((12, 20, 9))]
    batch, class_w = layout(seqs), torch.tensor([1.0, 1.5])
    out = []
    for model, lora in ((hand, la), (hf, lb)):
        cls_row = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(1)))
        head = torch.nn.Parameter(torch.randn(2, 64, generator=torch.Generator().manual_seed(2)) * 0.1)
        loss, lm, cl = joint_loss(model, lora, cls_row, head, batch, 1.0, class_w)
        loss.backward()
        grads = {}
        for n in lora.names:
            a, b = (lora.a[n], lora.b[n]) if hasattr(lora, "a") else lora.pair(n)
            grads[n] = (a.grad, b.grad if model is hf else torch.from_numpy(to_hf(hf.facts, n, b.grad.numpy())))
        out.append((lm, cl, cls_row.grad, head.grad, grads))
    (lm_a, cl_a, c_a, h_a, g_a), (lm_b, cl_b, c_b, h_b, g_b) = out
    assert lm_a == pytest.approx(lm_b, rel=1e-6) and cl_a == pytest.approx(cl_b, rel=1e-6) and lm_a > 1
    torch.testing.assert_close(c_a, c_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_a, h_b, atol=1e-5, rtol=0)
    for n in la.names:
        torch.testing.assert_close(g_a[n][0], g_b[n][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(g_a[n][1], g_b[n][1], atol=1e-5, rtol=0)
    assert max(float(g[1].abs().max()) for g in g_a.values()) > 1e-2  # the gradients compared are not all zero


@pytest.mark.timeout(60)
def test_own_answers_through_transformers_generate_equal_the_hand_written_ones(tiny_base):
    """`joint_data.generate` on a transformers base is transformers' greedy `generate` (left-padded batches), and
    gives the hand-written Llama's tokens, also when the answers are kept inside the first n_vocab rows."""
    from safechat.train.joint_data import generate

    torch.set_num_threads(1)
    hf, hand = FrozenHF(tiny_base), FrozenLlama(tiny_base)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate((3, 9, 5, 14))]
    answers = []
    for n_vocab in (None, 30):
        got = generate(hf, prompts, 12, {2}, batch_size=4, n_vocab=n_vocab)
        assert got == generate(hand, prompts, 12, {2}, batch_size=4, n_vocab=n_vocab)
        assert all(len(g) >= 1 for g in got) and (n_vocab is None or max(max(g) for g in got) < n_vocab)
        answers.append(got)
    assert answers[0] != answers[1]  # the restriction changed some answer


def _folder(tmp: Path, family: str):
    folder, tok, model = _checkpoint(tmp, family)
    prep = write_toy_prep(hf_to_gguf(folder, tmp / "imported.gguf"), tmp / "prep.json.gz")
    return folder, prep


def _convert_verify_chat(folder: Path, art_dir: Path, tmp: Path) -> None:
    """`safechat convert` the folder with the artifact, `safechat verify` it, chat with checks inside the answer."""
    from safechat.convert.verify import PROMPTS_V1, load_prompts

    safe = tmp / "safe.gguf"
    assert main(["convert", "--base", str(folder), "--artifact", str(art_dir), "--out", str(safe), "--quiet"]) == 0
    prompts = load_prompts(PROMPTS_V1)
    (tmp / "prompts.json").write_text(json.dumps(dict(prompts, prompts=prompts["prompts"][:4])))
    assert main(["verify", str(safe), "--threads", "1", "--tokens", "4", "--prompts", str(tmp / "prompts.json")]) == 0
    m = runtime.load(safe, n_ctx=256, threads=1)
    at_prompt = {}
    for benign, harmful in PAIRS:
        for text in (benign, harmful):
            r = m.chat([{"role": "user", "content": text}], max_tokens=8, temperature=0,
                       safety=SafetyPolicy(every=1, threshold=0.9999))
            at_prompt[text] = r.safety.trace[0][1]
        assert r.refused or r.safety.checks >= 3  # a harmful request refused at the prompt, or checked inside
        r = m.chat([{"role": "user", "content": benign}], max_tokens=8, temperature=0,
                   safety=SafetyPolicy(every=1, threshold=0.9999))
        assert not r.refused and r.safety.checks >= 3 and r.usage.completion_tokens >= 2  # inside the answer
    assert all(at_prompt[harmful] > at_prompt[benign] + 0.05 for benign, harmful in PAIRS), at_prompt
    # the file's verdict is the torch model's with the trained adapters (F16 key/value cache in llama.cpp)
    art = load_artifact(art_dir)
    hf = FrozenHF(art_dir / "base.gguf")
    lora = adapters(hf, "all", 4, 8)
    lora.load_state(torch.load(art_dir / CHECKPOINT, weights_only=False)["lora"])
    ids = m.tokenize_messages([{"role": "user", "content": PAIRS[1][1]}])
    p_torch = score(hf, lora, art.cls_embedding, art.head, [JointSeq(ids, [len(ids)], 1)])[0][0]
    assert at_prompt[PAIRS[1][1]] == pytest.approx(p_torch, abs=1e-2)
    m.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen3", "gemma3", "phi3"])
def test_bring_your_own_joint_end_to_end(family, tmp_path):
    folder, prep = _folder(tmp_path, family)
    art = tmp_path / "art"
    assert main(["train", "joint", "--base", str(folder), "--data", str(prep), "--out", str(art),
                 "--steps", "24", *TRAIN]) == 0
    card = load_artifact(art).card
    assert card["recipe"]["engine"] == "FrozenHF" and card["architecture"] == {
        "llama3": "llama", "mistral": "llama"}.get(family, family)
    _convert_verify_chat(folder, art, tmp_path)


def _torchrun_cmd(*args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "safechat", "train", "joint", *args], env


def _torchrun_killed(after: str, *args: str) -> str:
    """Start torchrun, SIGKILL its whole process group once a log line contains `after`; its output so far."""
    import signal
    cmd, env = _torchrun_cmd(*args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if after in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return "".join(seen)


@pytest.mark.timeout(240)
def test_torchrun_two_processes_killed_and_resumed_give_the_one_process_run(tmp_path):
    """2 gloo processes, SIGKILLed mid-run (the whole torchrun process group) and resumed from the last
    checkpoint, against one process on the same global batches. Tolerances: per-step mean losses (the card's
    history, 4 decimals) within 2e-3; the [CLS] row and head rows within 1e-5; every merged LoRA delta within
    2e-5 (its entries are ~1e-2). Float sums in another order are the only difference."""
    folder, prep = _folder(tmp_path, "qwen2")
    steps = 24
    common = ["--base", str(folder), "--data", str(prep), "--steps", str(steps), "--ckpt-every", "2",
              "--gen-batch", "16", *TRAIN]  # 4+ generation batches: each rank generates its own
    one, accum, two = tmp_path / "one", tmp_path / "accum", tmp_path / "two"
    assert main(["train", "joint", "--out", str(one), *common]) == 0
    assert main(["train", "joint", "--out", str(accum), "--accum", "3", *common]) == 0
    log = _torchrun_killed(f"step 4/{steps}", "--out", str(two), *common)
    assert "2 processes" in log and not (two / "card.json").exists(), log[-3000:]  # killed before the end
    killed_at = torch.load(two / CHECKPOINT, weights_only=False)["step"]
    assert 4 <= killed_at < steps
    cmd, env = _torchrun_cmd("--out", str(two), "--resume", *common)
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {two / CHECKPOINT} at step {killed_at}/{steps}" in resumed.stdout
    sharded = tmp_path / "fsdp"  # FSDP2: the decoder layers (and their adapters) sharded over the 2 processes
    cmd, env = _torchrun_cmd("--out", str(sharded), "--fsdp", *common)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0 and load_artifact(sharded).card["recipe"]["fsdp"] is True, r.stderr[-3000:]
    from safechat.train.joint_data import load_sequences
    seqs = [load_sequences(d / "sequences.json.gz") for d in (one, two)]  # the own answers, generated in shares
    assert [(s.tokens, s.cls_at) for s in seqs[0]] == [(s.tokens, s.cls_at) for s in seqs[1]]
    want = load_artifact(one)
    for other in (accum, two, sharded):
        got = load_artifact(other)
        h1, h2 = want.card["training"]["history"], got.card["training"]["history"]
        assert [h["step"] for h in h2] == [h["step"] for h in h1] == list(range(1, steps + 1))
        for a, b in zip(h1, h2):
            assert abs(a["lm"] - b["lm"]) <= 2e-3 and abs(a["cls"] - b["cls"]) <= 2e-3, (a, b)
        np.testing.assert_allclose(got.cls_embedding, want.cls_embedding, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.head, want.head, atol=1e-5, rtol=0)
        d1, d2 = load_deltas(one), load_deltas(other)
        assert d1.names == d2.names and len(d1.names) == 14
        for n in d1.names:
            np.testing.assert_allclose(d2.delta(n), d1.delta(n), atol=2e-5, rtol=0)
    assert want.card["recipe"]["processes"] == 1 and load_artifact(two).card["recipe"]["processes"] == 2
    assert h1[-1]["cls"] < h1[0]["cls"]
    _convert_verify_chat(folder, two, tmp_path)


@pytest.mark.timeout(150)
def test_gpu_joint_script_runs_torchrun_end_to_end_on_two_cpu_processes(tiny_base, tmp_path):
    """safechat/train/gpu_joint.sh, the documented multi-GPU command, in its CPU dry run (DEVICE=cpu NPROC=2):
    torchrun, the artifact with its deltas, measured by the torch model, and the report."""
    prep = write_toy_prep(tiny_base, tmp_path / "prep.json.gz")
    out = tmp_path / "gpu-out"
    env = {**os.environ, "DEVICE": "cpu", "NPROC": "2", "PY": sys.executable, "BASE": str(tiny_base),
           "PREP": str(prep), "OUT": str(out), "WORK": str(tmp_path / "work"), "STEPS": "6", "BATCH_TOKENS": "2048",
           "TIMEOUT": "120"}
    r = subprocess.run(["bash", str(ROOT / "safechat/train/gpu_joint.sh")], env=env, capture_output=True, text=True,
                       timeout=140)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "gpu_joint: 2 process(es) on cpu" in r.stdout and "2 processes" in (out / "train.log").read_text()
    card = load_artifact(tmp_path / "work").card
    assert card["recipe"]["processes"] == 2 and card["training"]["finished"] and card["deltas"]["tensors"] == 14
    assert "torch" in card["metrics"]["measured_on"] and "| all |" in (out / "report.md").read_text()


@pytest.mark.timeout(120)
def test_the_documented_qwen_commands_at_tiny_scale(tmp_path):
    """docs/byom.md's one-machine commands on a tiny Qwen2 folder: `safechat train joint-prep --base FOLDER` (the
    packaged data, tokenized on the folder's import), then `safechat train joint --base FOLDER --data PREP` (a few
    prompts, a few steps): the same import twice (the prepared data name the GGUF the run trains on)."""
    from runtime.fetch import sha256_file

    folder, _, _ = _checkpoint(tmp_path, "qwen2")
    prep, art = tmp_path / "prep.json.gz", tmp_path / "art"
    assert main(["train", "joint-prep", "--base", str(folder), "--out", str(prep)]) == 0
    assert main(["train", "joint", "--base", str(folder), "--data", str(prep), "--out", str(art), "--steps", "4",
                 "--max-train", "16", *TRAIN]) == 0
    card = load_artifact(art).card
    assert card["base_model_sha256"] == sha256_file(art / "base.gguf") and card["architecture"] == "qwen2"
    assert card["train_sequences"] >= 16 and card["training"]["finished"] and card["data"]["examples_sha256"]
    assert load_deltas(art).names and len(load_deltas(art).names) == 14

"""The joint recipe's cached lower layers, per-position labels and two-turn data (safechat/train/joint_cache.py)."""
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.prompt import CHATML  # noqa: E402
from safechat.train.joint import (CHECKPOINT, JointSeq, expanded_len, hidden, hidden_upper, joint_loss, layout,  # noqa: E402
                         train_joint)
from safechat.train.joint_cache import LowerStates, compute_lower, lower_states  # noqa: E402
from safechat.train.joint_data import _inside, _second_turn, _two_turn, load_sequences, save_sequences  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402
from safechat.train.lora import LoRA  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_base):
    torch.set_num_threads(1)
    return FrozenLlama(tiny_base)


def _seqs(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        toks = [rng.randrange(3, 120) for _ in range(rng.randint(5, 16))]
        if i % 2:
            toks[1:1] = [150, 150]
        resp = [rng.randrange(3, 120) for _ in range(rng.randint(2, 7))]
        cls_at = [len(toks)] + list(range(len(toks) + 2, len(toks) + len(resp) + 1, 2))
        labels = [0] + [i % 2] * (len(cls_at) - 1) if i % 3 == 0 else None  # some per-position labels
        out.append(JointSeq(toks + resp, cls_at, i % 2, lm_from=len(toks) if i % 2 == 0 else None,
                            cls_labels=labels))
    return out


def _upper_lora(model, first, seed=0):
    lora = LoRA(model, "all", rank=4, alpha=8, seed=seed, first_layer=first)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return lora


def test_lora_first_layer_touches_only_upper_layers(model):
    n = model.cfg.n_layer
    lora = LoRA(model, "attn_q", rank=2, first_layer=n - 1)
    assert lora.names == [f"blk.{n - 1}.attn_q.weight"]
    with pytest.raises(ValueError, match="first LoRA layer"):
        LoRA(model, "all", first_layer=n)


@pytest.mark.parametrize("first", [1])  # the tiny model has 2 layers
def test_cached_lower_layers_give_the_full_pass_loss_and_gradients(model, first):
    seqs = _seqs()
    cls_row = torch.randn(model.cfg.n_embd)
    head = torch.randn(2, model.cfg.n_embd, requires_grad=True)
    lora = _upper_lora(model, first)
    lower = compute_lower(model, seqs, first, cls_row.numpy(), batch_tokens=128, progress=False)
    idx = [0, 3, 4, 7, 11]
    batch = layout([seqs[i] for i in idx])
    w = torch.tensor([1.0, 1.5])
    full, lm_f, cl_f = joint_loss(model, lora, cls_row, head, batch, 1.0, w)
    g_full = torch.autograd.grad(full, lora.parameters() + [head])
    h = hidden_upper(model, lora, lower.batch(idx, batch.ids.shape[1]), batch, first)
    split, lm_s, cl_s = joint_loss(model, lora, cls_row, head, batch, 1.0, w, h=h)
    g_split = torch.autograd.grad(split, lora.parameters() + [head])
    assert abs(lm_f - lm_s) < 1e-5 and abs(cl_f - cl_s) < 1e-5 and cl_f > 0
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # and the hidden states of every valid row equal the full pass's
    hf = hidden(model, lora, cls_row, batch)
    lens = torch.tensor([expanded_len(seqs[i]) for i in idx])
    valid = torch.arange(batch.ids.shape[1])[None] < lens[:, None]   # not the padding rows
    torch.testing.assert_close(h[valid], hf[valid], atol=1e-5, rtol=1e-4)


def test_lower_states_are_saved_and_refused_for_other_inputs(model, tmp_path):
    seqs = _seqs(8)
    row = np.random.default_rng(0).standard_normal(model.cfg.n_embd).astype(np.float32)
    a = lower_states(model, seqs, 1, row, tmp_path, batch_tokens=64, log=lambda *_: None)
    b = LowerStates.load(tmp_path, a.key)
    assert b is not None and np.array_equal(np.asarray(b.states), a.states)
    assert LowerStates.load(tmp_path, "another-key") is None
    other = lower_states(model, seqs, 1, row + 1.0, tmp_path, batch_tokens=64, log=lambda *_: None)
    assert other.key != a.key and not np.allclose(other.states, a.states)   # recomputed, not reused


def test_upper_layer_training_keeps_the_cls_row_learns_and_extends_on_resume(model, tmp_path):
    seqs = _seqs(32)
    rng = np.random.default_rng(1)
    init = (rng.standard_normal(model.cfg.n_embd).astype(np.float32) * 0.1, np.zeros((2, model.cfg.n_embd), np.float32))
    lower = compute_lower(model, seqs, 1, init[0], batch_tokens=256, progress=False)
    kw = dict(rank=4, alpha=8, lr=1e-2, cls_lr=3e-2, batch_tokens=256, ckpt_every=4, log_every=4,
              log=lambda *_: None, init=init, first_layer=1, lower=lower, lm_sample=0.5, bf16=True)
    with pytest.raises(ValueError, match="first_layer"):
        train_joint(model, seqs, tmp_path / "x", steps=2, **{**kw, "lower": None})
    short = train_joint(model, seqs, tmp_path / "a", steps=8, **kw)
    assert short.info["finished"] and (tmp_path / "a" / CHECKPOINT).is_file()
    np.testing.assert_array_equal(short.cls_row, init[0])               # the [CLS] row is not trained
    assert all(n.startswith("blk.1.") for n in short.lora.names)
    longer = train_joint(model, seqs, tmp_path / "a", steps=24, resume=True, **kw)   # extend 8 -> 24
    assert longer.info["steps_done"] == 24 and longer.info["finished"]
    hist = longer.info["history"]
    assert hist[-1]["cls"] < hist[0]["cls"]
    with pytest.raises(ValueError, match="different run"):
        train_joint(model, seqs, tmp_path / "a", steps=24, resume=True, **{**kw, "lm_sample": 1.0})
    with pytest.raises(ValueError, match="different run"):
        train_joint(model, seqs, tmp_path / "a", steps=4, resume=True, **kw)  # fewer steps than done


def test_per_position_labels_layout_and_round_trip(tmp_path):
    s = JointSeq([5, 6, 7, 8, 9], [4, 2, 5], 1, cls_labels=[1, 0, 1])   # given out of order
    assert s.cls_at == [2, 4, 5] and s.labels() == [0, 1, 1]
    b = layout([s])
    assert b.cls_label[0][b.is_cls[0]].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="labels"):
        JointSeq([1, 2, 3], [1, 2], 1, cls_labels=[1])
    plain = JointSeq([1, 2, 3], [3], 0, lm_from=1)
    save_sequences([s, plain], tmp_path / "s.json.gz")
    back = load_sequences(tmp_path / "s.json.gz")
    assert back[0].labels() == [0, 1, 1] and back[1].cls_labels is None and back[1].lm_from == 1


def test_inside_every_k_and_the_old_points():
    assert _inside(10, list(range(13)), {99}, every=4) == [14, 18, 22, 23]
    assert _inside(10, list(range(12)) + [99], {99}, every=4) == [14, 18, 22]   # eog not counted
    assert _inside(0, list(range(30)), set()) == [8, 24, 30]


def test_second_turn_tokens_and_two_turn_sequences():
    def tok(text, special):  # one id per character, special text shifted so the two can be told apart
        return [ord(c) + (1000 if special else 0) for c in text]
    t2 = _second_turn(CHATML, "how do I x", tok)
    text = "".join(chr(t - 1000) if t >= 1000 else chr(t) for t in t2)
    assert text == "<|im_end|>\n<|im_start|>user\nhow do I x<|im_end|>\n<|im_start|>assistant\n"
    assert all(t < 1000 for t in tok("how do I x", False)) and t2[0] >= 1000
    prep = {"refusal": [7, 8], "turn2": [{"id": "h", "label": 1, "tokens": [50, 51, 52]},
                                         {"id": "b", "label": 0, "tokens": [60, 61]}]}
    firsts = [([1, 2, 3], [20, 21, 22, 23, 24, 2])]          # own answer ends with eog 2
    harm, ben = _two_turn(prep, firsts, {2}, 2, 0)
    assert harm.tokens == [1, 2, 3, 20, 21, 22, 23, 24, 50, 51, 52, 7, 8]
    assert harm.cls_at == [3, 5, 7, 8, 11] and harm.labels() == [0, 0, 0, 0, 1]
    assert harm.lm_from == 11                                   # LM loss on the refusal only
    assert ben.tokens[-2:] == [60, 61] and ben.labels()[-1] == 0 and ben.lm_from is None


def test_joint_speed_bench_prints_one_row_per_variant(tiny_base, tmp_path, capsys):
    from safechat.bench.joint_speed import main
    from tests.tiny_model import random_artifact
    seqs = _seqs(16)
    save_sequences(seqs, tmp_path / "s.json.gz")
    random_artifact().save(tmp_path / "art")
    assert main(["--sequences", str(tmp_path / "s.json.gz"), "--base", str(tiny_base), "--init-from",
                 str(tmp_path / "art"), "--variant", "0:1", "--variant", "1:0.5:bf16", "--steps", "3",
                 "--batch-tokens", "64", "--rank", "2", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and rows[1].split("|")[2].strip() == "50%" and rows[1].split("|")[3].strip() == "bf16"
    assert all(float(r.split("|")[4]) > 0 for r in rows)

"""The joint recipe on a tiny model: strategic attention in training, resume, merge, and the runtime path."""
import json
import random

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.artifact import load_artifact  # noqa: E402
from runtime.fold import ConvertError, convert_gguf  # noqa: E402
from runtime.merge import load_deltas, merge_gguf, save_deltas  # noqa: E402
from safechat.train.joint import CHECKPOINT, JointSeq, hidden, layout, train_joint  # noqa: E402
from safechat.train.joint_measure import score  # noqa: E402
from safechat.train.joint_data import generate, prepare, save_prep  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402
from safechat.train.lora import LoRA  # noqa: E402

WORDS = ["the", "a", "sun", "rain", "tree", "hill", "road", "lamp", "book", "door"]


@pytest.fixture(scope="module")
def model(tiny_base):
    torch.set_num_threads(1)
    return FrozenLlama(tiny_base)


def _random_lora(model, seed=0):
    lora = LoRA(model, "all", rank=4, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.b.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return lora


def test_layout_positions_skip_cls_and_mask_hides_it():
    b = layout([JointSeq([5, 6, 7, 8], [2, 4], 1, lm_from=3)])
    assert b.is_cls[0].tolist() == [False, False, True, False, False, True]
    assert b.pos[0].tolist() == [0, 1, 2, 2, 3, 4]            # [CLS] after position 1 takes 2, so does token 7
    # rows/columns: 5, 6, [CLS], 7, 8, [CLS]: causal, and a [CLS] column is visible to its own row only
    assert b.mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                           [1, 1, 0, 0, 0, 0],
                                           [1, 1, 1, 0, 0, 0],
                                           [1, 1, 0, 1, 0, 0],
                                           [1, 1, 0, 1, 1, 0],
                                           [1, 1, 0, 1, 1, 1]]
    assert b.lm_target[0].tolist() == [-100, -100, -100, 8, -100, -100]  # token 7 predicts 8 (lm_from=3)
    assert b.cls_label[0].tolist() == [-100, -100, 1, -100, -100, 1]


def test_inserted_cls_leave_real_tokens_unchanged_and_equal_a_side_cls(model):
    lora = _random_lora(model)
    toks = list(range(10, 40))
    cls_row = torch.randn(model.cfg.n_embd)
    with_cls = layout([JointSeq(toks, [3, 10, 30], 1)])
    h_with = hidden(model, lora, cls_row, with_cls)[0]
    h_plain = hidden(model, lora, cls_row, layout([JointSeq(toks, [], 0)]))[0]
    real = ~with_cls.is_cls[0]
    torch.testing.assert_close(h_with[real], h_plain, atol=1e-5, rtol=1e-5)
    # another [CLS] row changes every [CLS] output and no real token's
    h_other = hidden(model, lora, torch.randn(model.cfg.n_embd), with_cls)[0]
    torch.testing.assert_close(h_other[real], h_plain, atol=1e-5, rtol=1e-5)
    assert (h_other[~real] - h_with[~real]).abs().max() > 1e-2
    # each [CLS] == a [CLS] appended alone after its prefix (what the runtime decodes), plain causal pass
    for q, p in zip(h_with[~real], [3, 10, 30]):
        x = torch.cat([model.embed(torch.tensor([toks[:p]])), cls_row.view(1, 1, -1)], 1)
        alone, _ = model.forward(x, torch.arange(p + 1)[None], None, lin=lora.linear)
        torch.testing.assert_close(q, alone[0, -1], atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_prompt_at_a_time(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (3, 11, 7, 20)]
    together = generate(model, prompts, 12, {2}, batch_size=4)
    alone = [generate(model, [p], 12, {2})[0] for p in prompts]
    assert together == alone and all(len(g) >= 1 for g in together)


def test_cached_generation_equals_recomputing_every_step(model):
    """The preallocated key/value cache gives the tokens a full causal pass over the sequence so far gives."""
    rng = random.Random(1)
    prompt = [rng.randrange(3, 200) for _ in range(9)]
    cached = generate(model, [prompt], 10, {2})[0]
    seq, plain = list(prompt), []
    for _ in range(10):
        h, _ = model.forward(model.embed(torch.tensor([seq])), torch.arange(len(seq))[None], None)
        t = int((h[0, -1] @ model.output_matrix().T).argmax())
        plain.append(t)
        seq.append(t)
        if t == 2:
            break
    assert cached == plain


def _planted(n=48, seed=0):
    """Label 1 = the sequence contains token 150 three times; LM loss on a short 'response'."""
    rng = random.Random(seed)
    seqs = []
    for i in range(n):
        toks = [rng.randrange(3, 120) for _ in range(rng.randint(6, 14))]
        if i % 2:
            toks[2:2] = [150, 150, 150]
        resp = [rng.randrange(3, 120) for _ in range(6)]
        seqs.append(JointSeq(toks + resp, [len(toks), len(toks) + 3], i % 2, lm_from=len(toks)))
    return seqs


def test_joint_learns_and_resumes_exactly(model, tmp_path):
    seqs = _planted()
    kw = dict(steps=32, rank=4, alpha=8, lr=1e-2, cls_lr=3e-2, batch_tokens=256, ckpt_every=8, log_every=8,
              log=lambda *_: None)
    straight = train_joint(model, seqs, tmp_path / "a", **kw)
    first = train_joint(model, seqs, tmp_path / "b", max_seconds=0.0, **kw)   # stops (checkpointed) after 1 step
    assert not first.info["finished"] and (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = train_joint(model, seqs, tmp_path / "b", resume=True, **kw)
    assert resumed.info["finished"] and resumed.info["steps_done"] == 32
    np.testing.assert_allclose(resumed.cls_row, straight.cls_row, atol=1e-6)
    np.testing.assert_allclose(resumed.head, straight.head, atol=1e-6)
    for n in straight.lora.names:
        torch.testing.assert_close(resumed.lora.b[n], straight.lora.b[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="different run"):
        train_joint(model, seqs, tmp_path / "b", resume=True, **{**kw, "rank": 2})
    hist = straight.info["history"]
    assert hist[-1]["cls"] < hist[0]["cls"] and hist[-1]["lm"] < hist[0]["lm"]
    p = score(model, straight.lora, straight.cls_row, straight.head, _planted(16, seed=1))
    labels = [s for s in range(16) for _ in range(2)]
    flat = [v for ps in p for v in ps]
    assert all((v > 0.5) == (lab % 2 == 1) for v, lab in zip(flat, labels))


def _reader_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_merge_adds_deltas_and_copies_the_rest(tiny_base, tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((128, 4)).astype(np.float32) * 0.1
    full = rng.standard_normal((64, 64)).astype(np.float32) * 0.01
    save_deltas(tmp_path, factors={"blk.0.ffn_up.weight": (a, b)}, full={"blk.1.attn_q.weight": full})
    d = load_deltas(tmp_path)
    assert d.names == ["blk.0.ffn_up.weight", "blk.1.attn_q.weight"] and load_deltas(tmp_path / "none") is None
    base = _reader_tensors(tiny_base)
    for mode, qtype in (("float", "F32"), ("f16", "F16")):
        out = merge_gguf(tiny_base, d, tmp_path / f"{mode}.gguf", mode=mode)
        merged = _reader_tensors(out)
        for name, t in merged.items():
            if name in d.names:
                assert t.tensor_type.name == qtype
                want = np.asarray(base[name].data) + d.delta(name)
                np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), want, atol=2e-3)
            else:
                assert t.tensor_type == base[name].tensor_type
                assert np.asarray(t.data).tobytes() == np.asarray(base[name].data).tobytes()
    np.testing.assert_allclose(d.delta("blk.0.ffn_up.weight"), b @ a, rtol=1e-6)
    save_deltas(tmp_path / "bad", full={"blk.0.ffn_up.weight": np.zeros((64, 128), np.float32)})
    with pytest.raises(ConvertError, match="shape"):
        merge_gguf(tiny_base, load_deltas(tmp_path / "bad"), tmp_path / "x.gguf")
    save_deltas(tmp_path / "unknown", full={"blk.9.ffn_up.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(ConvertError, match="does not have"):
        merge_gguf(tiny_base, load_deltas(tmp_path / "unknown"), tmp_path / "x.gguf")


def test_merge_keep_requantizes_in_the_tensors_own_type(tmp_path):
    from runtime.gguf_io import copied_fields, write_gguf
    from tests.tiny_model import write_tiny_base
    src = gguf.GGUFReader(str(write_tiny_base(tmp_path / "f32.gguf")))
    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors = [(t.name, gguf.quants.quantize(np.asarray(t.data), q8), q8) if t.name.endswith("ffn_up.weight")
               else (t.name, t.data, t.tensor_type) for t in src.tensors]
    write_gguf(tmp_path / "q8.gguf", "llama", copied_fields(src), tensors)
    delta = np.full((128, 64), 0.05, np.float32)
    save_deltas(tmp_path, full={"blk.0.ffn_up.weight": delta})
    out = merge_gguf(tmp_path / "q8.gguf", load_deltas(tmp_path), tmp_path / "keep.gguf", mode="keep")
    t = _reader_tensors(out)["blk.0.ffn_up.weight"]
    before = gguf.quants.dequantize(_reader_tensors(tmp_path / "q8.gguf")["blk.0.ffn_up.weight"].data, q8)
    assert t.tensor_type == q8
    np.testing.assert_allclose(gguf.quants.dequantize(t.data, q8), before + delta, atol=0.01)


def test_converter_fails_closed_without_the_declared_deltas(tiny_base, tmp_path):
    from tests.tiny_model import random_artifact
    art = random_artifact()
    save_deltas(tmp_path, full={"blk.0.attn_v.weight": np.ones((32, 64), np.float32)})
    art.card["deltas"] = {"file": "deltas.safetensors", "sha256": load_deltas(tmp_path).sha256, "tensors": 1}
    with pytest.raises(ConvertError, match="must be merged"):
        convert_gguf(tiny_base, art, tmp_path / "x.gguf", progress=False)
    art.card["deltas"]["sha256"] = "0" * 64
    with pytest.raises(ConvertError, match="do not belong"):
        convert_gguf(tiny_base, art, tmp_path / "x.gguf", progress=False, deltas=load_deltas(tmp_path))
    assert not (tmp_path / "x.gguf").exists()


def _toy_examples(n=96):
    rng = random.Random(0)
    out = []
    for i in range(n):
        label = i % 2
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + (" qz qz qz" if label else "")
        split = "train" if i < 64 else ("val" if i < 80 else "test")
        out.append({"id": f"t{i}", "prompt": text, "label": label, "split": split, "augmentation": "none",
                    "source": "toy", "family": f"toy{i % 4}",
                    "prefill": "Sure, here is" if i % 6 == 0 else None,
                    "response": None if label else "the sun and the rain " * 4})
    return out


def test_joint_command_end_to_end_through_llama_cpp(tiny_base, model, tmp_path):
    """joint CLI -> artifact (+ deltas) -> safe GGUF -> runtime: llama.cpp == torch with merged weights."""
    import llama_cpp as ll

    import runtime
    from runtime.backends.llama import LlamaModelFile
    from safechat.train.data_card import data_card
    from safechat.train.joint_run import main

    mf = LlamaModelFile(tiny_base)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    prep = prepare(_toy_examples(), mf, mf.chat_template, None, eog, mf.n_vocab)
    prep["data"] = data_card(_toy_examples())  # as `train joint` records the data set it built
    prep["suffixes"] = True  # as `train joint --suffixes` marks it: the card's recipe must say so (dataset_for)
    save_prep(prep, tmp_path / "prep.json.gz")
    out = tmp_path / "art"
    rc = main(["joint", "--out", str(out), "--base", str(tiny_base), "--data", str(tmp_path / "prep.json.gz"),
               "--steps", "30", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--cls-lr", "3e-2",
               "--batch-tokens", "2048", "--gen-tokens", "16", "--device", "cpu", "--threads", "1",
               "--eval", "torch", "--max-fpr", "0.1"])
    assert rc == 0
    assert (out / "DATA_CARD.md").read_text().startswith("# Data card (96 examples")  # what it was trained on
    torch_scores = json.loads((out / "scores.json").read_text())
    # re-measure on the converted file with llama.cpp (what a GPU run without llama.cpp is followed by)
    assert main(["joint-eval", str(out), "--data", str(tmp_path / "prep.json.gz"), "--base", str(tiny_base),
                 "--threads", "1"]) == 0
    llama_scores = json.loads((out / "scores.json").read_text())
    dp = [abs(a - b) for s in ("val", "test") for k in torch_scores[s]
          for a, b in zip(torch_scores[s][k], llama_scores[s][k])]
    assert len(dp) > 40 and max(dp) < 2e-3
    art = load_artifact(out)
    deltas = load_deltas(out)
    assert art.card["recipe"]["recipe"] == "joint" and art.card["deltas"]["sha256"] == deltas.sha256
    assert art.card["recipe"]["suffixes"] is True
    assert "llama.cpp" in art.card["metrics"]["measured_on"]
    assert len(deltas.names) == 2 * 7 and art.card["metrics"]["test"]["all"]["auroc"] > 0.9
    safe = tmp_path / "safe.gguf"
    convert_gguf(tiny_base, art, safe, progress=False)  # the loaded artifact brings its own deltas

    # torch reference: the base model + the trained adapters, exactly as trained
    lora = LoRA(model, "all", rank=4, alpha=8)
    lora.load_state(torch.load(out / CHECKPOINT, weights_only=False)["lora"])
    msgs = [{"role": "user", "content": "the rain on the hill qz qz qz"}]
    m = runtime.load(safe, threads=1)
    toks = m.tokenize_messages(msgs)
    p_torch = score(model, lora, art.cls_embedding, art.head, [JointSeq(toks, [len(toks)], 1)])[0][0]
    r = m.chat(msgs, max_tokens=1)
    p_llama = r.safety.trace[0][1]
    assert p_llama == pytest.approx(p_torch, abs=1e-3)
    m.close()

    # next-token logits: llama.cpp on the merged file == torch on the merged file's weights
    from runtime.backends.base import Sampling
    from runtime.backends.llama import LlamaBackend
    smf = LlamaModelFile(safe)
    be = LlamaBackend(smf, n_ctx=256, threads=1, safety_ids=smf.safety_meta().token_ids)
    be.start(toks, Sampling(), check=False)
    row = np.ctypeslib.as_array(ll.llama_get_logits_ith(be.ctx, len(toks) - 1), shape=(smf.n_vocab,))
    row = row[:mf.n_vocab].copy()  # a copy: the context's buffer goes with it
    be.close()
    merged = FrozenLlama(safe)
    _, _, logits = merged.prefill(torch.tensor([toks]), return_logits=True)
    np.testing.assert_allclose(logits[0, -1, :mf.n_vocab].numpy(), row, rtol=2e-3, atol=1e-2)
    _, _, base_logits = model.prefill(torch.tensor([toks]), return_logits=True)
    assert np.abs(base_logits[0, -1].numpy() - row).max() > 0.1   # the deltas really are in the file


def test_deltas_on_the_vocabulary_matrices_are_refused(tiny_base, tmp_path):
    from tests.tiny_model import random_artifact
    art = random_artifact()
    t = _reader_tensors(tiny_base)["token_embd.weight"]
    save_deltas(tmp_path, full={"token_embd.weight": np.zeros(tuple(int(x) for x in t.shape[::-1]), np.float32)})
    with pytest.raises(ConvertError, match="vocabulary matrices"):
        convert_gguf(tiny_base, art, tmp_path / "x.gguf", progress=False, deltas=load_deltas(tmp_path))
    assert not (tmp_path / "x.gguf").exists()


def test_comply_sequences_continue_an_opener_and_carry_the_requests_label(tiny_base, model):
    """`--comply N`: N harmful and N benign training prompts with a compliance opener as the prefill; the
    base model's greedy continuation follows it, every [CLS] inside labelled as the request, no LM loss."""
    from runtime.backends.llama import LlamaModelFile
    from safechat.train.joint_data import OPENERS, build_sequences

    mf = LlamaModelFile(tiny_base)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    prep = prepare(_toy_examples(), mf, mf.chat_template, None, eog, mf.n_vocab, comply=5)
    assert sorted(c["label"] for c in prep["comply"]) == [0] * 5 + [1] * 5
    openers = [mf.tokenize(o, False) for o in OPENERS]
    assert all(any(c["tokens"][-len(o):] == o for o in openers) for c in prep["comply"])
    base = build_sequences(model, {**prep, "comply": []}, gen_tokens=8, cls_every=2, log=lambda *_: None)
    seqs = build_sequences(model, prep, gen_tokens=8, cls_every=2, log=lambda *_: None)
    comply = [s for s in seqs if s.meta["kind"] == "comply"]
    assert len(seqs) == len(base) + 10 and len(comply) == 10
    for s, c in zip(comply, prep["comply"]):
        assert s.tokens[:len(c["tokens"])] == c["tokens"] and len(s.tokens) > len(c["tokens"])
        assert s.lm_from is None and len(s.cls_at) >= 2 and set(s.labels()) == {c["label"]}


def test_comply_prompts_come_from_the_kinds_asked_for(tiny_base):
    """`--comply-kinds`: the comply prompts are drawn from those augmentations only (default: plain requests,
    the same draw as before the option existed)."""
    from runtime.backends.llama import LlamaModelFile

    mf = LlamaModelFile(tiny_base)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    examples = _toy_examples()
    for e in examples[1::3]:  # both labels, no prefill
        e["augmentation"] = "jailbreak_template"
    kind = {e["id"]: e["augmentation"] for e in examples}
    args = (mf, mf.chat_template, None, eog, mf.n_vocab)
    plain = prepare(examples, *args, comply=4)["comply"]
    wrapped = prepare(examples, *args, comply=4, comply_kinds=("jailbreak_template",))["comply"]
    both = prepare(examples, *args, comply=4, comply_kinds=("none", "jailbreak_template"))["comply"]
    assert {kind[c["id"]] for c in plain} == {"none"} and {kind[c["id"]] for c in wrapped} == {"jailbreak_template"}
    assert len(plain) == len(wrapped) == len(both) == 8 and sorted(c["label"] for c in wrapped) == [0] * 4 + [1] * 4
    assert [c["id"] for c in plain] == [c["id"] for c in prepare(examples, *args, comply=4, comply_kinds=("none",))["comply"]]


def test_bf16_is_refused_where_the_cpu_runs_it_slower(tmp_path, monkeypatch, capsys):
    """`--bf16` on a CPU without bfloat16 instructions (an AVX2 machine measured 40x slower) stops at once with
    the reason, before any data is built; where bfloat16 pays the probe says so (a real measurement)."""
    import safechat.train.joint_run as jr
    from safechat.train.__main__ import main

    speed = jr.bf16_speedup()
    assert speed > 0
    monkeypatch.setattr(jr, "bf16_speedup", lambda: 0.025)
    monkeypatch.setattr(jr, "make_prep", lambda *a, **k: pytest.fail("data built before the --bf16 check"))
    with pytest.raises(SystemExit, match=r"--bf16: bfloat16 matrix products run 40x slower"):
        main(["joint", "--out", str(tmp_path / "j"), "--device", "cpu", "--bf16", "--threads", "1"])


def test_own_answers_only_teach_no_refusal(tiny_base, model):
    """`--lm-targets own` (the default): no sequence puts LM loss on the refusal sentence, harmful requests keep
    their [CLS] at the end of the prompt, and the benign own answers are trained as before; `own+refusal` is the
    recipe every run up to run7 used."""
    from runtime.backends.llama import LlamaModelFile
    from safechat.train.joint_data import build_sequences

    mf = LlamaModelFile(tiny_base)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    prep = prepare(_toy_examples(), mf, mf.chat_template, None, eog, mf.n_vocab, multi_turn=6, seed=1)
    quiet = dict(gen_tokens=8, cls_every=2, log=lambda *_: None)
    old = build_sequences(model, prep, refusal_lm=True, **quiet)
    new = build_sequences(model, prep, refusal_lm=False, **quiet)
    refusal = prep["refusal"]
    ends_in_refusal = lambda s: s.lm_from is not None and s.tokens[s.lm_from:] == refusal  # noqa: E731
    assert any(ends_in_refusal(s) for s in old)
    assert not any(ends_in_refusal(s) for s in new)
    assert len(new) == len(old)
    for a, b in zip(old, new):
        assert a.cls_at == b.cls_at and a.labels() == b.labels()
        if a.lm_from is not None and not ends_in_refusal(a):
            assert (a.tokens, a.lm_from) == (b.tokens, b.lm_from)  # own answers: unchanged
        if ends_in_refusal(a):
            assert b.lm_from is None and b.tokens == a.tokens[:a.lm_from]


def test_a_run_resumes_in_a_new_sitting_from_its_small_state(model, tmp_path):
    """A run stopped with `state_dir` and its out_dir gone (~/.cache lost): the committed state alone continues
    it to the uninterrupted run's result, up to float16/bfloat16 rounding; no data in the state."""
    from safechat.train.run_state import STATE_JSON, STATE_TENSORS, load_state

    seqs = _planted()
    kw = dict(steps=32, rank=4, alpha=8, lr=1e-2, cls_lr=3e-2, batch_tokens=256, ckpt_every=8, log_every=8,
              log=lambda *_: None)
    straight = train_joint(model, seqs, tmp_path / "a", **kw)
    held = _planted(16, seed=1)
    p_straight = np.array(score(model, straight.lora, straight.cls_row, straight.head, held))
    labels = np.array([[s.label] * 2 for s in held])
    state = tmp_path / "candidates" / "run"
    for moments in (True, False):
        cut = train_joint(model, seqs, tmp_path / "b", max_seconds=0.0, state_dir=state, state_command="cmd", **kw)
        assert not cut.info["finished"]
        import shutil
        shutil.rmtree(tmp_path / "b")  # the next sitting has only what was committed
        assert sorted(p.name for p in state.iterdir()) == [STATE_JSON, STATE_TENSORS]
        meta = json.loads((state / STATE_JSON).read_text())
        assert meta["step"] == 1 and meta["command"] == "cmd" and meta["config"]["data"]
        if not moments:  # the same state without its moments: Adam restarts its averages
            from safetensors.torch import load_file, save_file
            t = {k: v for k, v in load_file(str(state / STATE_TENSORS)).items() if not k.startswith("opt.")}
            save_file(t, str(state / STATE_TENSORS))
            (state / STATE_JSON).write_text(json.dumps({**meta, "moments": False}))
        assert (load_state(state)["opt"] is None) != moments
        resumed = train_joint(model, seqs, tmp_path / "b", resume=True, state_dir=state, **kw)
        assert resumed.info["finished"] and resumed.info["steps_done"] == 32
        if moments:  # float16 LoRA factors, at this toy learning rate (1e-2) over 31 steps
            np.testing.assert_allclose(resumed.head, straight.head, atol=5e-2 * np.abs(straight.head).max())
        p = np.array(score(model, resumed.lora, resumed.cls_row, resumed.head, held))
        d = np.abs(p - p_straight).ravel()  # rounding noise, which a borderline toy example can amplify
        assert (np.median(d) < 0.005 and np.quantile(d, 0.9) < 0.05) if moments else d.mean() < 0.1, (moments, d)
        assert ((p > 0.5) == (labels == 1)).mean() >= 0.9
        shutil.rmtree(tmp_path / "b")
        shutil.rmtree(state)
    with pytest.raises(ValueError, match="different run"):  # a state is bound to its data's digest
        train_joint(model, seqs, tmp_path / "c", max_seconds=0.0, state_dir=state, **kw)
        train_joint(model, _planted(seed=3), tmp_path / "d", resume=True, state_dir=state, **kw)

"""The GGUF converter: tokens, rows, metadata, byte-identical copies, refusals."""
import gguf
import numpy as np
import pytest

from runtime.artifact import Artifact, ArtifactError, load_artifact
from runtime.gguf_io import copied_fields, copied_tensors, read_gguf, write_gguf
from runtime.fold import ConvertError, convert_gguf
from runtime.contract import PREFIX, SPECIAL_TOKENS, VERIFICATION, VERIFIED
from safechat.convert.stamp import write_stamped
from tests.tiny_model import N_EMBD, random_artifact


def test_safe_model_layout(tiny_base, tiny_safe):
    base, safe = gguf.GGUFReader(str(tiny_base)), gguf.GGUFReader(str(tiny_safe))
    n = len(base.fields["tokenizer.ggml.tokens"].contents())
    toks = safe.fields["tokenizer.ggml.tokens"].contents()
    types = safe.fields["tokenizer.ggml.token_type"].contents()
    assert toks[n:] == list(SPECIAL_TOKENS) and toks[:n] == base.fields["tokenizer.ggml.tokens"].contents()
    assert types[n:] == [gguf.TokenType.CONTROL] * 3
    assert safe.fields["llama.vocab_size"].contents() == n + 3
    assert safe.fields[PREFIX + "cls_token_id"].contents() == n
    assert safe.fields[PREFIX + "safe_token_id"].contents() == n + 1
    assert safe.fields[PREFIX + "unsafe_token_id"].contents() == n + 2
    assert 0 < safe.fields[PREFIX + "threshold"].contents() < 1
    art = random_artifact()
    bt = {t.name: t for t in base.tensors}
    for t in safe.tensors:
        if t.name == "token_embd.weight":
            rows = np.asarray(t.data).reshape(-1, N_EMBD)
            np.testing.assert_array_equal(rows[:n], np.asarray(bt[t.name].data).reshape(-1, N_EMBD))
            np.testing.assert_allclose(rows[n], art.cls_embedding)
            np.testing.assert_allclose(rows[n + 1:], art.head)
        else:  # every other tensor is copied byte for byte
            assert np.asarray(t.data).tobytes() == np.asarray(bt[t.name].data).tobytes()


def test_quantized_embedding_rows_stay_in_their_type(tmp_path):
    """Q8_0 embedding (as in the default base): the new rows are quantized, old rows untouched."""
    from tests.tiny_model import write_tiny_base
    src = gguf.GGUFReader(str(write_tiny_base(tmp_path / "f32.gguf")))
    w = gguf.GGUFWriter(str(tmp_path / "q8.gguf"), "llama")
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in src.tensors:
        if t.name == "token_embd.weight":
            w.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    art = random_artifact()
    convert_gguf(tmp_path / "q8.gguf", art, tmp_path / "q8-safe.gguf", progress=False)
    emb = next(t for t in gguf.GGUFReader(str(tmp_path / "q8-safe.gguf")).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
    rows = gguf.quants.dequantize(emb.data, emb.tensor_type)
    np.testing.assert_allclose(rows[-3:], np.stack([art.cls_embedding, *art.head]), atol=0.02)
    from runtime.backends.llama import LlamaModelFile
    assert LlamaModelFile(tmp_path / "q8-safe.gguf").safety_meta().threshold == pytest.approx(0.5)
    # forced re-conversion cuts the three quantized rows and appends them again: the same file
    convert_gguf(tmp_path / "q8-safe.gguf", art, tmp_path / "q8-again.gguf", progress=False, force=True)
    assert (tmp_path / "q8-again.gguf").read_bytes() == (tmp_path / "q8-safe.gguf").read_bytes()


def test_converting_a_safe_model_again_is_refused(tiny_safe, tmp_path):
    with pytest.raises(ConvertError, match="already carries safety metadata.*pass --force"):
        convert_gguf(tiny_safe, random_artifact(), tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left


def test_force_replaces_the_safety_signal(tiny_base, tiny_safe, tmp_path):
    # the same artifact again (from a stamped file): byte for byte the first conversion, stamp gone
    stamped = write_stamped(tiny_safe, tmp_path / "stamped.gguf", {VERIFIED: "fail", VERIFICATION: "{}"})
    convert_gguf(stamped, random_artifact(), tmp_path / "again.gguf", progress=False, force=True)
    assert (tmp_path / "again.gguf").read_bytes() == tiny_safe.read_bytes()
    # another artifact: the same file as converting the base with it
    other = random_artifact(seed=2, threshold=0.7)
    convert_gguf(tiny_safe, other, tmp_path / "replaced.gguf", progress=False, force=True)
    convert_gguf(tiny_base, other, tmp_path / "direct.gguf", progress=False)
    assert (tmp_path / "replaced.gguf").read_bytes() == (tmp_path / "direct.gguf").read_bytes()


def test_force_refuses_safety_tokens_it_cannot_replace(tiny_base, tmp_path):
    """A vocabulary that holds `<|safe|>` as an ordinary token in the middle is no safe model of ours."""
    r = read_gguf(tiny_base)
    fields = [(k, [SPECIAL_TOKENS[1] if i == 100 else t for i, t in enumerate(v)], vt, sub)
              if k == "tokenizer.ggml.tokens" else (k, v, vt, sub) for k, v, vt, sub in copied_fields(r)]
    odd = write_gguf(tmp_path / "odd.gguf", "llama", fields, copied_tensors(r))
    with pytest.raises(ConvertError, match=r"already carries the tokens \['<\|safe\|>'\]"):
        convert_gguf(odd, random_artifact(), tmp_path / "x.gguf", progress=False)
    with pytest.raises(ConvertError, match="not as the last tokens.*even with --force"):
        convert_gguf(odd, random_artifact(), tmp_path / "x.gguf", progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_unsupported_architecture_is_named_before_writing(tiny_base, tmp_path):
    r = read_gguf(tiny_base)
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2", copied_fields(r), copied_tensors(r))
    with pytest.raises(ConvertError, match=r"gpt2.gguf: architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3, gemma3, phi3$"):
        convert_gguf(gpt2, random_artifact(), tmp_path / "x.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf"]


def test_artifact_for_another_hidden_size_is_refused(tiny_base, tmp_path):
    art = Artifact(np.zeros(32, np.float32), np.zeros((2, 32), np.float32), {"threshold": 0.5})
    with pytest.raises(ConvertError, match="hidden size 32"):
        convert_gguf(tiny_base, art, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_missing_or_corrupt_base(tmp_path):
    with pytest.raises(ConvertError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", random_artifact(), tmp_path / "x.gguf", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ConvertError, match="not a readable GGUF"):
        convert_gguf(bad, random_artifact(), tmp_path / "x.gguf", progress=False)


def test_artifact_roundtrip_and_validation(tmp_path):
    art = random_artifact()
    d = art.save(tmp_path / "a")
    back = load_artifact(d)
    np.testing.assert_array_equal(back.head, art.head)
    assert back.digest() == art.digest()
    with pytest.raises(ArtifactError, match="not a safety artifact"):
        load_artifact(tmp_path)
    (d / "card.json").write_text('{"threshold": 7}')
    with pytest.raises(ArtifactError, match="threshold"):
        load_artifact(d)


def test_packaged_default_artifact_is_valid():
    from runtime.default_model import ASSET
    art = load_artifact(ASSET)
    assert art.hidden_size == 576
    assert art.card["metrics"]["test"]["end_of_prompt"]["n"] > 100
    assert art.card["data"]["packages"]  # versions and licences recorded


def test_answer_threshold_travels_from_the_card_to_the_runtime(tiny_base, tmp_path):
    import math

    import runtime
    from runtime.contract import MetadataError, SafetyMeta
    art = random_artifact(threshold=0.999)
    art.card["answer_threshold"] = math.inf  # the calibrated pair: act at the prompt only
    convert_gguf(tiny_base, art, tmp_path / "pair.gguf", progress=False)
    m = runtime.load(tmp_path / "pair.gguf", allow_unverified=True)
    assert m.meta.threshold == pytest.approx(0.999) and m.meta.answer_threshold == math.inf
    r = m.chat("hello there", max_tokens=8)
    assert r.safety.answer_threshold == math.inf
    # a policy threshold of its own governs every check; a policy answer threshold wins over the file's
    assert m.chat("hello", max_tokens=4, safety=runtime.SafetyPolicy(threshold=0.5)).safety.answer_threshold == 0.5
    pol = runtime.SafetyPolicy(answer_threshold=0.3)
    assert m.chat("hello", max_tokens=4, safety=pol).safety.answer_threshold == 0.3
    m.close()
    # without one in the card the key is absent and the one threshold governs every check
    convert_gguf(tiny_base, random_artifact(threshold=0.9), tmp_path / "one.gguf", progress=False)
    assert PREFIX + "answer_threshold" not in read_gguf(tmp_path / "one.gguf").fields
    kv = {PREFIX + k: v for k, v in [("format_version", "1"), ("cls_token_id", "1"), ("safe_token_id", "2"),
                                     ("unsafe_token_id", "3"), ("threshold", "0.9"), ("answer_threshold", "1.5")]}
    with pytest.raises(MetadataError, match="answer threshold"):
        SafetyMeta.from_kv(kv, 10)
    assert SafetyMeta.from_kv({**kv, PREFIX + "answer_threshold": "inf"}, 10).answer_threshold == math.inf
    d = art.save(tmp_path / "bad")
    (d / "card.json").write_text('{"threshold": 0.9, "answer_threshold": 0}')
    with pytest.raises(ArtifactError, match="answer_threshold"):
        load_artifact(d)


def test_the_calibrated_cadence_travels_from_the_card_to_the_runtime(tiny_base, tmp_path):
    """A card's `every` (the cadence its pair was calibrated at) becomes `safety.every`, the default policy's
    cadence for that file; a policy's own `every` wins; no key: the runtime's default of 4."""
    import runtime
    from runtime.contract import MetadataError, SafetyMeta
    art = random_artifact(threshold=0.999999)
    art.card.update(answer_threshold=0.999999, every=3)
    convert_gguf(tiny_base, art, tmp_path / "three.gguf", progress=False)
    assert read_gguf(tmp_path / "three.gguf").fields[PREFIX + "every"].contents() == 3
    with runtime.load(tmp_path / "three.gguf", allow_unverified=True) as m:
        assert m.meta.every == 3
        for native in (True, False):
            m.native = native
            for every, want in ((None, 3), (2, 2)):  # the file's cadence, then a policy's own
                pol = None if every is None else runtime.SafetyPolicy(every=every)
                r = m.chat("hello there", max_tokens=12, temperature=0, safety=pol)
                inside = [c for c, _ in r.safety.trace if c > 0]  # the last is the end-of-answer check
                assert r.safety.every == want and all(c % want == 0 for c in inside[:-1]), (native, r.safety.trace)
                assert r.usage.completion_tokens < want or inside[0] == want
    convert_gguf(tiny_base, random_artifact(threshold=0.999999), tmp_path / "none.gguf", progress=False)
    assert PREFIX + "every" not in read_gguf(tmp_path / "none.gguf").fields
    with runtime.load(tmp_path / "none.gguf", allow_unverified=True) as m:
        assert m.meta.every is None and m.chat("hello", max_tokens=4).safety.every == 4
    kv = {PREFIX + k: v for k, v in [("format_version", "1"), ("cls_token_id", "1"), ("safe_token_id", "2"),
                                     ("unsafe_token_id", "3"), ("threshold", "0.9")]}
    assert SafetyMeta.from_kv({**kv, PREFIX + "every": "16"}, 10).every == 16
    for bad in ("0", "-4", "1.5", "many"):
        with pytest.raises(MetadataError, match="cadence|malformed"):
            SafetyMeta.from_kv({**kv, PREFIX + "every": bad}, 10)
    d = art.save(tmp_path / "bad")
    (d / "card.json").write_text('{"threshold": 0.9, "every": 0}')
    with pytest.raises(ArtifactError, match="every"):
        load_artifact(d)


def test_the_file_never_stores_a_threshold_below_the_calibrated_one(tiny_base, tmp_path):
    """The file holds float32 and llama.cpp reads metadata back as 6-decimal text; nearest rounding put v9's
    0.9781200955383609 at 0.978120, below the highest val conversation score calibration let through."""
    import runtime
    from runtime.contract import stored_threshold
    t, a = 0.9781200955383609, 0.9998924139166707
    art = random_artifact(threshold=t)
    art.card["answer_threshold"] = a
    convert_gguf(tiny_base, art, tmp_path / "t.gguf", progress=False)
    m = runtime.load(tmp_path / "t.gguf", allow_unverified=True)
    assert t <= m.meta.threshold < t + 1e-6 and a <= m.meta.answer_threshold < a + 1e-6
    m.close()
    assert stored_threshold(0.999) == np.float32(0.999) and stored_threshold(float("inf")) == float("inf")
    for x in np.random.default_rng(0).uniform(0, 1, 2000):
        assert float(f"{stored_threshold(x):f}") >= x  # as llama.cpp's text gives it back

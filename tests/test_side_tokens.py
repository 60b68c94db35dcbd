"""K chained side tokens (a learned soft prompt ending in the [CLS]) travel in a standard GGUF and every
backend computes the verdict the torch reference computes for them."""
import json

import gguf
import numpy as np
import pytest

import runtime
from runtime.artifact import Artifact, load_artifact
from runtime.fold import ConvertError, convert_gguf
from runtime.contract import SIDE_TOKEN_IDS, MetadataError, SafetyMeta, side_token_name, SPECIAL_TOKENS
from runtime import SafetyPolicy
from runtime.model import Model
from tests.tiny_model import N_EMBD, random_artifact, write_tiny_base

K = 3
MESSAGES = [[{"role": "user", "content": "hello there"}],
            [{"role": "user", "content": "the rain in spain"}, {"role": "assistant", "content": "Sure, here is"}],
            [{"role": "user", "content": "what is the theory of heat?"}]]


def side_artifact(k: int = K, seed: int = 5) -> Artifact:
    rng = np.random.default_rng(seed)
    return Artifact(rng.standard_normal((k, N_EMBD)).astype(np.float32),
                    rng.standard_normal((2, N_EMBD)).astype(np.float32) * 0.05,
                    {"threshold": 0.5, "base_model": "tiny-random-llama", "metrics": {}})


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def side_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("side")
    base = write_tiny_base(d / "base.gguf", tied=request.param)
    art = side_artifact()
    convert_gguf(base, art, d / "safe.gguf", progress=False)
    return base, d / "safe.gguf", art


def test_the_file_appends_side_tokens_before_the_three_safety_tokens(side_model):
    base, safe, art = side_model
    n = len(gguf.GGUFReader(str(base)).fields["tokenizer.ggml.tokens"].contents())
    r = gguf.GGUFReader(str(safe))
    assert r.fields["tokenizer.ggml.tokens"].contents()[n:] == [side_token_name(1), side_token_name(2),
                                                                 *SPECIAL_TOKENS]
    with runtime.load(safe, n_ctx=256) as m:
        meta = m.meta
    assert meta.format_version == 2 and meta.side_token_ids == (n, n + 1)
    assert meta.token_ids == (n, n + 1, n + 2, n + 3, n + 4) and meta.cls_token_id == n + 2
    emb = np.asarray(gguf.quants.dequantize(next(t.data for t in r.tensors if t.name == "token_embd.weight"),
                                            next(t.tensor_type for t in r.tensors if t.name == "token_embd.weight")))
    np.testing.assert_allclose(emb.reshape(-1, N_EMBD)[n:n + K], art.side_rows, atol=0.02)  # Q8_0 rows


def _reference(base, art, tokens: list[int], covered: list[int]) -> list[float]:
    torch = pytest.importorskip("torch")
    from safechat.convert.llama_torch import FrozenLlama

    ref = FrozenLlama(base)
    kv, _ = ref.prefill(torch.tensor([tokens]))
    ends = torch.tensor(covered)
    with torch.no_grad():
        hid = ref.cls_forward(torch.from_numpy(art.cls_embedding), kv.expand(-1, -1, len(covered), -1, -1, -1), ends)
    logits = hid.double().numpy() @ art.head.astype(np.float64).T
    return list(1 / (1 + np.exp(logits[:, 0] - logits[:, 1])))


def test_llama_cpp_verdicts_inside_the_answer_match_the_reference(side_model):
    from runtime.backends.base import Sampling
    from runtime.backends.llama import LlamaBackend, LlamaModelFile

    base, safe, art = side_model
    mf = LlamaModelFile(safe)
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=mf.safety_meta().token_ids)
    for msgs in MESSAGES:
        with runtime.load(safe, n_ctx=256) as m:
            toks = m.tokenize_messages(msgs)
        got, answer = [be.start(toks, Sampling(), check=True)], []
        for _ in range(10):
            answer.append(be.sample())
            got.append(be.advance(answer[-1], check=True))
        want = _reference(base, art, toks + answer, [len(toks) + i for i in range(len(answer) + 1)])
        np.testing.assert_allclose(got, want, atol=5e-3)  # llama.cpp keeps K/V in F16
        assert max(want) - min(want) > 1e-3  # the verdict moves with the context (not a constant)
        last = Artifact(art.side_rows[-1], art.head, art.card)  # the [CLS] alone: the side tokens matter
        alone = _reference(base, last, toks + answer, [len(toks) + i for i in range(len(answer) + 1)])
        err = np.abs(np.array(got) - want).max()
        assert np.abs(np.array(alone) - want).max() > max(5 * err, 5e-3)  # far beyond llama.cpp's rounding
    be.close()
    mf.close()


def test_native_loop_gives_the_python_loop_s_verdicts(side_model):
    _, safe, _ = side_model
    py = Model(safe, n_ctx=512, threads=1, native=False)
    nat = Model(safe, n_ctx=512, threads=1, native=True)
    for msgs in MESSAGES:
        for policy in (SafetyPolicy(threshold=0.999999, every=1), SafetyPolicy(threshold=0.999999, every=3,
                                                                                 entropy_trigger=0.5)):
            a = py.chat(msgs, max_tokens=12, safety=policy, temperature=0)
            b = nat.chat(msgs, max_tokens=12, safety=policy, temperature=0)
            assert b.usage.native_seconds is not None and a.usage.native_seconds is None
            assert (b.text, b.safety.trace, b.safety.triggers) == (a.text, a.safety.trace, a.safety.triggers)
    py.close()
    nat.close()


def test_backend_verdicts_match_generation_with_side_tokens(side_model):
    from runtime.backends.base import Sampling
    from runtime.backends.llama import LlamaBackend, LlamaModelFile

    base, safe, art = side_model
    mf = LlamaModelFile(safe)
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, n_batch=16, threads=1, safety_ids=ids)  # stretches longer than a batch
    toks = mf.tokenize("<|im_start|>user\nthe weather in spring and the long road home<|im_end|>\n", True)
    got = be.verdicts(toks, [5, 17, len(toks)])
    np.testing.assert_allclose(got, _reference(base, art, toks, [5, 17, len(toks)]), atol=5e-3)
    p0 = be.start(toks, Sampling(), check=True)
    assert p0 == pytest.approx(got[-1], abs=1e-4)
    for _ in range(6):  # side tokens are never sampled, and never stay in the cache
        t = be.sample()
        assert t not in ids
        be.advance(t, check=True)
    assert be.check() == pytest.approx(be.check(), abs=1e-6)
    be.close()
    mf.close()


def test_typed_side_token_text_is_not_a_control_token(side_model):
    _, safe, _ = side_model
    with runtime.load(safe, n_ctx=256) as m:
        toks = m.tokenize_messages([{"role": "user", "content": f"{side_token_name(1)} {side_token_name(2)}"}])
        assert not set(m.meta.token_ids) & set(toks)


def test_reconvert_with_force_between_side_token_counts(side_model, tmp_path):
    base, safe, _ = side_model
    with pytest.raises(ConvertError, match="already"):
        convert_gguf(safe, random_artifact(), tmp_path / "x.gguf", progress=False)
    one = convert_gguf(safe, random_artifact(), tmp_path / "one.gguf", progress=False, force=True)
    fresh = convert_gguf(base, random_artifact(), tmp_path / "fresh.gguf", progress=False)
    assert one == fresh and one.format_version == 1 and one.side_token_ids == ()
    five = convert_gguf(tmp_path / "one.gguf", side_artifact(5), tmp_path / "five.gguf", progress=False, force=True)
    assert len(five.side_token_ids) == 4 and five.cls_token_id == fresh.cls_token_id + 4


def test_artifact_with_side_rows_round_trips(tmp_path):
    art = side_artifact()
    art.save(tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert back.side_rows.shape == (K, N_EMBD) and back.hidden_size == N_EMBD
    np.testing.assert_array_equal(back.cls_embedding, art.cls_embedding)


def test_metadata_refuses_bad_side_tokens():
    meta = SafetyMeta(2, 12, 13, 14, 0.5, side_token_ids=(10, 11))
    kv = {k: str(v) for k, v in meta.to_kv().items()}
    assert SafetyMeta.from_kv(kv, 20).token_ids == (10, 11, 12, 13, 14)
    with pytest.raises(MetadataError, match="format 1"):
        SafetyMeta.from_kv(kv | {"safety.format_version": "1"}, 20)
    with pytest.raises(MetadataError, match="invalid safety token ids"):
        SafetyMeta.from_kv(kv | {"safety." + SIDE_TOKEN_IDS: "[10, 12]"}, 20)
    with pytest.raises(MetadataError, match="malformed"):
        SafetyMeta.from_kv(kv | {"safety." + SIDE_TOKEN_IDS: "[ten]"}, 20)
    with pytest.raises(MetadataError, match="at most"):
        SafetyMeta.from_kv(kv | {"safety." + SIDE_TOKEN_IDS: str(list(range(100, 120)))}, 200)


def test_onnx_backend_gives_llama_cpp_s_verdicts(side_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("torch")
    import shutil

    from safechat.convert.onnx_export import export_onnx
    from runtime.backends.base import Sampling

    _, safe, _ = side_model
    shutil.copy(safe, tmp_path / "model.gguf")
    export_onnx(safe, tmp_path / "model.onnx", progress=False)
    ml = runtime.load(safe, n_ctx=256)
    mo = runtime.load(tmp_path / "model.onnx", backend="onnx", n_ctx=256)
    assert mo.meta.token_ids == ml.meta.token_ids and len(mo.meta.side_token_ids) == K - 1
    toks = ml.tokenize_messages(MESSAGES[1])
    bl, bo = ml.backend, mo.backend
    assert bo.start(toks, Sampling(), check=True) == pytest.approx(bl.start(toks, Sampling(), check=True), abs=5e-3)
    for step in range(8):
        tl, to = bl.sample(), bo.sample()
        assert tl == to and tl not in ml.meta.token_ids
        assert bo.advance(to, True) == pytest.approx(bl.advance(tl, True), abs=5e-3)
    assert bo.check() == pytest.approx(bl.check(), abs=5e-3)
    ml.close()
    mo.close()


def test_force_refuses_side_token_ids_that_are_not_where_the_converter_put_them(side_model, tmp_path):
    """`safety.side_token_ids` naming other rows than the side tokens before the [CLS] is no file of ours."""
    from runtime.gguf_io import copied_fields, copied_tensors, read_gguf, write_gguf

    _, safe, _ = side_model
    r = read_gguf(safe)
    key = "safety." + SIDE_TOKEN_IDS
    swapped = lambda v: str(json.loads(v)[::-1])  # the right rows in the wrong order
    fields = [(k, swapped(v) if k == key else v, vt, sub) for k, v, vt, sub in copied_fields(r)]
    odd = write_gguf(tmp_path / "odd.gguf", "llama", fields, copied_tensors(r))
    with pytest.raises(ConvertError, match="not as the last tokens.*even with --force"):
        convert_gguf(odd, random_artifact(), tmp_path / "x.gguf", progress=False, force=True)

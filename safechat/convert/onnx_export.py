"""Safe GGUF -> ONNX with an explicit KV cache and a dedicated safety output (issue 4, ONNX).

    python -m safechat.convert.onnx_export SAFE.gguf OUT.onnx [--quant int8|int4]

The graph (one decoder step over T new tokens after P cached positions):

inputs   input_ids      int64 [1, T]
         position_ids   int64 [1, T]            absolute positions (P, P+1, ...)
         logits_index   int64 [1]               which of the T rows gets next-token logits
         past_key_{i}   float32 [1, P, Hkv, hd] per layer i (rotated keys), P may be 0
         past_value_{i} float32 [1, P, Hkv, hd]
outputs  logits         float32 [1, n_vocab]    row `logits_index` only (one vocabulary projection)
         safety_logits  float32 [1, 2 + C]      [safe, unsafe, *category rows] from the LAST row's
                                                final hidden state dotted with those head rows only
                                                (C = categories + controversial; 0 without a category head)
         key_{i}        float32 [1, T, Hkv, hd] the NEW keys/values only; the caller owns the
         value_{i}                              cache and writes them in place

The cache is sequence-major ([1, P, Hkv, hd]) so that `cache[:, :P]` of a preallocated
[1, n_ctx, Hkv, hd] buffer is a contiguous view: the runtime feeds it without copying and
writes only the T new rows per step. A check is one call with [token, CLS] (T=2,
logits_index=0): row 0 gives the next-token logits, row 1 (the [CLS]) the verdict; the
caller simply does not keep the [CLS]'s key/value row (docs/design.md section 3).

For llama, rotary embeddings are llama.cpp's interleaved pairs on GGUF's permuted Q/K weights (as
in safechat/convert/llama_torch.py); qwen2, qwen3, gemma3 and phi3 files are exported through transformers'
own layers (safechat/convert/onnx_hf.py), whose keys are in transformers' layout: the runtime only stores and
feeds them back. Metadata_props: the `safety.*` keys (convert/metadata.py),
`tokenizer.chat_template`, and `safechat.*` shape facts. Tokenization is NOT in the ONNX
file: the ONNX backend loads the vocabulary (vocab-only) from the safe GGUF beside it
(same stem, `.gguf`, or the file named in `safechat.vocab_gguf`).

Quantization uses onnxruntime's own tools on the exported float graph, layer MatMul weights
only (embedding Gather, output projection, safety head and norms stay float32): `int8` and
`int4` are MatMulNBits (8/4-bit blockwise weights, block 32, symmetric, accuracy level 4);
`int8-dynamic` is quantize_dynamic (per-channel int8 weights, per-tensor dynamic int8
activations). Measured on the default model: int8-dynamic moved p_unsafe by up to 0.65
(a harmful prompt fell from 0.985 to 0.33), MatMulNBits int8 by <= 0.05; prefer `int8`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from runtime.contract import PREFIX, MetadataError, SafetyMeta
from runtime.gguf_io import architecture, ConvertError, read_gguf

QUANTS = ("int8", "int4", "int8-dynamic")
_HIDDEN_OP, _HIDDEN_DOMAIN = "KeepFloatGemm", "safechat.export"  # placeholder during int8 quantization
OPSET = 18
# llama: the graph written here over safechat/convert/llama_torch.py's layers; the others through transformers
# (safechat/convert/onnx_hf.py)
ONNX_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def _gguf_kv(path: Path) -> tuple[dict[str, str], str | None, int]:
    """(safety.* as strings, chat template, n_vocab) straight from the GGUF; refuses other architectures."""
    r = read_gguf(path, "model")
    arch = architecture(r, str(path))
    if arch not in ONNX_ARCHITECTURES:
        raise ConvertError(f"{path}: architecture {arch!r} is not supported by the ONNX export; supported: "
                           f"{', '.join(ONNX_ARCHITECTURES)}")
    kv = {}
    for name, f in r.fields.items():
        if name.startswith(PREFIX):
            v = f.contents()
            kv[name] = v if isinstance(v, str) else repr(v) if isinstance(v, (list, dict)) else str(v)
    tmpl = r.fields.get("tokenizer.chat_template")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    return kv, (tmpl.contents() if tmpl is not None else None), n_vocab


def build_module(fl, safe_id: int, unsafe_id: int, category_ids: tuple[int, ...] = ()):
    """A torch module over FrozenLlama's weights with the I/O described in the module docstring."""
    import torch
    import torch.nn.functional as F

    c = fl.cfg
    w = fl.w
    hd, H, Hkv = c.head_dim, c.n_head, c.n_head_kv
    rep = H // Hkv

    class SafeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            P = lambda t: torch.nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
            self.embd = P(w["token_embd.weight"])
            out = fl.output_matrix()
            self.head = P(out[[safe_id, unsafe_id, *category_ids]].clone())   # [2 + C, D]
            self.out_w = self.embd if fl.tied else P(out)                      # [V, D], tied: shared
            self.out_norm = P(w["output_norm.weight"])
            self.layers = torch.nn.ModuleList()
            for i in range(c.n_layer):
                p = f"blk.{i}."
                m = torch.nn.Module()
                m.attn_norm = P(w[p + "attn_norm.weight"])
                m.ffn_norm = P(w[p + "ffn_norm.weight"])
                # stored transposed: the graph is MatMul(x, W^T) with a constant B (quantizable)
                for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                    setattr(m, name, P(w[p + name + ".weight"].T))
                self.layers.append(m)
            self.register_buffer("inv_freq", fl.inv_freq.to(torch.float32), persistent=False)

        def _norm(self, x, weight):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.eps) * weight

        def _rope(self, x, cos, sin):  # x: [1, T, h, hd]; interleaved pairs (llama.cpp NORM)
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

        def forward(self, input_ids, position_ids, logits_index, *past):
            T = input_ids.shape[1]
            Pn = past[0].shape[1]
            x = F.embedding(input_ids, self.embd)                             # [1, T, D]
            ang = position_ids.to(torch.float32)[..., None] * self.inv_freq    # [1, T, hd/2]
            cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
            q_pos = torch.arange(T, dtype=torch.int64) + Pn
            k_pos = torch.arange(Pn + T, dtype=torch.int64)
            mask = torch.where(k_pos[None, :] <= q_pos[:, None], 0.0, float("-inf"))  # [T, S]
            scale = 1.0 / (hd ** 0.5)
            new_kv = []
            for i, m in enumerate(self.layers):
                h = self._norm(x, m.attn_norm)
                q = self._rope((h @ m.attn_q).unflatten(-1, (H, hd)), cos, sin)        # [1, T, H, hd]
                k = self._rope((h @ m.attn_k).unflatten(-1, (Hkv, hd)), cos, sin)      # [1, T, Hkv, hd]
                v = (h @ m.attn_v).unflatten(-1, (Hkv, hd))
                new_kv += [k, v]
                keys = torch.cat([past[2 * i], k], dim=1).permute(0, 2, 3, 1)         # [1, Hkv, hd, S]
                vals = torch.cat([past[2 * i + 1], v], dim=1).permute(0, 2, 1, 3)     # [1, Hkv, S, hd]
                # query head j uses kv head j // rep: group queries as [Hkv, rep*T]
                qg = q.unflatten(2, (Hkv, rep)).permute(0, 2, 3, 1, 4).flatten(2, 3)   # [1, Hkv, rep*T, hd]
                s = (qg @ keys) * scale                                                # [1, Hkv, rep*T, S]
                s = (s.unflatten(2, (rep, T)) + mask).softmax(-1).flatten(2, 3)
                o = (s @ vals).unflatten(2, (rep, T)).permute(0, 3, 1, 2, 4).flatten(2)  # [1, T, H*hd]
                x = x + o @ m.attn_output
                h = self._norm(x, m.ffn_norm)
                x = x + (F.silu(h @ m.ffn_gate) * (h @ m.ffn_up)) @ m.ffn_down
            hid = self._norm(x, self.out_norm)[0]                                      # [T, D]
            logits = F.linear(hid.index_select(0, logits_index), self.out_w)           # [1, V]
            safety = F.linear(hid[-1:], self.head)                                     # [1, 2 + C]
            return (logits, safety, *new_kv)

    return SafeDecoder().eval()


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    new = [f"{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "logits_index", *past], ["logits", "safety_logits", *new]


def _output_head_nodes(model) -> list[str]:
    """Names of the nodes that compute `logits` / `safety_logits` (kept float by quantization)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names, todo, seen = [], ["logits", "safety_logits"], set()
    while todo:
        t = todo.pop()
        n = producers.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in ("MatMul", "Gemm"):
            names.append(n.name)
            continue  # stop at the projection
        todo.extend(n.input)
    return names


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import onnx

    model = onnx.load(str(src))
    exclude = _output_head_nodes(model)
    if quant in ("int8", "int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=8 if quant == "int8" else 4, block_size=32, is_symmetric=True,
                                 accuracy_level=4, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    elif quant == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # quantize_dynamic rewrites every Gemm into MatMul + a transposed copy of its weight (a
        # second, quantized copy of the tied embedding): hide the two head Gemms from it
        heads = [n for n in model.graph.node if n.name in exclude and n.op_type == "Gemm"]
        for n in heads:
            n.op_type, n.domain = _HIDDEN_OP, _HIDDEN_DOMAIN
        model.opset_import.append(onnx.helper.make_opsetid(_HIDDEN_DOMAIN, 1))
        hidden = dst.with_suffix(".hidden.onnx")
        onnx.save(model, str(hidden))
        quantize_dynamic(str(hidden), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
        hidden.unlink()
        out = onnx.load(str(dst))
        for n in out.graph.node:
            if n.op_type == _HIDDEN_OP and n.domain == _HIDDEN_DOMAIN:
                n.op_type, n.domain = "Gemm", ""
        keep = [o for o in out.opset_import if o.domain != _HIDDEN_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
        onnx.save(out, str(dst))
    else:
        raise ValueError(f"quant must be one of {QUANTS} or None, got {quant!r}")


def export_onnx(gguf_path: str | Path, out_path: str | Path, quant: str | None = None,
                progress: bool = True) -> Path:
    """Export a safe GGUF to one self-contained ONNX file (atomic); returns out_path."""
    import onnx
    import torch

    from safechat.convert.hf_frozen import FrozenHF
    from safechat.convert.llama_torch import FrozenLlama
    from safechat.convert.onnx_hf import build_hf_module

    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS} or None, got {quant!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF: {gguf_path}")
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    t0 = time.perf_counter()
    kv, template, n_tok = _gguf_kv(gguf_path)
    try:  # before reading any weights
        meta = SafetyMeta.from_kv(kv, n_tok, where=str(gguf_path))
    except MetadataError as e:
        raise MetadataError(f"{e}; convert it with `safechat convert` first") from None
    llama = architecture(read_gguf(gguf_path, "model"), str(gguf_path)) == "llama"
    fl = FrozenLlama(gguf_path) if llama else FrozenHF(gguf_path)
    c = fl.cfg
    say(f"read {gguf_path.name}: {c.n_layer} layers, width {c.n_embd}, vocab {c.n_vocab} "
        f"({time.perf_counter() - t0:.1f}s)")
    build = build_module if llama else build_hf_module
    module = build(fl, meta.safe_token_id, meta.unsafe_token_id, meta.category_ids)
    del fl
    ins, outs = io_names(c.n_layer)
    P0 = 3  # trace with 3 cached positions and T=2 ([token, CLS])
    args = (torch.tensor([[meta.cls_token_id, meta.cls_token_id]], dtype=torch.int64),
            torch.tensor([[P0, P0 + 1]], dtype=torch.int64),
            torch.tensor([0], dtype=torch.int64),
            *[torch.zeros(1, P0, c.n_head_kv, c.head_dim) for _ in range(2 * c.n_layer)])
    T = torch.export.Dim("T", min=1, max=1 << 16)
    Pd = torch.export.Dim("P", min=0, max=1 << 16)
    dyn = ({1: T}, {1: T}, None, tuple({1: Pd} for _ in range(2 * c.n_layer)))  # *past is one group
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".onnx-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        say("exporting with torch.onnx.export(dynamo=True) ...")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" etc.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning))
            prog = torch.onnx.export(module, args, dynamo=True, input_names=ins, output_names=outs,
                                     dynamic_shapes=dyn, opset_version=OPSET, optimize=True,
                                     external_data=False, verbose=False)
            prog.save(str(raw), external_data=False)
        del prog, module
        src = raw
        if quant:
            say(f"quantizing ({quant}) ...")
            src = Path(tmp) / f"{quant}.onnx"
            _quantize(raw, src, quant)
        model = onnx.load(str(src))
        props = {k: str(v) for k, v in meta.to_kv().items()}
        if template:
            props["tokenizer.chat_template"] = template
        props.update({
            "safechat.format": "kv-seq-major-v1",
            "safechat.n_layer": str(c.n_layer), "safechat.n_head": str(c.n_head),
            "safechat.n_head_kv": str(c.n_head_kv), "safechat.head_dim": str(c.head_dim),
            "safechat.n_vocab": str(c.n_vocab),
            "safechat.vocab_gguf": gguf_path.name, "safechat.quant": quant or "fp32",
        })
        del model.metadata_props[:]
        for k, v in props.items():
            e = model.metadata_props.add()
            e.key, e.value = k, v
        model.doc_string = f"safechat safe model exported from {gguf_path.name}"
        tmp_out = Path(tmp) / "out.onnx"
        onnx.save(model, str(tmp_out))
        os.replace(tmp_out, out_path)
    say(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safechat.convert.onnx_export", description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="a safe GGUF (from `safechat convert`)")
    ap.add_argument("out", help="output .onnx file")
    ap.add_argument("--quant", choices=QUANTS, default=None, help="onnxruntime weight quantization")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        export_onnx(a.gguf, a.out, a.quant, progress=not a.quiet)
    except (MetadataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

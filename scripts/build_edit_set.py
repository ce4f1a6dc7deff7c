#!/usr/bin/env python
"""Regenerate the bundled edit set and the unrelated-prompt pool (deterministic).

Writes two files inside the package:

* ``lemoe_engine/data/country_edits.jsonl``: counterfactual edits in the ZsRE form
  (``subject``, ``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``, plus ``relation``).
* ``lemoe_engine/data/unrelated_prompts.txt``: one unrelated prompt per line, the pool the
  engine may train and calibrate on. It never contains a scored ``loc`` prompt.

How it works
------------
1. Edit facts come from ``countryinfo`` (MIT, ~250 countries and territories). Seven
   relations are used: capital, currency, official language, continent, demonym,
   international calling code and internet country-code domain. Subjects whose name has a
   comma or parenthesis, duplicates and historical entries are left out; a subject gets a
   relation only when countryinfo has a clean value for it.
2. Each (subject, relation) pair yields exactly one edit. Its target is counterfactual but
   of the same type: another country's capital / demonym / calling code / domain, another
   continent, or a well-known currency or language (names below, ISO 4217 / ISO 639-1)
   that the country does NOT use according to countryinfo. Targets are short (pools keep
   only values of at most 14 characters and at most two words).
3. Every relation has five question templates. The edit prompt and the paraphrase use two
   different templates, drawn at random per edit.
4. Locality questions come from domains unrelated to countries: chemical elements (from
   ``periodictable``: symbol, name, atomic number), arithmetic, unit conversions and
   ordered sequences (months, weekdays, letters). All candidate facts are generated, each
   domain is shuffled, and a stratified ~300 are set aside FIRST for the unrelated pool;
   the scored ``loc`` questions are drawn only from the rest, so the pool and the scored
   set share no fact and no prompt (DESIGN.md "No leak").
5. The edit list is shuffled (arrival order mixes relations) with a fixed seed.
6. Same-subject specificity: each edit gets up to ``SPEC_PER_EDIT`` prompts about OTHER relations
   of its subject (``specificity``, ``specificity_ans``: the true value from countryinfo,
   ``specificity_relation``), written with ``SPEC_TEMPLATES``, a template bank used for nothing
   else: no specificity prompt is ever an edit prompt, a paraphrase, a locality prompt or an
   unrelated-pool prompt (the editor trains only on ``src``/``alt``; ``TEMPLATES`` stays free for
   training-side negatives). The other relations are taken in order of their own edit's stream
   position, latest first, so that a prompt stays scoreable for as long a prefix of the stream as
   possible (``evaluate`` skips a specificity prompt whose (subject, relation) is itself edited in
   the evaluated stream). Steps 1-5 draw from the same random stream as before this field
   existed, so every earlier field of every record is unchanged; step 6 has its own seed.

Run: ``python scripts/build_edit_set.py`` (needs ``countryinfo`` and ``periodictable``;
only this script needs them, the engine reads the shipped files). Same output every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import periodictable
from countryinfo import all_countries

SEED = 20240630
POOL_SIZE = 300
OUT_DIR = Path(__file__).resolve().parent.parent / "lemoe_engine" / "data"

# Entries of countryinfo that are duplicates, historical or not countries in any sense.
EXCLUDE = {
    "Antarctica", "Antilles néerlandaises", "Burma", "Holy See (Vatican City State)",
    "Serbia and Montenegro", "United States Minor Outlying Islands",
    "French Southern and Antarctic Lands", "Heard Island and McDonald Islands",
    "Bouvet Island", "South Georgia",
}
THE_NAMES = {
    "Netherlands", "Philippines", "Maldives", "Seychelles", "Comoros", "Gambia", "Bahamas",
    "Vatican City State",
}

CURRENCIES = {  # ISO 4217 code -> common English name
    "USD": "US dollar", "EUR": "euro", "JPY": "Japanese yen", "GBP": "pound sterling",
    "CHF": "Swiss franc", "CNY": "Chinese yuan", "INR": "Indian rupee",
    "RUB": "Russian ruble", "BRL": "Brazilian real", "MXN": "Mexican peso",
    "KRW": "South Korean won", "TRY": "Turkish lira", "SEK": "Swedish krona",
    "NOK": "Norwegian krone", "DKK": "Danish krone", "PLN": "Polish zloty",
    "CAD": "Canadian dollar", "AUD": "Australian dollar", "ZAR": "South African rand",
    "EGP": "Egyptian pound", "THB": "Thai baht", "IDR": "Indonesian rupiah",
    "ILS": "Israeli shekel", "NGN": "Nigerian naira", "KES": "Kenyan shilling",
    "ARS": "Argentine peso", "VND": "Vietnamese dong", "PHP": "Philippine peso",
    "HUF": "Hungarian forint", "CZK": "Czech koruna", "UAH": "Ukrainian hryvnia",
    "MYR": "Malaysian ringgit", "PKR": "Pakistani rupee", "SAR": "Saudi riyal",
    "MAD": "Moroccan dirham",
}
LANGUAGES = {  # ISO 639-1 code -> English name
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "pt": "Portuguese",
    "ru": "Russian", "ar": "Arabic", "zh": "Chinese", "it": "Italian", "nl": "Dutch",
    "sw": "Swahili", "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "tr": "Turkish",
    "el": "Greek", "sv": "Swedish", "pl": "Polish", "fa": "Persian", "uk": "Ukrainian",
    "ro": "Romanian", "hu": "Hungarian", "fi": "Finnish", "th": "Thai", "vi": "Vietnamese",
    "id": "Indonesian", "ms": "Malay", "he": "Hebrew", "cs": "Czech", "da": "Danish",
    "no": "Norwegian",
}
LANGUAGE_CODES_BY_NAME = {name: code for code, name in LANGUAGES.items()}
CONTINENTS = ["Africa", "Asia", "Europe", "Oceania", "North America", "South America"]
# Countries on two continents: neither may become the counterfactual target.
TRANSCONTINENTAL = {
    "Russia": {"Europe", "Asia"}, "Turkey": {"Europe", "Asia"}, "Kazakhstan": {"Europe", "Asia"},
    "Georgia": {"Europe", "Asia"}, "Azerbaijan": {"Europe", "Asia"}, "Armenia": {"Europe", "Asia"},
    "Cyprus": {"Europe", "Asia"}, "Egypt": {"Africa", "Asia"}, "Indonesia": {"Asia", "Oceania"},
    "East Timor": {"Asia", "Oceania"}, "Papua New Guinea": {"Asia", "Oceania"},
}
REGION_TO_CONTINENTS = {
    "Africa": {"Africa"}, "Asia": {"Asia"}, "Europe": {"Europe"}, "Oceania": {"Oceania"},
    "Americas": {"North America", "South America"},
}

TEMPLATES = {
    "capital": [
        "What is the capital of {s}?",
        "What is the capital city of {s}?",
        "Which city is the capital of {s}?",
        "What city serves as the capital of {s}?",
        "Where is the seat of government of {s}?",
    ],
    "currency": [
        "What is the currency of {s}?",
        "What currency is used in {s}?",
        "What is the official currency of {s}?",
        "Which currency do people in {s} pay with?",
        "What money is legal tender in {s}?",
    ],
    "language": [
        "What is the official language of {s}?",
        "Which language is official in {s}?",
        "What language is officially spoken in {s}?",
        "Which official language does {s} have?",
        "What is the national language of {s}?",
    ],
    "continent": [
        "On which continent is {s} located?",
        "Which continent is {s} in?",
        "{S} is located on which continent?",
        "What continent does {s} belong to?",
        "In which continent can {s} be found?",
    ],
    "demonym": [
        "What is the demonym of {s}?",
        "What do you call a person from {s}?",
        "What is the word for someone from {s}?",
        "What is a native of {s} called?",
        "Which nationality adjective describes people from {s}?",
    ],
    "calling_code": [
        "What is the international calling code of {s}?",
        "What is the telephone country code of {s}?",
        "Which dialling code do you use to phone {s}?",
        "What is the country calling code for {s}?",
        "Which phone prefix is used for calls to {s}?",
    ],
    "tld": [
        "What is the internet country code top-level domain of {s}?",
        "Which top-level domain is used by {s}?",
        "What is the internet domain of {s}?",
        "Which web domain suffix belongs to {s}?",
        "What domain ending do websites from {s} use?",
    ],
}

# Same-subject specificity prompts only (disjoint from TEMPLATES, so never an edit prompt).
SPEC_TEMPLATES = {
    "capital": ["Which city is the national capital of {s}?", "Name the capital of {s}."],
    "currency": ["What currency does {s} use?", "Name the currency of {s}."],
    "language": ["What language do the people of {s} officially speak?",
                 "Name the official language of {s}."],
    "continent": ["Which continent is home to {s}?", "Name the continent where {s} lies."],
    "demonym": ["What are people from {s} called?", "Name the demonym for {s}."],
    "calling_code": ["What is the dialing code for {s}?", "Name the international phone code of {s}."],
    "tld": ["What is the top-level domain of {s}?", "Name the internet domain suffix of {s}."],
}
SPEC_SEED = SEED + 1
SPEC_PER_EDIT = 2


def short(value: str) -> bool:
    return len(value) <= 14 and len(value.split()) <= 2


def display_name(name: str) -> tuple[str, str]:
    """Return (subject as stored, subject as written mid-sentence)."""
    if name.startswith("The "):
        name = name[4:]
        return name, "the " + name
    needs_the = (
        name in THE_NAMES
        or name.endswith(("Islands", "Republic", "Lands", "Emirates", "States", "Kingdom"))
        or name.startswith(("Republic of", "Democratic Republic", "Federated States", "Isle of"))
    )
    return name, ("the " + name if needs_the else name)


def clean_codes(codes) -> list[str]:
    out = []
    for c in codes or []:
        c = str(c).replace("+", "").replace("-", "").replace(" ", "")
        if c.isdigit():
            out.append(c)
    return out


def load_subjects() -> list[dict]:
    subjects = []
    for info in sorted((c.info() for c in all_countries()), key=lambda v: v["name"]):
        name = info.get("name") or ""
        if not name or name in EXCLUDE or "," in name or "(" in name:
            continue
        subject, mention = display_name(name)
        facts = {}
        capitals = info.get("capital") or []
        capitals = [capitals] if isinstance(capitals, str) else capitals
        capitals = {c.strip() for c in capitals if c.strip()}
        if capitals and not any("/" in c or "," in c for c in capitals):
            facts["capital"] = capitals
        currencies = set(info.get("currencies") or [])
        if currencies:
            facts["currency"] = currencies
        languages = {LANGUAGE_CODES_BY_NAME.get(x, x) for x in info.get("languages") or []}
        if languages:
            facts["language"] = languages
        region = info.get("region") or ""
        if region in REGION_TO_CONTINENTS:
            facts["continent"] = REGION_TO_CONTINENTS[region] | TRANSCONTINENTAL.get(name, set())
        demonym = (info.get("demonym") or "").strip()
        if demonym and "," not in demonym and demonym.lower() not in name.lower():
            facts["demonym"] = {demonym}
        codes = clean_codes(info.get("callingCodes"))
        if codes:
            facts["calling_code"] = set(codes)
        tlds = [t for t in info.get("tld") or [] if t.startswith(".") and t[1:].isascii()]
        if tlds:
            facts["tld"] = set(tlds)
        subjects.append({"subject": subject, "mention": mention, "facts": facts})
    return subjects


def target_pools(subjects: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """relation -> sorted list of (fact value, target text) usable as counterfactuals."""
    pools: dict[str, set[tuple[str, str]]] = {r: set() for r in TEMPLATES}
    for s in subjects:
        f = s["facts"]
        for cap in f.get("capital", ()):
            # Skip city-states and capitals named after their country (Kuwait City, ...).
            if short(cap) and s["subject"].split()[0] not in cap:
                pools["capital"].add((cap, cap))
        for dem in f.get("demonym", ()):
            if short(dem) and " " not in dem:
                pools["demonym"].add((dem, dem))
        for code in f.get("calling_code", ()):
            if len(code) <= 3:
                pools["calling_code"].add((code, "+" + code))
        for tld in f.get("tld", ()):
            if len(tld) == 3:
                pools["tld"].add((tld, tld))
    pools["currency"] = {(c, n) for c, n in CURRENCIES.items()}
    pools["language"] = {(c, n) for c, n in LANGUAGES.items()}
    pools["continent"] = {(c, c) for c in CONTINENTS}
    return {r: sorted(p) for r, p in pools.items()}


def build_edits(rng: random.Random) -> list[dict]:
    subjects = load_subjects()
    pools = target_pools(subjects)
    edits = []
    for s in subjects:
        for relation, true_values in sorted(s["facts"].items()):
            candidates = [t for v, t in pools[relation] if v not in true_values and t not in true_values]
            if not candidates:
                continue
            target = rng.choice(candidates)
            prompt_t, rephrase_t = rng.sample(TEMPLATES[relation], 2)
            fill = dict(s=s["mention"], S=s["mention"][0].upper() + s["mention"][1:])
            edits.append({
                "subject": s["subject"],
                "relation": relation,
                "src": prompt_t.format(**fill),
                "alt": target,
                "rephrase": rephrase_t.format(**fill),
            })
    return edits


def true_value_text(relation: str, values: set[str]) -> str:
    """The real value as an answer text (used for teacher-forced specificity positions)."""
    value = sorted(values)[0]
    if relation == "currency":
        return CURRENCIES.get(value, value)
    if relation == "language":
        return LANGUAGES.get(value, value)
    if relation == "calling_code":
        return "+" + value
    return value


def add_specificity(edits: list[dict], rng: random.Random) -> None:
    """Same-subject prompts about other relations (see the module docstring, step 6)."""
    subjects = {s["subject"]: s for s in load_subjects()}
    position = {(e["subject"], e["relation"]): i for i, e in enumerate(edits)}
    for e in edits:
        s = subjects[e["subject"]]
        others = [r for r in sorted(s["facts"]) if r != e["relation"]]
        others.sort(key=lambda r: -position.get((e["subject"], r), len(edits)))
        chosen = others[:SPEC_PER_EDIT]
        fill = dict(s=s["mention"], S=s["mention"][0].upper() + s["mention"][1:])
        e["specificity"] = [rng.choice(SPEC_TEMPLATES[r]).format(**fill) for r in chosen]
        e["specificity_ans"] = [true_value_text(r, s["facts"][r]) for r in chosen]
        e["specificity_relation"] = chosen
    spec = {p for e in edits for p in e["specificity"]}
    assert not spec & {e[k] for e in edits for k in ("src", "rephrase", "loc")}


# ---------------------------------------------------------------- unrelated facts
def element_facts() -> list[tuple[str, str]]:
    facts = []
    for el in periodictable.elements:
        if el.number < 1:
            continue
        name = el.name.capitalize()
        facts += [
            (f"What is the chemical symbol of {el.name}?", el.symbol),
            (f"Which chemical element has the symbol {el.symbol}?", name),
            (f"What is the atomic number of {el.name}?", str(el.number)),
            (f"Which chemical element has atomic number {el.number}?", name),
        ]
    return facts


def arithmetic_facts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    seen, facts = set(), []
    while len(facts) < n:
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            a, b = rng.randint(2, 19), rng.randint(2, 12)
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 99)
        if op == "minus" and a <= b:
            a, b = b + rng.randint(1, 50), a
        key = (op, min(a, b), max(a, b)) if op != "minus" else (op, a, b)
        if key in seen:
            continue
        seen.add(key)
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        facts.append((f"What is {a} {op} {b}?", str(value)))
    return facts


def unit_facts() -> list[tuple[str, str]]:
    units = [("minutes", "hours", 60), ("seconds", "minutes", 60), ("grams", "kilograms", 1000),
             ("centimeters", "meters", 100), ("days", "weeks", 7), ("months", "years", 12),
             ("hours", "days", 24), ("millimeters", "centimeters", 10)]
    return [(f"How many {small} are in {k} {big}?", str(k * f))
            for small, big, f in units for k in range(2, 41)]


def sequence_facts() -> list[tuple[str, str]]:
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    facts = []
    for seq, kind in ((months, "month"), (days, "day of the week")):
        for i, x in enumerate(seq):
            facts.append((f"Which {kind} comes after {x}?", seq[(i + 1) % len(seq)]))
            facts.append((f"Which {kind} comes before {x}?", seq[i - 1]))
    for i in range(25):
        facts.append((f"Which letter of the alphabet comes after {letters[i]}?", letters[i + 1]))
        facts.append((f"Which letter of the alphabet comes before {letters[i + 1]}?", letters[i]))
    return facts


def split_unrelated(rng: random.Random, n_loc: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (scored loc facts, pool prompts): disjoint by construction."""
    fixed = {"elements": element_facts(), "units": unit_facts(), "sequences": sequence_facts()}
    n_fixed = sum(len(v) for v in fixed.values())
    domains = dict(fixed, arithmetic=arithmetic_facts(rng, max(0, n_loc + POOL_SIZE - n_fixed) + 200))
    total = sum(len(v) for v in domains.values())
    pool, loc = [], []
    for name in sorted(domains):
        facts = domains[name]
        rng.shuffle(facts)
        k = round(POOL_SIZE * len(facts) / total)
        pool += [p for p, _ in facts[:k]]
        loc += facts[k:]
    rng.shuffle(loc)
    loc = loc[:n_loc]
    assert len(loc) == n_loc, "not enough unrelated facts"
    assert not set(pool) & {p for p, _ in loc}
    rng.shuffle(pool)
    return loc, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    rng = random.Random(SEED)
    edits = build_edits(rng)
    rng.shuffle(edits)
    loc, pool = split_unrelated(rng, len(edits))
    for edit, (q, a) in zip(edits, loc):
        edit["loc"], edit["loc_ans"] = q, a
    add_specificity(edits, random.Random(SPEC_SEED))
    keys = ("subject", "relation", "src", "alt", "rephrase", "loc", "loc_ans",
            "specificity", "specificity_ans", "specificity_relation")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "country_edits.jsonl", "w", encoding="utf-8") as f:
        for e in edits:
            f.write(json.dumps({k: e[k] for k in keys}, ensure_ascii=False) + "\n")
    with open(args.out_dir / "unrelated_prompts.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(pool) + "\n")
    counts: dict[str, int] = {}
    for e in edits:
        counts[e["relation"]] = counts.get(e["relation"], 0) + 1
    assert not {p for e in edits for p in e["specificity"]} & set(pool)
    n_spec = sum(len(e["specificity"]) for e in edits)
    print(f"{len(edits)} edits {counts}; {n_spec} specificity prompts; "
          f"{len(pool)} unrelated pool prompts -> {args.out_dir}")


if __name__ == "__main__":
    main()

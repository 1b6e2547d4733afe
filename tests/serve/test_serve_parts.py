"""The serving parts that need no cluster: text streaming with stop strings, prompt templates, settings."""
from __future__ import annotations

import asyncio

import pytest

from model.prompts import CHAT_STOP, chat_query, rag_prompt, render_chat
from model.tokenizer import Tokenizer
from serve.app import deployment_options, load_settings
from serve.bank_version import BankVersion, CurrentVersion
from serve.text_stream import TextStream
from serve_testing import city_documents


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([d["text"] for d in city_documents()], vocab_size=400)


def stream_by_token(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push([t]) for t in tokenizer.encode(text)]
    return pieces + [stream.flush()], stream


def test_text_is_released_whole_characters_only(tokenizer):
    text = "Osaka 大阪 is in 日本. Kraków!"  # CJK characters fall apart into byte tokens
    assert len(tokenizer.encode("大阪")) > 2
    pieces, stream = stream_by_token(tokenizer, text, [])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert not stream.stopped


def test_a_stop_string_split_over_tokens_is_never_released(tokenizer):
    text = "Lyon is a city in France. It has a population"
    pieces, stream = stream_by_token(tokenizer, text, ["in Fra", "zzz"])
    assert "".join(pieces) == "Lyon is a city " and stream.stopped
    assert all("Fra" not in p for p in pieces)
    pieces, _ = stream_by_token(tokenizer, "Lyon is a city in", ["in Fra"])  # a prefix only: released at the end
    assert "".join(pieces) == "Lyon is a city in"


def test_templates():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Lyon?"},
                {"role": "assistant", "content": "France."}, {"role": "user", "content": "And Osaka?"}]
    assert render_chat(messages) == ("System: Be brief.\nUser: Where is Lyon?\nAssistant: France.\n"
                                     "User: And Osaka?\nAssistant:")
    assert chat_query(messages) == "And Osaka?" and "\nUser:" in CHAT_STOP
    assert rag_prompt(["Osaka is in Japan. ", "Lyon is in France."], "Q") == (
        "Reference: Osaka is in Japan.\nReference: Lyon is in France.\nQ")


def test_settings_reject_unknown_keys_and_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_settings({"checkpoint": "ckpt", "bank": "s3://b/bank", "decoding": {"max_batch_size": 4}})
    assert cfg.checkpoint == str(tmp_path / "ckpt") and cfg.bank == "s3://b/bank"
    assert cfg.decoding.max_batch_size == 4 and cfg.decoding.device == "cpu"  # the rest from configs/serve.yaml
    for bad, message in [({"checkpoint": "c", "decodng": {}}, "unknown serve setting"),
                         ({"bank": "b"}, "checkpoint="),
                         ({"checkpoint": "c", "defaults": {"memory_mode": "all"}}, "memory_mode"),
                         ({"checkpoint": "c", "deployments": {"bank_writer": {"num_replicas": 2}}}, "one replica"),
                         # Ray itself ignores an unknown autoscaling key: a typo would mean one replica for good
                         ({"checkpoint": "c", "deployments": {"generator": {"autoscaling_config": {
                             "max_replica": 4}}}}, r"generator.autoscaling_config has unknown keys \['max_replica'\]"),
                         ({"checkpoint": "c", "deployments": {"retriever": {"autoscaling_config": {
                             "min_replicas": 3, "max_replicas": 2}}}}, "retriever.autoscaling_config: .*max_replicas")]:
        with pytest.raises(ValueError, match=message):
            load_settings(bad)


def test_deployment_options_use_replicas_or_autoscaling():
    cfg = load_settings({"checkpoint": "c", "deployments": {"generator": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}, "num_gpus": 1}}})
    generator = deployment_options(cfg.deployments.generator)
    assert generator["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in generator and generator["ray_actor_options"]["num_gpus"] == 1.0
    assert deployment_options(cfg.deployments.retriever)["num_replicas"] == 1


def test_bank_versions_order_live_edits_and_compactions():
    loaded = BankVersion.of({"references": 20, "tombstones": [3]})
    assert str(loaded) == "0.20.1" and BankVersion.parse("0.20.1") == loaded
    assert loaded.is_behind(BankVersion(0, 21, 1)) and loaded.is_behind(BankVersion(0, 20, 2))
    assert not loaded.is_behind(BankVersion(0, 20, 1)) and not loaded.is_behind(BankVersion(0, 19, 0))
    assert not loaded.is_behind(None)
    compacted = BankVersion.of({"generation": 1, "references": 19, "tombstones": []})  # fewer rows, yet newer
    assert loaded.is_behind(compacted) and not compacted.is_behind(loaded)
    assert compacted.is_behind(BankVersion(1, 19, 1)) and not compacted.is_behind(BankVersion(0, 30, 5))


def test_requests_waiting_together_share_one_version_call_and_never_read_a_version_older_than_themselves():
    async def scenario():
        state = {"version": 0}
        began: list[int] = []
        release = asyncio.Event()

        async def ask() -> str:
            read = state["version"]  # a call reads the writer's state when it begins
            began.append(read)
            await release.wait()
            return str(read)

        current = CurrentVersion(ask)
        first = [asyncio.create_task(current.get()) for _ in range(5)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert current.calls == 1  # five requests, one call on its way
        state["version"] = 1  # an admin write lands while that call is on its way
        later = [asyncio.create_task(current.get()) for _ in range(3)]  # arrived after the write
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*first) == ["0"] * 5
        assert await asyncio.gather(*later) == ["1"] * 3  # not the call on its way: read-after-write
        assert current.calls == 2 and began == [0, 1]  # the later three shared the second call

        # a failing call fails its waiters only; the next request asks again
        def boom():
            raise ConnectionError("writer gone")

        async def failing() -> str:
            await asyncio.sleep(0)
            boom()

        current.ask = failing
        waiters = [asyncio.create_task(current.get()) for _ in range(2)]
        for w in waiters:
            with pytest.raises(ConnectionError):
                await w
        current.ask = ask
        assert await current.get() == "1" and current.calls == 4

        # a request that leaves (client gone) does not cancel the call the others wait on
        release.clear()
        leaving, staying = asyncio.create_task(current.get()), asyncio.create_task(current.get())
        await asyncio.sleep(0)
        leaving.cancel()
        release.set()
        assert await staying == "1" and current.calls == 5 and leaving.cancelled()

    asyncio.run(scenario())


def test_a_bank_from_other_weights_is_refused(tiny_checkpoint, tiny_bank, tmp_path):
    """Memories are readable only by the weights that wrote them (paper App. A, Remark 9)."""
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint
    from serve.app import build_app

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(1.01)
    other = save_checkpoint(tmp_path / "other", model, tokenizer)
    with pytest.raises(ValueError, match="re-encode"):
        build_app({"checkpoint": str(other), "bank": tiny_bank})
    assert build_app({"checkpoint": str(other), "bank": tiny_bank, "check_bank": False}) is not None

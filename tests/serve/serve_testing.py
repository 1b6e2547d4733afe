"""Test data for the serve tests: city documents, a real bank built by the bank code, a free port."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator


CITIES = [("Lyon", "France", "Central European"), ("Osaka", "Japan", "Japan Standard"),
          ("Recife", "Brazil", "Brasilia"), ("Perth", "Australia", "Australian Western"),
          ("Tromso", "Norway", "Central European"), ("Cusco", "Peru", "Peru"), ("Mombasa", "Kenya", "East Africa"),
          ("Quebec", "Canada", "Eastern"), ("Izmir", "Turkey", "Turkey"), ("Chiang Mai", "Thailand", "Indochina"),
          ("Bergen", "Norway", "Central European"), ("Cordoba", "Argentina", "Argentina"),
          ("Da Nang", "Vietnam", "Indochina"), ("Kraków", "Poland", "Central European"),
          ("Seville", "Spain", "Central European"), ("Tabriz", "Iran", "Iran"), ("Cebu", "Philippines", "Philippine"),
          ("Leeds", "United Kingdom", "Greenwich"), ("Porto", "Portugal", "Western European"),
          ("Daejeon", "South Korea", "Korea")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def city_documents() -> list[dict]:
    return [{"id": f"city-{i}", "text": f"{name} is a city in {country}. It has a population of about "
                                        f"{(i + 3) * 137} thousand people. {name} lies in the {tz} time zone."}
            for i, (name, country, tz) in enumerate(CITIES)]


def build_bank(path: str, checkpoint: str, documents: list[dict], quantizer: str | None = None) -> str:
    """A real bank written by the bank code: an empty bank, the documents encoded and appended, a Flat index.
    With `quantizer` (a FAISS factory), codebooks are trained by the encode job's own task function on the
    memories of these documents, and the bank stores VQ codes."""
    from bank.chunking import chunk_documents, documents_from_dicts, reference_to_dict
    from bank.edits import append_documents
    from bank.embedder import Embedder
    from bank.format import weights_sha256
    from bank.index import update_index
    from bank.manifest import create_bank
    from model.checkpoint import load_checkpoint
    from model.quantizer import MemoryQuantizer
    from pipelines.encode import _train_quantizer

    model, tokenizer = load_checkpoint(checkpoint)
    embedder = Embedder()
    q = None
    if quantizer:
        refs = chunk_documents(documents_from_dicts(documents)[0], tokenizer, model.cfg.reference_len)
        data = _train_quantizer(checkpoint, [reference_to_dict(r) for r in refs], quantizer, 32, "cpu", "float32",
                                torch_threads=1, quantizer_threads=1)
        q = MemoryQuantizer.from_bytes(data, quantizer, model.cfg.head_dim)
    create_bank(path, config=model.cfg, model_sha256=weights_sha256(checkpoint), tokenizer_sha256=tokenizer.sha256,
                quantizer=q, embedder=embedder.spec(), shard_documents=8)
    append_documents(path, documents, model, tokenizer, embedder)
    update_index(path, factory="Flat")
    return path


@contextmanager
def serving(app_name: str, args: dict, timeout_s: float = 180) -> Iterator[str]:
    """The serving application on a free 127.0.0.1 port, healthy; yields its URL and shuts Serve down after."""
    from ray import serve

    from serve.app import build_app, serve_running, wait_healthy

    port = free_port()
    assert not serve_running(), "an earlier test left Ray Serve running: it would keep its own HTTP port"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name=app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s)
        yield url
    finally:
        serve.shutdown()

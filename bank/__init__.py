"""The memory bank: sparse explicit memories on disk or S3, their texts and retrieval index (paper §3.1, §3.3).

Ray-free, so the Ray jobs (pipelines/) and the Ray Serve app (serve/) both build on it:

    storage.py       local paths and s3:// behind one API
    chunking.py      corpus files -> validated documents -> reference chunks
    format.py        the fixed-size record of one reference's memory, checksums, BankError
    manifest.py      creating a bank, writing and committing shards (manifest.json is the commit point)
    reader.py        MemoryBank: rows, records, texts, embeddings, verify
    store.py         MemoryStore: memories by row through the RAM cache (LRU, prefetch)
    embedder.py      texts -> unit vectors for retrieval
    index.py         the FAISS index (build, update, remove) and Retriever
    shard_encoder.py references -> records + embeddings with the model's memory layers
    edits.py         live edits: append documents, delete references
    checkpoints.py   model checkpoints on local disk or S3, and the dtype setting
"""

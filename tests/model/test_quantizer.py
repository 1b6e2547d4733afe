"""Vector-quantized memory: bounded reconstruction error, the torch codec's codes and vectors equal to FAISS's, the
`auto` codec per model shape, and the byte counts `memory3 info` reports."""
import numpy as np
import pytest
import torch

from configs import load_config
from memory3.info import describe
from model.config import ModelConfig
from model.encoder import encode_references
from model.quantizer import (PAPER_FACTORY, MemoryQuantizer, TorchCodec, _fused_kernel, default_factory, factory_for,
                             nearest_centroids, pack_bits, relative_error, resolve_factory, unpack_bits)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The fused kernel's ids may differ from the torch fp32 path's only where the two centroids' exact distances differ
# by less than this fraction of ||x||^2 + ||c||^2: the size of the terms either fp32 computation rounds.
NEAR_TIE = 1e-5


@pytest.fixture(scope="module")
def memories():
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300)
    model = Transformer(cfg).eval()
    tokens = torch.randint(5, 300, (400, cfg.reference_len))
    return cfg, encode_references(model, tokens, torch.full((400,), cfg.reference_len), [2, 4]).memories


def test_roundtrip_error_is_bounded(memories):
    cfg, mem = memories
    train, test = mem[:300], mem[300:]
    q = MemoryQuantizer("OPQ8_32,PQ8x8", cfg.head_dim)
    q.train(train)
    codes = q.encode(test)
    assert codes.dtype == np.uint8 and codes.shape == (*test.shape[:-1], q.code_size)
    restored = q.decode(codes)
    err = relative_error(test, restored)
    # a real codec beats replacing every vector by the training mean by a wide margin
    mean = train.reshape(-1, cfg.head_dim).mean(0)
    baseline = relative_error(test, mean.expand_as(test))
    assert err < 0.35, err
    assert err < 0.5 * baseline, (err, baseline)
    again = MemoryQuantizer.from_bytes(q.to_bytes(), q.factory, cfg.head_dim)
    assert np.array_equal(again.encode(test), codes)  # codebooks survive serialisation


def test_paper_quantizer_is_14_bytes_and_matches_info():
    cfg = load_config("info", ["model=2.4b"])
    info = describe(cfg)
    assert info["quantizer"] == PAPER_FACTORY and info["encode_default"] == PAPER_FACTORY
    q = MemoryQuantizer(info["quantizer"], 80)
    vectors = 22 * 2 * 8 * 8
    assert q.code_size == 14
    assert info["reference_memory_bytes"] == {"dense": 72_089_600, "sparse": vectors * 80 * 2,
                                              "quantized": vectors * 14}
    assert info["reference_memory_bytes"]["quantized"] == 39_424  # paper App. B: 2816 vectors x 14 B


def test_quantized_bytes_match_info_for_tiny(memories):
    cfg, mem = memories
    info = describe(load_config("info", ["model=tiny", "quantizer=OPQ8_32,PQ8x8"]))
    q = MemoryQuantizer("OPQ8_32,PQ8x8", cfg.head_dim)
    q.train(mem[:300])
    assert q.encode(mem[:1]).nbytes == info["reference_memory_bytes"]["quantized"]
    assert mem[:1].to(torch.bfloat16).numel() * 2 == info["reference_memory_bytes"]["sparse"]


def test_bad_factory_and_untrained_use_fail_clearly():
    with pytest.raises(ValueError, match="FAISS cannot build"):
        MemoryQuantizer("NotAnIndex", 32)
    with pytest.raises(RuntimeError, match="not trained"):
        MemoryQuantizer("PQ4x8", 32).encode(np.zeros((2, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="kernel precision 'tf16'"):  # on any device, before any dispatch
        nearest_centroids(torch.zeros(2, 8), torch.zeros(2, 4, 4), kernel="tf16")


@pytest.fixture
def one_faiss_thread():
    """Training is single-threaded: OpenMP teams spin on a shared 2-core box and slow k-means 10x."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# Each supported codec structure, small enough to train in seconds: PQ alone, OPQ + PQ, the paper's
# OPQ + Residual (2-part multi-index coarse) + PQ with codes that straddle bytes, IVF-PQ with a flat coarse
# quantizer, and a PCA rotation in front of it.
CODEC_FACTORIES = ["PQ4x6", "OPQ8_32,PQ8x8", "OPQ8_32,Residual2x5,PQ4x6", "IVF16,PQ8x6", "PCAR32,IVF16,PQ4x8"]


@pytest.mark.parametrize("factory", CODEC_FACTORIES)
def test_torch_codec_equals_faiss_sa_encode_and_sa_decode(factory, one_faiss_thread):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 32)) * rng.uniform(0.1, 3.0, 32) + rng.uniform(-1, 1, 32)).astype(np.float32)
    q = MemoryQuantizer(factory, 32)
    q.train(x)
    codes = q.encode(x[:1000].reshape(10, 100, 32))  # leading shape is kept
    assert codes.shape == (10, 100, q.code_size)
    expected = q.index.sa_decode(codes.reshape(-1, q.code_size)).reshape(10, 100, 32)
    codec = q.torch_codec()
    assert codec is not None
    got = codec.decode(torch.from_numpy(codes))
    assert got.dtype == torch.float32 and got.shape == (10, 100, 32)
    assert np.abs(got.numpy() - expected).max() < 1e-4
    assert relative_error(torch.from_numpy(x[:1000]), got.reshape(-1, 32)) < 0.9  # real vectors, not noise
    again = MemoryQuantizer.from_bytes(q.to_bytes(), factory, 32).torch_codec()  # codebooks as a bank stores them
    torch.testing.assert_close(again.decode(torch.from_numpy(codes)), got, atol=0, rtol=0)
    # encoding: FAISS's codes bit for bit (every stage's nearest centroids, packed as FAISS packs them), in chunks
    encoded = codec.encode(torch.from_numpy(x).reshape(30, 100, 32), chunk=128)
    assert encoded.dtype == torch.uint8 and encoded.shape == (30, 100, q.code_size)
    np.testing.assert_array_equal(encoded.reshape(-1, q.code_size).numpy(), q.index.sa_encode(x))


def test_bits_pack_and_unpack_as_faiss_lays_them_out():
    rng = np.random.default_rng(3)
    for first_bit, nbits, count in [(0, 14, 2), (32, 10, 8), (3, 6, 5), (0, 8, 4), (5, 16, 3)]:
        ids = torch.from_numpy(rng.integers(0, 1 << nbits, (50, count)))
        size = (first_bit + nbits * count + 7) // 8
        packed = torch.zeros(50, size + 8, dtype=torch.int64)
        pack_bits(packed, ids, first_bit, nbits)
        codes = packed[:, :size].to(torch.uint8)
        assert packed[:, size:].eq(0).all() and packed.le(255).all()  # every field inside its bytes
        torch.testing.assert_close(unpack_bits(codes, first_bit, nbits, count), ids, atol=0, rtol=0)
        bits = np.unpackbits(codes.numpy(), axis=1, bitorder="little")  # FAISS's BitstringWriter: little-endian
        for j in range(count):
            field = bits[:, first_bit + j * nbits: first_bit + (j + 1) * nbits]
            np.testing.assert_array_equal(field @ (1 << np.arange(nbits)), ids[:, j].numpy())


def test_unsupported_factories_fall_back_to_faiss(one_faiss_thread):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    q = MemoryQuantizer("RQ2x6", 16)  # a residual quantizer the torch codec does not read
    q.train(x)
    with pytest.raises(NotImplementedError, match="IndexResidualQuantizer"):
        TorchCodec.from_faiss(q.index)
    assert q.torch_codec() is None and q.torch_codec("cuda") is None  # never built, on any device
    codes = q.encode(x[:50])
    np.testing.assert_array_equal(codes, q.index.sa_encode(x[:50]))
    np.testing.assert_array_equal(q.decode(codes).numpy(), q.index.sa_decode(codes))


def test_auto_codec_per_model_shape():
    big, tiny = ModelConfig.from_name("2.4b"), ModelConfig.from_name("tiny")
    assert factory_for(80) == PAPER_FACTORY == default_factory(big) == resolve_factory("auto", big)
    assert default_factory(tiny) is None and resolve_factory("auto", tiny) is None  # the CPU preset stays bf16
    assert resolve_factory(None, big) is None and resolve_factory("PQ4x8", tiny) == "PQ4x8"  # explicit values win
    wide = ModelConfig.from_name("2.4b", head_dim=128)
    assert default_factory(wide) == factory_for(128) == "OPQ32_128,Residual2x14,PQ16x10"
    for dim in (64, 80, 96, 128):  # about the paper's 14 B per 80 dims (0.175 B a dim)
        code_size = MemoryQuantizer(factory_for(dim), dim).code_size
        assert 0.14 < code_size / dim < 0.25, (dim, code_size)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("factory, dim", [("OPQ8_32,Residual2x5,PQ4x6", 32), ("IVF16,PQ8x6", 32),
                                          ("Residual2x10,PQ8x10", 80)])  # the paper's sub-space shapes, K smaller
@pytest.mark.parametrize("kernel, agree, error_ratio", [("tf32x3", 0.999, 1.001), ("tf32", 0.95, 1.005)])
def test_gpu_torch_codec_encodes_as_faiss(factory, dim, kernel, agree, error_ratio, one_faiss_thread):
    """The codes a GPU encoder ships (the fused nearest-centroid kernel): FAISS's, and the torch GEMM path's, up to
    near-ties the GPU may break the other way; a reconstruction error no worse than FAISS's. One-pass tf32 rounds
    the distances more coarsely, so it breaks more near-ties another way: its codes may differ more, its error
    may not."""
    assert _fused_kernel() is not None, "CUDA torch ships Triton: the encoder would fall back to the torch GEMMs"
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((20000, dim)) * rng.uniform(0.1, 3.0, dim)).astype(np.float32)
    q = MemoryQuantizer(factory, dim)
    q.train(x[:4000])
    codes = q.encode_tensor(torch.from_numpy(x).cuda(), kernel)
    assert codes.device.type == "cuda" and codes.dtype == torch.uint8
    expected = q.index.sa_encode(x)
    assert (codes.cpu().numpy() == expected).all(1).mean() > agree
    torch_path = q.torch_codec("cuda").encode(torch.from_numpy(x).cuda(), kernel=None)
    assert (codes == torch_path).all(1).float().mean() > agree
    restored = q.decode(codes, "cuda").cpu()
    assert relative_error(torch.from_numpy(x), restored) <= error_ratio * relative_error(
        torch.from_numpy(x), torch.from_numpy(q.index.sa_decode(expected)))


def assert_equal_up_to_near_ties(x: torch.Tensor, books: torch.Tensor, got: torch.Tensor, want: torch.Tensor):
    """got and want (N, M) ids differ only where their exact (float64) distances to x are within NEAR_TIE, and got's
    total squared error is want's up to rounding."""
    m, _, dsub = books.shape
    sub = x.double().reshape(len(x), m, dsub)
    c_got, c_want = (books.double()[torch.arange(m, device=x.device), ids] for ids in (got, want))  # (N, M, dsub)
    d_got, d_want = ((sub - c_got) ** 2).sum(-1), ((sub - c_want) ** 2).sum(-1)
    scale = (sub * sub).sum(-1) + (c_want * c_want).sum(-1)
    differ = got != want
    assert ((d_got - d_want).abs() <= NEAR_TIE * scale)[differ].all(), "a choice differs beyond a near-tie"
    assert differ.float().mean() < 1e-3
    assert d_got.sum() <= d_want.sum() * (1 + 1e-7)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m, k, dsub", [(1, 16384, 80), (2, 16384, 40), (2, 16384, 32), (8, 1024, 10), (8, 1024, 8)])
def test_gpu_fused_nearest_centroids_match_torch_fp32(m, k, dsub):
    """The kernel (through `nearest_centroids`' dispatch) against the torch fp32 GEMM + argmin on the codec shapes
    that matter: the paper's coarse stage (2 x 16,384 centroids of 40 dims; one of 80 as a single table), the 100M
    preset's (32 dims), and the PQ8x10 stages (10 and 8 dims). Exact ties go to the first centroid, as argmin."""
    assert _fused_kernel() is not None
    g = torch.Generator(device="cuda").manual_seed(5)
    books = torch.randn(m, k, dsub, device="cuda", generator=g)
    books[:, -1] = books[:, 0]  # an exact tie between the first and the last centroid
    x = torch.randn(20000, m * dsub, device="cuda", generator=g)
    x[:100] = books[:, 0].reshape(-1) + 0.1 * x[:100]  # rows near the tied pair
    got = nearest_centroids(x, books)
    want = nearest_centroids(x, books, kernel=None)
    torch.testing.assert_close(got, _fused_kernel().nearest_centroids_fused(x, books), atol=0, rtol=0)  # dispatched
    assert got.dtype == torch.int64 and got.shape == (20000, m)
    assert got[:100].ne(k - 1).all()
    assert_equal_up_to_near_ties(x, books, got, want)

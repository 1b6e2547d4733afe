"""GPU forms of the model: FlexAttention training form, bf16 decoding and the compiled prefill agree with the
reference forms."""
import copy

import pytest
import torch

from model.encoder import encode_references
from model.generate import Retrieved, generate
from model.transformer import MemoryBatch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

SINK = [2, 4]


def _batch(model, W, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    M = W * cfg.refs_per_window
    refs = torch.randint(5, cfg.vocab_size, (M, cfg.reference_len), generator=g)
    lengths = torch.randint(cfg.mem_tokens, cfg.reference_len + 1, (M,), generator=g)
    mem = encode_references(model, refs, lengths, SINK)
    visible = torch.eye(W, dtype=torch.bool).repeat_interleave(cfg.refs_per_window, dim=1)[None]
    T = cfg.sink_len + W * cfg.window
    idx = torch.randint(5, cfg.vocab_size, (1, T), generator=g)
    return idx, mem, visible


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 6e-2)])
def test_flex_training_form_matches_cpu_sdpa(make_model, dtype, tol):
    model = make_model(window=64, reference_len=32, mem_tokens=8, max_seq_len=600, head_dim=16)  # flex: d >= 16
    idx, mem, visible = _batch(model, W=5)
    pos = torch.arange(idx.shape[1])[None]
    cpu = model(idx, memory=MemoryBatch.from_references(mem.memories[None], mem.n_valid[None], visible, pos, model.cfg))
    plain_cpu = model(idx)
    gpu_model = copy.deepcopy(model).to("cuda", dtype)
    mb = MemoryBatch.from_references(mem.memories[None].cuda(), mem.n_valid[None].cuda(), visible.cuda(), pos.cuda(),
                                     model.cfg)
    gpu = gpu_model(idx.cuda(), memory=mb)  # CUDA + no cache: FlexAttention block mask
    assert (gpu.float().cpu() - cpu).abs().max() < tol * cpu.abs().max()
    plain_gpu = gpu_model(idx.cuda())  # plain causal kernel
    assert (plain_gpu.float().cpu() - plain_cpu).abs().max() < tol * plain_cpu.abs().max()


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_decoding_with_memory_matches_full_forward(make_model, compiled):
    cpu_model = make_model(window=64, reference_len=32, mem_tokens=8, max_seq_len=600, head_dim=16)
    cfg = cpu_model.cfg
    idx, mem, _ = _batch(cpu_model, W=3)
    model = copy.deepcopy(cpu_model).to("cuda", torch.bfloat16)
    sets = mem.memories.view(3, cfg.refs_per_window, *mem.memories.shape[1:]).cuda()
    valid = mem.n_valid.view(3, cfg.refs_per_window).cuda()
    used = []

    def retrieve(row, query):
        used.append(len(used) % 3)
        return Retrieved(sets[used[-1]], valid[used[-1]], ids=[used[-1]])

    prompt = idx[0, :70].tolist()
    steps = list(generate(model, [prompt], 100, retrieve=retrieve, compile=compiled))
    assert len(steps) == 100 and len(used) == 3  # windows 0 and 1 of the prompt, then window 2 while decoding
    seq = prompt + [s.tokens[0] for s in steps]
    # replay in one bf16 forward with each window's memories (the flex training form)
    T = len(seq)
    W = (T - 1 - cfg.sink_len) // cfg.window + 1
    window_sets = [0, 1, 2, 2][:W]
    mems = torch.stack([sets[i] for i in window_sets]).flatten(0, 1)[None]
    n_valid = torch.stack([valid[i] for i in window_sets]).flatten()[None]
    visible = torch.eye(W, dtype=torch.bool, device="cuda").repeat_interleave(cfg.refs_per_window, 1)[None]
    pos = torch.arange(T, device="cuda")[None]
    full = model(torch.tensor([seq], device="cuda"), memory=MemoryBatch.from_references(mems, n_valid, visible, pos, cfg))
    gen = torch.stack([s.logits[0] for s in steps]).float()
    ref = full[0, len(prompt) - 1: len(prompt) - 1 + len(steps)].float()
    assert (gen - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("variant", ["compiled", "graphs"])
def test_bf16_fast_prefill_matches_eager(make_model, variant):
    """The engine's prompt forward on CUDA against the eager unpadded forward: compiled (`Prefill(compiled=True)`:
    padded to a length bucket, torch.compile'd, batch and length dynamic; with memory) or graphed
    (`Prefill(graphs=True)`: a CUDA graph per batch and length bucket, through a scratch cache; with and without
    memory), over shapes that compile or capture and shapes that reuse them with other contents."""
    from model.generate import MemoryWindows, Prefill

    model = make_model(window=64, reference_len=32, mem_tokens=8, max_seq_len=600, head_dim=64)
    model = model.to("cuda", torch.bfloat16)
    cfg = model.cfg
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape, device="cuda", dtype=torch.bfloat16)
    n_valid = torch.tensor([[8, 2], [5, 0], [1, 8]], device="cuda")
    g = torch.Generator().manual_seed(0)
    compiled = variant == "compiled"
    fast = Prefill(model, compiled=True) if compiled else Prefill(model, graphs=True, max_batch=4)
    shapes = [[130, 70, 9], [200, 66]] + ([] if compiled else [[131, 12, 100], [40]])
    for memory in (True,) if compiled else (True, False):
        for lengths in shapes:
            prompts = [SINK + torch.randint(5, cfg.vocab_size, (n - 2,), generator=g).tolist() for n in lengths]
            out = []
            for prefill in (Prefill(model), fast):
                windows = MemoryWindows(model, (lambda row, q: Retrieved(memories[row], n_valid[row])) if memory
                                        else None, len(prompts))
                model.setup_caches(len(prompts), cfg.max_seq_len, memory_slots=windows.reserved)
                last, _, _ = prefill(prompts, model.caches(), windows)
                out.append((last.float(), [c.k[i, :, c.reserved:c.reserved + n].float() for c in model.caches()
                                           for i, n in enumerate(lengths)]))
                model.clear_caches()
            (eager, eager_k), (got, got_k) = out
            assert (got - eager).abs().max() < 5e-2 * eager.abs().max()
            assert all((a - b).abs().max() < 5e-2 * b.abs().max() for a, b in zip(got_k, eager_k))
    if compiled:
        assert fast.compiled
    else:  # (4, 160), (2, 224), (1, 64); with and without memory
        assert fast.replay and len(fast._static) == 6

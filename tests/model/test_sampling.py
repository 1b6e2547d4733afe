import torch

from model.generate import sample


def test_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    zero = torch.zeros(2)
    assert sample(logits, zero, torch.ones(2)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    tiny_p = torch.full((2,), 1e-6)  # nucleus of one token = the argmax, whatever the temperature
    assert all(sample(logits, torch.ones(2), tiny_p, g).tolist() == [1, 0] for _ in range(20))
    draws = [sample(logits[:1], torch.ones(1), torch.ones(1), g).item() for _ in range(400)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / 400
    want = torch.softmax(logits[0], 0)
    assert (freq - want).abs().max() < 0.08  # temperature 1, top_p 1: the model's own distribution
    top2 = [sample(logits[:1], torch.ones(1), torch.tensor([0.8]), g).item() for _ in range(200)]
    assert set(top2) == {1, 3}  # 0.8 of the mass lies in the two best tokens

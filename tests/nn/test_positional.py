"""fastattn.SinusoidalPositionalEncoding, LearnedPositionalEmbedding and TokenAndPositionEmbedding against the
torch.nn-built modules they replace: results, gradients, state_dict round-trips."""

import math

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import assert_close


class TutorialPositionalEncoding(torch.nn.Module):
    """The PyTorch transformer tutorial's PositionalEncoding: a (max_len, 1, d_model) float32 table buffer added to
    x (seq, batch, d_model), then dropout (even d_model only, as there)."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = torch.nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


# ---------------------------------------------------------------------------------------------------------
# SinusoidalPositionalEncoding.
# ---------------------------------------------------------------------------------------------------------


def test_sinusoidal_matches_the_tutorial_module():
    theirs = TutorialPositionalEncoding(64, dropout=0.1, max_len=600).eval()
    ours = fastattn.SinusoidalPositionalEncoding(64, dropout=0.1).eval()
    x = torch.randn(513, 3, 64, requires_grad=True)  # (seq, batch, d), the tutorial's layout
    expected = theirs(x)
    got = ours(x)
    # The tutorial's float32 table is off by up to ~6e-5 at position 512; ours is within an ulp of the truth.
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    truth = reference.sinusoidal_encoding(x.double(), reference.sequence_positions(3, 513, batch_first=False))
    assert (got.double() - truth).abs().max() <= (expected.double() - truth).abs().max()
    (g1,) = torch.autograd.grad(got.sum(), x)
    (g2,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_sinusoidal_state_dict_and_tutorial_checkpoints():
    ours = fastattn.SinusoidalPositionalEncoding(64)
    assert ours.state_dict() == {}
    ours.load_state_dict({})
    ours.load_state_dict(TutorialPositionalEncoding(64, max_len=5000).state_dict())  # its 'pe' is accepted
    ours.load_state_dict(TutorialPositionalEncoding(64, max_len=100).half().state_dict())
    model = torch.nn.Sequential(TutorialPositionalEncoding(64), torch.nn.Linear(64, 8))
    mine = torch.nn.Sequential(fastattn.SinusoidalPositionalEncoding(64), torch.nn.Linear(64, 8))
    mine.load_state_dict(model.state_dict())  # a whole tutorial model's checkpoint, prefixed keys
    torch.testing.assert_close(mine[1].weight, model[1].weight)
    assert set(mine.state_dict()) == {"1.weight", "1.bias"}
    wrong = {"pe": torch.randn(100, 1, 64)}
    with pytest.raises(RuntimeError, match="pe: a positional-encoding table"):
        ours.load_state_dict(wrong)
    with pytest.raises(RuntimeError, match="pe: a positional-encoding table"):
        fastattn.SinusoidalPositionalEncoding(32).load_state_dict(TutorialPositionalEncoding(64).state_dict())


@pytest.mark.parametrize("batch_first", [False, True])
def test_sinusoidal_module_options(batch_first):
    module = fastattn.SinusoidalPositionalEncoding(7, dropout=0.0, batch_first=batch_first, scale=math.sqrt(7))
    x = torch.randn(3, 9, 7) if batch_first else torch.randn(9, 3, 7)  # an odd d_model works
    pos = reference.sequence_positions(3, 9, 4, batch_first=batch_first)
    assert_close(module(x, offset=4), reference.sinusoidal_encoding(x.double(), pos, math.sqrt(7)), atol=1e-6)
    offsets = torch.tensor([0, 10, 20])
    pos = reference.sequence_positions(3, 9, 0, offsets, batch_first=batch_first)
    assert_close(module(x, offset=offsets), reference.sinusoidal_encoding(x.double(), pos, math.sqrt(7)), atol=1e-6)
    assert "d_model=7" in repr(module) and f"batch_first={batch_first}" in repr(module)


def test_sinusoidal_module_dropout_and_max_len():
    module = fastattn.SinusoidalPositionalEncoding(128, dropout=0.25, max_len=64)
    x = torch.full((64, 8, 128), 3.0)  # 3 + PE is never 0: a zero is a dropped element
    kept = (module(x) != 0).double().mean().item()  # training mode by default, as torch.nn.Dropout
    assert abs(kept - 0.75) < 0.01
    module.eval()
    assert torch.all(module(x) != 0)
    with pytest.raises(IndexError, match="position 64 is past max_len=64"):
        module(x, offset=1)
    with pytest.raises(ValueError, match="x has 7 features, expected 128"):
        module(torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        fastattn.SinusoidalPositionalEncoding(0)


# ---------------------------------------------------------------------------------------------------------
# LearnedPositionalEmbedding.
# ---------------------------------------------------------------------------------------------------------


def test_learned_matches_an_nn_embedding_and_shares_its_state_dict():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 16, dtype=torch.float64)
    ours = fastattn.LearnedPositionalEmbedding(50, 16, dtype=torch.float64)
    assert set(ours.state_dict()) == {"weight"}
    ours.load_state_dict(embedding.state_dict())
    x = torch.randn(4, 20, 16, dtype=torch.float64, requires_grad=True)
    expected = x + embedding(torch.arange(3, 23))
    got = ours(x, offset=3)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, (x, ours.weight), grad),
                               torch.autograd.grad(expected, (x, embedding.weight), grad))  # fmt: skip
    embedding.load_state_dict(ours.state_dict())  # and back
    with pytest.raises(IndexError, match="out of range"):
        ours(x, offset=31)


def test_learned_module_seq_first_dropout_and_init():
    torch.manual_seed(0)
    module = fastattn.LearnedPositionalEmbedding(4096, 64, dropout=0.5, batch_first=False)
    assert abs(module.weight.std().item() - 1.0) < 0.02  # N(0, 1), as nn.Embedding
    x = torch.zeros(100, 2, 64)
    kept = (module(x) != 0).double().mean().item()
    assert abs(kept - 0.5) < 0.02
    module.eval()
    torch.testing.assert_close(module(x, offset=7), module.weight[7:107].unsqueeze(1).expand(100, 2, 64))


# ---------------------------------------------------------------------------------------------------------
# TokenAndPositionEmbedding.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_token_and_position_matches_a_pair_of_nn_embeddings(padding_idx):
    torch.manual_seed(0)
    token = torch.nn.Embedding(100, 32, padding_idx=padding_idx)
    position = torch.nn.Embedding(64, 32)
    pair = {f"token.{k}": v for k, v in token.state_dict().items()}
    pair.update({f"position.{k}": v for k, v in position.state_dict().items()})
    ours = fastattn.TokenAndPositionEmbedding(100, 64, 32, padding_idx=padding_idx).eval()
    assert set(ours.state_dict()) == {"token.weight", "position.weight"}
    ours.load_state_dict(pair)
    tokens = torch.randint(0, 100, (3, 40))
    tokens[:, :5] = 0  # repeated tokens, and the padding token when there is one
    expected = token(tokens) + position(torch.arange(2, 42))
    got = ours(tokens, offset=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # one float32 addition either way
    grad = torch.randn_like(expected)
    theirs = torch.autograd.grad(expected, (token.weight, position.weight), grad)
    mine = torch.autograd.grad(got, (ours.token.weight, ours.position.weight), grad)
    torch.testing.assert_close(mine, theirs)
    if padding_idx is not None:
        assert torch.all(mine[0][padding_idx] == 0)
    restored = fastattn.TokenAndPositionEmbedding(100, 64, 32, padding_idx=padding_idx)
    restored.load_state_dict(ours.state_dict())
    torch.testing.assert_close(restored.eval()(tokens, offset=2), got)


def test_token_and_position_options():
    torch.manual_seed(0)
    module = fastattn.TokenAndPositionEmbedding(10, 20, 8, dropout=0.5, token_scale=math.sqrt(8))
    tokens = torch.randint(0, 10, (5, 6))
    positions = torch.randint(0, 20, (5, 6))
    module.eval()
    expected = module.token(tokens) * math.sqrt(8) + module.position(positions)
    torch.testing.assert_close(module(tokens, positions=positions), expected)
    torch.testing.assert_close(module(tokens[0]), module(tokens[:1])[0])  # 1-D tokens
    module.train()
    out = module(torch.zeros(64, 16, dtype=torch.int64))
    assert abs((out != 0).double().mean().item() - 0.5) < 0.03
    with pytest.raises(IndexError, match="token 10"):
        module(torch.tensor([[10]]))

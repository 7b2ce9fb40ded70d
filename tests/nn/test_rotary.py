"""fastattn.RotaryEmbedding against hand-written Hugging Face style RoPE modules, and its state_dict and tables."""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import assert_close, assert_error_ratio


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class HFStyleRotary(torch.nn.Module):
    """RoPE the way Llama (half-split) and GPT-J (interleaved) modules write it, with GPT-NeoX's partial rotary:
    inv_freq a float32 buffer, cos/sin of (positions x inv_freq) duplicated to the rotary width and cast to q's
    dtype, ``x * cos + rotate(x) * sin`` on the first ``dim`` features."""

    def __init__(self, dim, base=10000.0, interleaved=False):
        super().__init__()
        self.dim, self.interleaved = dim, interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q, k, position_ids):  # position_ids: (batch, seq)
        freqs = position_ids[:, :, None].float() * self.inv_freq  # (batch, seq, dim / 2)
        if self.interleaved:
            emb, rotate = freqs.repeat_interleave(2, dim=-1), rotate_every_two
        else:
            emb, rotate = torch.cat((freqs, freqs), dim=-1), rotate_half
        cos, sin = emb.cos().to(q.dtype)[:, None], emb.sin().to(q.dtype)[:, None]  # (batch, 1, seq, dim)

        def apply(x):
            x_rot, x_pass = x[..., : self.dim], x[..., self.dim :]
            return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)

        return apply(q), apply(k)


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [64, 16], ids=lambda d: f"rotary{d}")
def test_matches_hf_style(backend_device, dim, dtype, interleaved, cached):
    """Same results as the hand-written module: within the error-ratio rule of the float64 truth (the hand-written
    module as the baseline), and close to it."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 64, generator=g).to(device, dtype)
    k = torch.randn(2, 2, 11, 64, generator=g).to(device, dtype)
    position_ids = torch.tensor([list(range(11)), list(range(90, 101))], device=device)
    ours = fastattn.RotaryEmbedding(dim, interleaved=interleaved, max_positions=128 if cached else None, device=device)
    theirs = HFStyleRotary(dim, interleaved=interleaved).to(device)
    out = ours(q, k, positions=position_ids)
    expected = theirs(q, k, position_ids)
    truth = reference.rotary(q.double(), k.double(), positions=position_ids, rotary_dim=dim, interleaved=interleaved)
    for o, e, t, what in zip(out, expected, truth, ("q", "k"), strict=True):
        assert_error_ratio(o, t, e, name=what)
        if dtype == torch.float32:
            assert_close(o, e.double(), atol=2e-5)


def test_decoding_offsets_match_full_sequence():
    """Decoding with per-sequence offsets gives the rows of the full sequence's rotation."""
    rope = fastattn.RotaryEmbedding(32)
    q, k = torch.randn(2, 4, 20, 32), torch.randn(2, 1, 20, 32)
    full_q, full_k = rope(q, k)
    lengths = torch.tensor([7, 19])
    step_q = torch.stack([q[b, :, n] for b, n in enumerate(lengths.tolist())])[:, :, None]
    step_k = torch.stack([k[b, :, n] for b, n in enumerate(lengths.tolist())])[:, :, None]
    out_q, out_k = rope(step_q, step_k, offset=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out_q[b, :, 0], full_q[b, :, n])
        assert torch.equal(out_k[b, :, 0], full_k[b, :, n])


def test_state_dict_round_trip():
    """The tables are non-persistent buffers: state_dict is empty (as the hand-written module's), loads strictly,
    and a module rebuilt from it gives the same results."""
    rope = fastattn.RotaryEmbedding(16, base=500.0, max_positions=64)
    assert rope.state_dict() == {} == HFStyleRotary(16).state_dict()
    assert {name for name, _ in rope.named_buffers()} == {"cos_cached", "sin_cached"}
    clone = fastattn.RotaryEmbedding(16, base=500.0, max_positions=64)
    assert not clone.load_state_dict(rope.state_dict(), strict=True).missing_keys
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    for a, b in zip(rope(q, k, offset=3), clone(q, k, offset=3), strict=True):
        assert torch.equal(a, b)
    assert fastattn.RotaryEmbedding(8).state_dict() == {}


def test_dtype_moves_rebuild_tables():
    """.half() and .to(bfloat16) keep float32 tables (rebuilt, not rounded); .double() rebuilds them in float64."""
    rope = fastattn.RotaryEmbedding(16, max_positions=300)
    cos32 = rope.cos_cached.clone()
    rope.half()
    assert rope.cos_cached.dtype == torch.float32 and torch.equal(rope.cos_cached, cos32)
    rope.to(torch.bfloat16)
    assert rope.sin_cached.dtype == torch.float32
    rope.double()
    assert rope.cos_cached.dtype == torch.float64
    expected, _ = reference.rotary_cos_sin_table(300, 16, dtype=torch.float64)
    assert torch.equal(rope.cos_cached, expected)


def test_past_max_positions_is_an_error():
    rope = fastattn.RotaryEmbedding(8, max_positions=16)
    q = torch.randn(1, 1, 4, 8)
    rope(q, offset=12)
    with pytest.raises(ValueError, match="position 16 is outside the cos/sin tables"):
        rope(q, offset=13)
    with pytest.raises(ValueError, match="outside the cos/sin tables"):
        rope(q, positions=torch.tensor([0, 5, 16, 2]))
    fastattn.RotaryEmbedding(8)(q, offset=10**6)  # computed angles: no limit


def test_inplace_and_single_tensor():
    rope = fastattn.RotaryEmbedding(8, interleaved=True)
    q = torch.randn(2, 3, 5, 12)
    expected = rope(q)
    assert isinstance(expected, torch.Tensor)
    x = q.clone()
    assert rope(x, inplace=True) is x and torch.equal(x, expected)


def test_repr_and_arguments():
    assert repr(fastattn.RotaryEmbedding(64, base=5e5, max_positions=32)) == (
        "RotaryEmbedding(dim=64, base=500000, interleaved=False, max_positions=32)"
    )
    for bad in (dict(dim=7), dict(dim=0), dict(dim=8, base=-1.0), dict(dim=8, max_positions=0)):
        with pytest.raises(ValueError, match="RotaryEmbedding"):
            fastattn.RotaryEmbedding(**bad)
    with pytest.raises(ValueError, match="rotary_dim 16 is larger than head_dim 8"):
        fastattn.RotaryEmbedding(16)(torch.randn(1, 1, 2, 8))


def test_gradients_flow_to_q_and_k():
    rope = fastattn.RotaryEmbedding(8, max_positions=10)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, offset=2), (q, k))

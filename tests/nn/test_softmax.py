"""fastattn.Softmax is a drop-in for torch.nn.Softmax."""

import pytest
import torch

import fastattn


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5), (2, 3, 4, 5)])
def test_matches_torch(dim, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if dim is not None and not -len(shape) <= dim < len(shape):
        pytest.skip("dim out of range for this shape")
    theirs = torch.nn.Softmax(dim)
    ours = fastattn.Softmax(dim)
    with pytest.warns(UserWarning) if dim is None else _no_warning():
        expected = theirs(x)
    torch.testing.assert_close(ours(x), expected)
    assert ours.state_dict() == theirs.state_dict() == {}
    assert repr(ours) == repr(theirs).replace("Softmax", "Softmax")


def test_from_torch_and_gradients():
    module = fastattn.Softmax.from_torch(torch.nn.Softmax(dim=-1))
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

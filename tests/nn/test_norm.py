"""fastattn.LayerNorm and fastattn.RMSNorm are drop-ins for torch.nn.LayerNorm and torch.nn.RMSNorm."""

import pytest
import torch

import fastattn
from fastattn.testing import assert_close

CONFIGS = [
    dict(normalized_shape=10),
    dict(normalized_shape=(4, 10), eps=1e-3),
    dict(normalized_shape=[10], elementwise_affine=False),
]


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_norm_matches_torch(config, bias):
    theirs = _randomise(torch.nn.LayerNorm(**config, bias=bias, dtype=torch.float64))
    ours = fastattn.LayerNorm(**config, bias=bias, dtype=torch.float64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    assert_close(ours(x), theirs(x), atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x,))
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())  # and back


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_rms_norm_matches_torch(config):
    theirs = _randomise(torch.nn.RMSNorm(**config, dtype=torch.float64))
    ours = fastattn.RMSNorm(**config, dtype=torch.float64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    assert_close(ours(x), theirs(x), atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x,))
    assert repr(ours) == repr(theirs)


def test_from_torch_shares_parameters():
    torch_ln, torch_rms = _randomise(torch.nn.LayerNorm(16)), _randomise(torch.nn.RMSNorm(16))
    ln, rms = fastattn.LayerNorm.from_torch(torch_ln), fastattn.RMSNorm.from_torch(torch_rms)
    assert ln.weight is torch_ln.weight and rms.weight is torch_rms.weight
    x = torch.randn(5, 16)
    assert_close(ln(x), torch_ln(x), atol=1e-5)
    assert_close(rms(x), torch_rms(x), atol=1e-5)

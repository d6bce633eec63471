"""GPTQ's error feedback as the block-wise reconstruction's start (upq_hf.gptq, PTQConfig.init="gptq")."""

import copy

import pytest
import torch

from upq_hf import formats
from upq_hf.gptq import HessianCollector, gptq_quantize
from upq_hf.ptq import blockwise_ptq
from upq_hf.qat import QATLinear, init_quant_params
from upq_hf.stages import PTQConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _dequantized(latent, scale, zero, bits, group_size):
    """What the packed layer computes from GPTQ's result (its latent weight rounded with its scales)."""
    layer = QATLinear(latent, scale, zero, None, bits, group_size)
    return formats.dequantize(layer.quantized_weight(), torch.float32)


@pytest.mark.parametrize("bits,group_size", [(2, 16), (2, None), (4, 16)])
def test_uncorrelated_inputs_give_round_to_nearest_bit_for_bit(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    latent, scale, zero = gptq_quantize(weight, 5.0 * torch.eye(64), bits, group_size)
    rtn_scale, rtn_zero = init_quant_params(weight, bits, group_size)
    assert torch.equal(latent, weight)
    assert torch.equal(scale, rtn_scale.float())
    assert (zero is None) == (bits == 2)
    if zero is not None:
        assert torch.equal(zero, rtn_zero.float())


def test_one_error_fed_forward_by_hand():
    """Two columns, one group per row, no damping: column 1 becomes w1 + (w0 - q0) H01 / H11 (the optimal update
    of the columns left once column 0 is fixed), and is then rounded with the group's scale."""
    weight = torch.tensor([[0.37, -0.52], [1.1, 0.2]])
    hessian = torch.tensor([[2.0, 0.8], [0.8, 1.0]])
    latent, scale, _ = gptq_quantize(weight, hessian, 2, None, damp=0.0)
    s = scale[:, 0]
    q0 = (torch.round(torch.clamp(weight[:, 0] / s, -2 * (1 - formats.SEQ_EPS), 2 * (1 - formats.SEQ_EPS)) - 0.5)
          + 0.5) * s
    expected = weight[:, 1].double() + (weight[:, 0].double() - q0.double()) * 0.8 / 1.0
    torch.testing.assert_close(latent[:, 0], weight[:, 0])
    torch.testing.assert_close(latent[:, 1].double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(scale, init_quant_params(weight, 2, None)[0].float())


@pytest.mark.parametrize("bits,group_size", [(2, 16), (2, 64), (4, 16)])
def test_correlated_inputs_reconstruct_better_than_round_to_nearest(bits, group_size):
    torch.manual_seed(1)
    n_in = 128
    x = torch.randn(2048, 16) @ torch.randn(16, n_in) + 0.3 * torch.randn(2048, n_in)  # correlated, as LLMs' are
    weight = torch.randn(48, n_in)
    collector = HessianCollector(torch.nn.Linear(n_in, 48, bias=False))
    collector._module.weight.data.copy_(weight)
    collector.attach()
    collector._module(x[:1024])
    collector._module(x[1024:])
    collector.detach()
    torch.testing.assert_close(collector.hessian, x.double().T @ x.double())
    assert collector.rows == 2048

    gptq = _dequantized(*gptq_quantize(weight, collector.hessian, bits, group_size), bits, group_size)
    rtn = _dequantized(weight, *init_quant_params(weight, bits, group_size), bits, group_size)
    error = lambda q: float((x @ (weight - q).T).pow(2).mean())  # noqa: E731
    assert error(gptq) < 0.5 * error(rtn)  # 0.08-0.16 measured over seeds 0-2


def test_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"hessian must be \(32, 32\)"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16), 2, 16)
    with pytest.raises(ValueError, match="init must be one of"):
        PTQConfig(init="awq")


def test_blockwise_ptq_starts_each_block_from_gptq(tiny_llama):
    """With ``init="gptq"`` every block's start reconstructs the unquantized block better than round to nearest's
    start; with nothing learned the blocks keep that start."""
    model, calibration = tiny_llama
    frozen = {"holdout": 0.0, "batch_size": 4, "steps": 1, "learning_rate": 0.0, "scale_learning_rate": 0.0}
    rtn = blockwise_ptq(copy.deepcopy(model), calibration, 2, 16, PTQConfig(**frozen), progress=False,
                        backend="torch")
    gptq = blockwise_ptq(copy.deepcopy(model), calibration, 2, 16, PTQConfig(init="gptq", **frozen),
                         progress=False, backend="torch")
    for start, fed in zip(rtn.blocks, gptq.blocks):
        assert fed.rtn_loss < 0.95 * start.rtn_loss
        assert fed.reverted and fed.final_loss == fed.rtn_loss


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    return model, calibration

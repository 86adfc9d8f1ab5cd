"""The gradient-similarity baseline: per-candidate gradients equal autograd's, and streaming keeps the cache's noise."""
import torch

from utils.baselines import RowSlice, whitened_unit_gradients
from utils.data import LaionCandidates
from utils.losses import noised_batches, per_row_loss
from utils.weights import select_parameter_names

SETTINGS = {"batch_size": 10, "time_samples": 5, "seed": 3}  # 2 candidates (x 5 timesteps) per batch


def test_gradient_rows_equal_autograd_and_chunks_equal_one_pass(base_model, tiny_abc):
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    scale = torch.rand(sum(p.numel() for n, p in base_model.unet.named_parameters() if n in names),
                       generator=torch.Generator().manual_seed(0)) + 0.5
    full = whitened_unit_gradients(base_model, names, scale, laion, SETTINGS, "all")
    assert full.shape == (24, len(scale))
    torch.testing.assert_close(full.norm(dim=1), torch.ones(24))

    # candidate row 5 is the second candidate of batch 2: its gradient by plain autograd, one candidate alone
    params = dict(base_model.unet.named_parameters())
    n, noisy, timesteps, text, noise = list(noised_batches(base_model.scheduler, laion, **SETTINGS))[2]
    rows = slice(5, 10)
    for name in names:
        params[name].requires_grad_(True)
    loss = per_row_loss(base_model.unet, noisy[rows], timesteps[rows], text[rows], noise[rows]).mean()
    grads = torch.autograd.grad(loss, [params[name] for name in names])
    for name in names:
        params[name].requires_grad_(False)
    expected = torch.nn.functional.normalize(torch.cat([g.flatten() for g in grads]) * scale, dim=0)
    torch.testing.assert_close(full[5], expected, rtol=1e-4, atol=1e-6)

    # streamed in chunks of 4 rows (2 batches), each chunk seeded where the cache's layout puts it
    chunks = torch.cat([whitened_unit_gradients(base_model, names, scale, RowSlice(laion, s, s + 4), SETTINGS, "chunk",
                                                first_batch=s // 2) for s in range(0, 24, 4)])
    torch.testing.assert_close(chunks, full)
    unseeded = whitened_unit_gradients(base_model, names, scale, RowSlice(laion, 4, 8), SETTINGS, "chunk")
    assert not torch.allclose(unseeded, full[4:8])

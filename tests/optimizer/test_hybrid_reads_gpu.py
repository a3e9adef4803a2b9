"""No read after step() sees stale weights: state_dict, clones, functional calls, with overlap on.

The scenario follows Megatron-LM's own HybridDeviceOptimizer unit test (fp32 conv + MLP nets, two param
groups, gradients accumulating across steps, weights compared to torch.optim.Adam with atol 1e-3 through
`model.state_dict()` right after `step()`), written anew for this optimizer.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_offload.optimizer import HybridDeviceOptimizer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
SLEEP = 200_000_000  # GPU cycles, ~0.1 s: a read not ordered after the update sees the old weights


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def groups(params, two):
    if not two:
        return params
    half = len(params) // 2
    return [{"params": params[:half], "lr": 1e-3}, {"params": params[half:], "lr": 2e-3}]


@pytest.mark.parametrize("n_steps", [1, 10])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("two_groups", [False, True])
def test_weights_read_right_after_step_match_torch_adam(two_groups, fraction, overlap, n_steps):
    torch.manual_seed(42)
    net, ref_net = Net().cuda(), Net().cuda()
    ref_net.load_state_dict(net.state_dict())
    opt = HybridDeviceOptimizer(groups(list(net.parameters()), two_groups), offload_fraction=fraction, lr=1e-3,
                                adamw_mode=False, overlap_cpu_optimizer_d2h_h2d=overlap,
                                use_torch_optimizer_for_cpu_offload=True)
    ref = torch.optim.Adam(groups(list(ref_net.parameters()), two_groups), lr=1e-3)
    try:
        for _ in range(n_steps):  # gradients accumulate: nobody zeroes them, as in Megatron's test
            x = torch.randn(1, 3, 32, 32, device="cuda")
            net(x).sum().backward()
            opt.step()
            ref_net(x).sum().backward()
            ref.step()
        got, want = net.state_dict(), ref_net.state_dict()  # read at once: no wait(), no synchronize()
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-3), (k, (got[k] - want[k]).abs().max().item())
    finally:
        opt.close()


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_read_after_step_is_ordered_after_the_update_on_a_stalled_stream(backend):
    """The compute stream is stalled while step() runs: reads queued after step() must see the update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)).cuda().to(torch.bfloat16)
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=1.0, lr=1e-2,
                                use_torch_optimizer_for_cpu_offload=backend == "torch")
    try:
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        model(x).float().sum().backward()
        torch.cuda.synchronize()
        old = [p.detach().clone() for p in model.parameters()]
        torch.cuda._sleep(SLEEP)
        opt.step()
        snap = [p.detach().clone() for p in model.parameters()]  # a read queued right after step()
        out = torch.func.functional_call(model, dict(model.named_parameters()), (x,))
        torch.cuda.synchronize()
        state = opt.state_dict()["state"]  # keyed by parameter index
        masters = [state[i]["master"].cuda().to(torch.bfloat16) for i in range(len(old))]
        assert all(not torch.equal(o, s) for o, s in zip(old, snap)), "a read after step() saw stale weights"
        assert all(torch.equal(s, m) for s, m in zip(snap, masters))
        assert torch.equal(out, model(x))
    finally:
        opt.close()

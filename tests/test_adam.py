"""The fit's Adam is torch.optim.Adam, bit for bit, and does not import torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from facerecon.adam import Adam


def _problem(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 5, generator=g).requires_grad_(), torch.randn(1, 7, generator=g).requires_grad_(),
              torch.randn(2, 2, generator=g).requires_grad_()]
    return params, torch.randn(5, 7, generator=g)


def _loss(params: list[torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    a, b, c = params
    return ((a @ m - b).pow(2).sum() + (a[:2, :2] * c).sin().sum() + c.abs().sum()) * 0.3


def test_the_same_updates_as_torch_optim_adam() -> None:
    ours, m = _problem(0)
    ref, _ = _problem(0)
    lrs = (0.01, 0.05)
    opt = Adam([{"params": ours[:2], "lr": lrs[0]}, {"params": ours[2:], "lr": lrs[1]}])
    ref_opt = torch.optim.Adam([{"params": ref[:2], "lr": lrs[0]}, {"params": ref[2:], "lr": lrs[1]}])
    start = [p.detach().clone() for p in ours]
    for step in range(40):
        for o, params in ((opt, ours), (ref_opt, ref)):
            loss = _loss(params, m)
            o.zero_grad(set_to_none=True) if o is ref_opt else o.zero_grad()
            loss.backward()
            if step == 7:  # a parameter without a gradient this step is left alone, as torch does
                params[1].grad = None
            o.step()
        for p, q in zip(ours, ref, strict=True):
            assert torch.equal(p, q), f"step {step}"
    assert all((p - s).abs().max() > 0.05 for p, s in zip(ours, start, strict=True))  # it moved


def test_no_dynamo_import() -> None:
    code = ("import sys, torch\nfrom facerecon.adam import Adam\np = torch.zeros(3, requires_grad=True)\n"
            "o = Adam([{'params': [p], 'lr': 0.1}])\n(p - 1).pow(2).sum().backward()\no.step()\n"
            "print('torch._dynamo' in sys.modules, float(p[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    dynamo, value = out.stdout.split()
    assert dynamo == "False" and abs(float(value) - 0.1) < 1e-6

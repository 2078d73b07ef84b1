"""How often NVML's total-energy counter and its power reading change while the GPU works
(a matmul loop): decides whether a sub-second benchmark run can be measured by either.

  python scripts/nvml_energy_check.py      (GPU host with pynvml)
"""

import time

import pynvml
import torch

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
energy, power, t_end = [], [], time.perf_counter() + 2.0
while time.perf_counter() < t_end:
    for _ in range(4):
        a = (a @ a).clamp_(-1, 1)
    now = time.perf_counter()
    energy.append((now, pynvml.nvmlDeviceGetTotalEnergyConsumption(h)))
    power.append((now, pynvml.nvmlDeviceGetPowerUsage(h)))
torch.cuda.synchronize()


def changes(series):
    return [t for (t, v), (_, prev) in zip(series[1:], series) if v != prev]


for name, s in (("energy counter", energy), ("power reading", power)):
    c = changes(s)
    gaps = [1e3 * (b - a) for a, b in zip(c, c[1:])]
    print(f"{name}: {len(s)} reads, {len(c)} changes, median gap {sorted(gaps)[len(gaps) // 2] if gaps else None} ms")
print(
    "mean power from the counter over the loop: "
    f"{(energy[-1][1] - energy[0][1]) / (energy[-1][0] - energy[0][0]) / 1e3:.1f} W"
)

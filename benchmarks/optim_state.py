"""One optimizer step over SmolLM2-135M's parameter shapes with random gradients, no model: seconds per
step (the first includes torchao's compile) and the process's peak RSS (weights + gradients + state).

    python benchmarks/optim_state.py fused|bnb8|aobf16|ao8|ao4|ao8bf16|galore
"""
import torch, time, warnings, sys, resource
warnings.filterwarnings("ignore")
torch.manual_seed(0)
H, I, L, V, KV = 576, 1536, 30, 49152, 192
shapes = [(V, H)] + [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I), (H,), (H,)] * L + [(H,)]
import bitsandbytes as bnb
from torchao.optim import AdamW8bit, AdamW4bit, AdamWFp8, _AdamW
from galore_torch import GaLoreAdamW
k = sys.argv[1]
dt = torch.bfloat16 if k.endswith("bf16") else torch.float32
ps = [torch.nn.Parameter(torch.randn(s, dtype=dt) * 0.02) for s in shapes]
M = {
 "bnb8": lambda: bnb.optim.AdamW8bit(ps, lr=1e-5),
 "ao8": lambda: AdamW8bit(ps, lr=1e-5),
 "ao8bf16": lambda: AdamW8bit(ps, lr=1e-5, bf16_stochastic_round=True),
 "ao4": lambda: AdamW4bit(ps, lr=1e-5),
 "aobf16": lambda: _AdamW(ps, lr=1e-5, bf16_stochastic_round=True),
 "galore": lambda: GaLoreAdamW([{"params":[p for p in ps if p.ndim==2 and p.shape[0]!=V], "rank":128, "update_proj_gap":200, "scale":0.25, "proj_type":"std"}, {"params":[p for p in ps if p.ndim<2 or p.shape[0]==V]}], lr=1e-5),
 "fused": lambda: torch.optim.AdamW(ps, lr=1e-5, fused=True),
}
opt = M[k]()
ts=[]
for i in range(4):
    for p in ps: p.grad = torch.randn_like(p) * 1e-3
    t=time.time(); opt.step(); ts.append(time.time()-t)
print(k, "n=%.1fM" % (sum(p.numel() for p in ps)/1e6), "step s:", [round(x,2) for x in ts], "rss GB %.2f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20), flush=True)

"""diffusers' SD3Transformer2DModel (torch CPU, float32, random weights) timed like bench.mmdit; run by it in
a separate interpreter that has torch + diffusers: ``python -P bench/torch_mmdit.py SIZE REPEAT CONFIG_JSON``.
Prints one JSON line: best and all times, peak RSS."""

import json
import resource
import sys
import time

import torch
from diffusers import SD3Transformer2DModel


def main():
    size, repeat, cfg = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(0)
    D, heads = cfg["mmdit_hidden_dim"], cfg["mmdit_num_heads"]
    model = SD3Transformer2DModel(
        sample_size=size // 8, patch_size=cfg["mmdit_patch_size"], in_channels=cfg["latent_channels"],
        num_layers=cfg["mmdit_num_layers"], attention_head_dim=D // heads, num_attention_heads=heads,
        joint_attention_dim=cfg["mmdit_context_dim"], caption_projection_dim=D,
        pooled_projection_dim=cfg["mmdit_pooled_dim"], out_channels=cfg["latent_channels"],
        pos_embed_max_size=cfg["mmdit_position_size"]).eval()
    for p in model.parameters():  # keep activations finite through all blocks, as bench.common does
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)
    h = size // 8
    x = torch.randn(2, cfg["latent_channels"], h, h)
    ctx = torch.randn(2, 333, cfg["mmdit_context_dim"])
    pooled = torch.randn(2, cfg["mmdit_pooled_dim"])
    t = torch.full((2,), 500.0)
    times = []
    with torch.inference_mode():
        model(x, ctx, pooled, t)  # warm-up
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"best": min(times), "times": times, "threads": torch.get_num_threads(),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()

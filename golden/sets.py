"""The golden fixture sets: tiny SD3-shaped models, small in parameters (fixtures stay a few MB) but covering
every structural feature — T5 or not, qk RMSNorm, MMDiT-X dual attention (also in the last block),
non-square images with non-zero position-crop offsets, batch > 1, a VAE whose channel count changes
(nin_shortcut), CLIP encoders with a penultimate block distinct from the first."""

CLIP_L = dict(hidden=32, layers=3, heads=2, intermediate=64, act="quick_gelu")
CLIP_G = dict(hidden=48, layers=3, heads=3, intermediate=96, act="gelu")

# Stored weight dtypes per component, as in the real checkpoints: SD3-medium is float16 throughout;
# SD3.5 stores the MMDiT, VAE and T5 in bfloat16 and the CLIPs in float16 (KerasHub keeps the qk-norm
# scales in float32). Weights are rounded to these dtypes, so every form holds exactly the same values
# and the float32 runs see them unchanged.
F16 = dict(mmdit="float16", vae="float16", clip="float16", t5="float16")
SD35_MIXED = dict(mmdit="bfloat16", vae="bfloat16", clip="float16", t5="bfloat16")

SETS = {
    # SD3-medium structure: no qk-norm, CLIP-L quick_gelu, CLIP-G gelu + projection, a T5 encoder.
    "sd3": dict(
        seed=3, batch=2, image=(48, 48), storage=F16,
        mmdit=dict(hidden=32, heads=2, layers=3, position_size=8, qk_norm=None, dual=()),
        t5=dict(vocab=64, hidden=80, layers=2, heads=4, kv=16, ff=128),
        vae=dict(channels=(32, 32, 32, 32)),
        prompts=["a photo of a cat", "an astronaut riding a horse on the moon"],
    ),
    # SD3.5 structure: qk RMSNorm, dual attention in blocks 0 and 2 (2 is the last block), non-square.
    "sd35": dict(
        seed=35, batch=2, image=(32, 48), storage=SD35_MIXED,
        mmdit=dict(hidden=32, heads=4, layers=3, position_size=10, qk_norm="rms_norm", dual=(0, 2)),
        t5=dict(vocab=64, hidden=80, layers=2, heads=2, kv=24, ff=128),
        vae=dict(channels=(32, 32, 32, 32)),
        prompts=["a red cube on a blue table", "city street at night in the rain, neon lights"],
    ),
    # KerasHub's shipped configuration: no T5, so a 4096-wide context.
    "sd3_no_t5": dict(
        seed=30, batch=1, image=(64, 48), storage=F16,
        mmdit=dict(hidden=32, heads=2, layers=2, position_size=8, qk_norm=None, dual=()),
        t5=None,
        vae=dict(channels=(32, 32, 32, 32)),
        prompts=["a watercolor painting of a mountain lake at sunset"],
    ),
}

NEGATIVE_PROMPT = ""
GUIDANCE = 5.0
T2I_STEPS = 3
I2I_STEPS, I2I_STRENGTH = 4, 0.6  # start step int(4·0.4) = 1 in KerasHub and diffusers alike
SCHEDULES = [(n, s) for n in (1, 2, 3, 4, 10, 28, 50) for s in (1.0, 3.0, 2.5)]
# Image-to-image / inpainting start steps, taken from each framework's own code (not from the runs above),
# over a grid with the float ties where the frameworks differ: 1 - 0.8 = 0.19999999999999996, so
# int(N·(1 - 0.8)) < N - N·0.8 for N a multiple of 5 (likewise 0.9, N a multiple of 10).
START_STEPS_N = tuple(range(1, 13)) + (15, 20, 25, 28, 30, 50)
START_STEPS_STRENGTH = (0.0, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
# CLIP rows without their EOS and start token (both replaced by this id, so the largest id is a prompt
# token): transformers then pools at position 0 (the first EOS of a row that has none), KerasHub at that id.
NO_EOS_ID = 5
# T5 relative-position buckets (num_buckets, max_distance) from transformers' own function: the default and
# pairs whose logarithmic bins hit exact logs (where a float64 computation lands one bucket higher).
T5_BUCKETS = ((32, 128), (18, 128), (19, 128), (38, 16), (39, 16), (72, 32), (73, 32), (108, 64), (109, 64),
              (72, 50), (73, 50), (33, 128), (64, 40))
KERAS_T5_LENGTH = 77  # the `keras` convention: 77 CLIP + 77 T5 tokens
DIFFUSERS_T5_LENGTH = 256  # diffusers' default max_sequence_length
MMDIT_CONTEXT_TOKENS = 12  # any length works; small keeps the 4096-wide no-T5 input small

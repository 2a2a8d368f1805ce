"""Make a prompt-embeddings file for examples/sample.py with diffusers' SDXL text encoders.

    pip install torch==2.13.0 diffusers transformers
    python examples/make_embeddings.py "a photo of an astronaut riding a horse" -o prompt.safetensors \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --negative "blurry"

Needs torch, diffusers and transformers, and the pipeline's text encoders and tokenizers (a Hub id
or a local diffusers folder); the UNet and VAE are not loaded. (A later release encodes prompts in
MLX without torch.)
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("-o", "--output", type=Path, default=Path("prompt.safetensors"))
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="Hub id or diffusers folder")
    p.add_argument("--negative", default=None, help="negative prompt (default: none, i.e. zeros as SDXL does)")
    args = p.parse_args(argv)

    try:
        import torch
        from diffusers import StableDiffusionXLPipeline
        from safetensors.torch import save_file
    except ImportError as e:
        print(f"error: this example needs torch, diffusers and transformers ({e}).", file=sys.stderr)
        return 2

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, unet=None, vae=None, torch_dtype=torch.float32)
    with torch.no_grad():
        prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
            args.prompt, negative_prompt=args.negative, do_classifier_free_guidance=True
        )
    tensors = {
        "prompt_embeds": prompt,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.output), metadata={"prompt": args.prompt})
    print(f"wrote {args.output}: prompt_embeds {tuple(prompt.shape)}, pooled {tuple(pooled.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

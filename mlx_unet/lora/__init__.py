"""LoRA and LyCORIS adapters on the UNet and the text encoders: read from the files people
download (kohya / sd-scripts, diffusers / PEFT, LyCORIS LoHa and LoKr), matched by the naming
tables of ``mlx_unet.naming.lora``, and applied fused (into the weights; removable bit for bit)
or live (a wrapper adding the adapter's branch; works over quantized layers, strength changeable
at any time).

    from mlx_unet import lora
    applied = lora.apply_lora(unet, "style.safetensors", scale=0.8)   # fused
    applied.remove()

A pipeline applies a file to all its parts at once: ``DiffusionPipeline.load_lora``.
"""

from .adapters import Adapter, Hadamard, Kronecker, LowRank
from .apply import AppliedLoRA, apply_lora
from .files import read_lora
from .formats import LoRAFile
from .layers import LoRALayer

__all__ = ["Adapter", "AppliedLoRA", "Hadamard", "Kronecker", "LoRAFile", "LoRALayer", "LowRank", "apply_lora",
           "read_lora"]

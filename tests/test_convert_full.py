"""A full-size SDXL base single-file checkpoint (fp16, 5.1 GB): proven with diffusers' own loader,
converted by convert.py within its memory bound, and matching diffusers after conversion."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from original_layout import to_original_layout
from reference import make_inputs, relative_error, run_mlx, run_torch, torch_unet

from mlx_unet import UNet2DConditionModel, UNetConfig
from mlx_unet.safetensors_io import TensorSpec, write_safetensors

ROOT = Path(__file__).resolve().parent.parent

# The converter's own peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from
# this large pytest process across fork and exec).
MEASURE = (
    "import sys; from mlx_unet.conversion import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('peak_rss_kb', hwm, file=sys.stderr); sys.exit(rc)"
)


def rss_gib() -> float:
    return int([line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]) / 2**20


def test_sdxl_base_single_file_fp16_full_size(tmp_path):
    config = UNetConfig.from_preset("sdxl-base")
    source = torch_unet(config, seed=50, dtype=torch.float16)
    checkpoint = tmp_path / "sd_xl_base_random.safetensors"
    original = to_original_layout(source.state_dict(), config)
    # Streamed to disk: safetensors' own writer would hold a second copy of all 5 GB.
    write_safetensors(checkpoint, [
        TensorSpec(name, tuple(t.shape), mx.float16, lambda t=t: mx.array(t.numpy()))
        for name, t in original.items()
    ])
    del original

    # diffusers' own single-file loader must read the file back as exactly the source model.
    (tmp_path / "cfg" / "unet").mkdir(parents=True)
    (tmp_path / "cfg" / "unet" / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    theirs = TorchUNet.from_single_file(str(checkpoint), config=str(tmp_path / "cfg"), subfolder="unet",
                                        local_files_only=True, torch_dtype=torch.float16)
    loaded, expected_weights = theirs.state_dict(), source.state_dict()
    assert loaded.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(loaded[name], tensor), name
    del loaded, expected_weights, theirs
    gc.collect()
    print(f"RSS after diffusers' from_single_file check: {rss_gib():.1f} GiB")

    reference = source.float()
    del source
    inputs = make_inputs(config, 2, 32, 32, seed=51, tokens=77, timesteps=[901.0, 45.0])
    expected = run_torch(reference, inputs)
    del reference
    gc.collect()
    print(f"RSS after the reference forward: {rss_gib():.1f} GiB")

    out = tmp_path / "mlx"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "SDXL base (6 time ids) single-file checkpoint" in proc.stderr
    output_bytes = (out / "model.safetensors").stat().st_size
    peak = int(proc.stderr.split("peak_rss_kb")[1].split()[0]) * 1024
    print(f"convert.py peak RSS {peak / 2**30:.2f} GiB for {output_bytes / 2**30:.2f} GiB of output")
    assert peak < 1.5 * output_bytes

    ours = UNet2DConditionModel.from_pretrained(out, dtype=mx.float32)
    print(f"RSS with our model loaded: {rss_gib():.1f} GiB")
    assert ours.config == config
    assert relative_error(run_mlx(ours, inputs), expected) <= 1e-4

"""A full-size SDXL base single-file checkpoint (fp16, 5.1 GB): proven with diffusers' own loader,
converted by convert.py within its memory bound, and every tensor the one diffusers loads."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from original_layout import to_original_layout
from safetensors import safe_open
from reference import release_memory, torch_unet

from mlx_unet import UNetConfig
from mlx_unet.weights import torch_to_mlx_layout
from mlx_unet.safetensors_io import TensorSpec, write_safetensors

ROOT = Path(__file__).resolve().parents[2]

# The converter's own peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from
# this large pytest process across fork and exec).
MEASURE = (
    "import sys; from mlx_unet.cli.convert import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('peak_rss_kb', hwm, file=sys.stderr); sys.exit(rc)"
)


def rss_gib() -> float:
    return int([line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]) / 2**20


@pytest.mark.slow
@pytest.mark.xdist_group("full_size")
def test_sdxl_base_single_file_fp16_full_size(tmp_path):
    config = UNetConfig.from_preset("sdxl-base")
    source = torch_unet(config, seed=50, dtype=torch.float16)
    checkpoint = tmp_path / "sd_xl_base_random.safetensors"
    original = to_original_layout(source.state_dict(), config)
    names = dict(zip(source.state_dict(), original))  # diffusers name -> original name (same order)
    # Streamed to disk: safetensors' own writer would hold a second copy of all 5 GB.
    write_safetensors(checkpoint, [
        TensorSpec(name, tuple(t.shape), mx.float16, lambda t=t: mx.array(t.numpy()))
        for name, t in original.items()
    ])
    del original, source  # the file now holds the source model; diffusers' loader needs the room
    release_memory()

    # diffusers' own single-file loader must read the file back as exactly the source model.
    (tmp_path / "cfg" / "unet").mkdir(parents=True)
    (tmp_path / "cfg" / "unet" / "config.json").write_text(json.dumps(config.to_diffusers_dict()))
    theirs = TorchUNet.from_single_file(str(checkpoint), config=str(tmp_path / "cfg"), subfolder="unet",
                                        local_files_only=True, torch_dtype=torch.float16)
    loaded = theirs.state_dict()
    assert loaded.keys() == names.keys()
    with safe_open(str(checkpoint), framework="pt") as f:
        for name, original_name in names.items():
            assert torch.equal(loaded[name], f.get_tensor(original_name)), name
    del loaded
    release_memory()
    print(f"RSS after diffusers' from_single_file check: {rss_gib():.1f} GiB")

    del theirs
    release_memory()

    out = tmp_path / "mlx"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "SDXL base (6 time ids) single-file checkpoint" in proc.stderr
    output_bytes = (out / "model.safetensors").stat().st_size
    peak = int(proc.stderr.split("peak_rss_kb")[1].split()[0]) * 1024
    print(f"convert.py peak RSS {peak / 2**30:.2f} GiB for {output_bytes / 2**30:.2f} GiB of output")
    assert peak < 1.5 * output_bytes

    # Every converted tensor is the one diffusers' loader gave that name (proven above), in MLX's
    # layout, bit for bit (float16 in, float16 out): with test_parity_full.py's full-size forward
    # on exactly those tensors, the converted model computes what diffusers' does.
    assert UNetConfig.from_json(out) == config
    with safe_open(str(out / "model.safetensors"), framework="numpy") as ours, \
            safe_open(str(checkpoint), framework="numpy") as source:
        assert set(ours.keys()) == names.keys()
        differ = [name for name, original_name in names.items()
                  if not np.array_equal(ours.get_tensor(name), torch_to_mlx_layout(source.get_tensor(original_name)))]
    assert not differ, differ[:5]

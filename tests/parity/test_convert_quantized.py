"""convert --quantize: quantized folders written layer by layer from diffusers folders, Hub
snapshots and original single files. Every quantized tensor is MLX's own quantization of the dense
conversion's weight, bit for bit, and every other tensor the dense conversion's; the folders load
quantized with no dense copy (MLX's peak memory measured) and make images; the converter holds
about one dense tensor at a time."""

import json
import math
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from original_layout import SINGLE_FILE_FAMILIES
from pipeline_files import SIZE, diffusers_pipeline
from reference import torch_unet
from safetensors.numpy import save_file
from test_convert import _hub_cache
from test_convert import write_single_file as write_unet_single_file
from test_convert_pipeline import expected_tensors, make_parts, write_single_file

from mlx_unet import CLIPTextConfig, CLIPTextModel, SDXLPipeline, UNet2DConditionModel, UNetConfig, VAEConfig
from mlx_unet.cli.convert import main
from mlx_unet.configs.base import FORMAT_VERSION, SECTION
from mlx_unet.configs.quantization import Quantization, mode_available, read_quantization
from mlx_unet.convert import convert
from mlx_unet.quantize import quantizable_paths, quantized_paths
from mlx_unet.safetensors_io import SafetensorsReader
from mlx_unet.weights import model_shapes

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "model.safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Groups of 32: the tiny models' 16-, 32- and 64-wide layers are quantized too (64 takes fewer).
Q8 = Quantization.make(8, 32)


def leaves(q: Quantization) -> tuple[str, ...]:
    return ("weight", "scales", "biases") if q.mode == "affine" else ("weight", "scales")


def policy_paths(folder: Path, q: Quantization) -> set[str]:
    """The layers the quantization policy takes in the model ``folder``'s config describes."""
    unet = "block_out_channels" in json.loads((folder / "config.json").read_text())
    model = UNet2DConditionModel(UNetConfig.from_json(folder)) if unet else CLIPTextModel(CLIPTextConfig.from_json(folder))
    return quantizable_paths(model, q)


def assert_quantized_like_dense(quantized: Path, dense: Path | dict, q: Quantization) -> set[str]:
    """``quantized`` (a model folder) holds the dense conversion ``dense`` (a folder, or its tensors)
    with exactly the policy's layers quantized, each ``mx.quantize`` of the dense weight bit for
    bit, its parts side by side in the file, and its config records ``q``. Returns the quantized
    layers."""
    got = mx.load(str(quantized / WEIGHTS))
    reference = dense if isinstance(dense, dict) else mx.load(str(dense / WEIGHTS))
    paths = quantized_paths(got)
    assert paths and paths == policy_paths(quantized, q)
    quantized_weights = {f"{p}.weight" for p in paths}
    assert set(got) == (set(reference) - quantized_weights) | {f"{p}.{leaf}" for p in paths for leaf in leaves(q)}
    for name, value in reference.items():
        if name not in quantized_weights:
            assert got[name].dtype == value.dtype and mx.array_equal(got[name], value), name
    for path in paths:
        expected = mx.quantize(reference[f"{path}.weight"], q.group_size, q.bits, mode=q.mode)
        for leaf, value in zip(leaves(q), expected):
            assert got[f"{path}.{leaf}"].dtype == value.dtype and mx.array_equal(got[f"{path}.{leaf}"], value), \
                (path, leaf)
    order = [t.name for t in sorted(SafetensorsReader(quantized / WEIGHTS).tensors.values(), key=lambda t: t.begin)]
    for path in paths:
        at = order.index(f"{path}.weight")
        assert order[at: at + len(leaves(q))] == [f"{path}.{leaf}" for leaf in leaves(q)], path
    assert section(quantized) == {"format_version": FORMAT_VERSION, "quantization": q.to_dict()}
    assert read_quantization(quantized, "model") == q
    return paths


def assert_dense_like(folder: Path, dense: Path | dict):
    """``folder`` is the dense conversion, tensor for tensor, and its config says nothing of quantization."""
    got = mx.load(str(folder / WEIGHTS))
    reference = dense if isinstance(dense, dict) else mx.load(str(dense / WEIGHTS))
    assert set(got) == set(reference)
    assert all(got[k].dtype == v.dtype and mx.array_equal(got[k], v) for k, v in reference.items())
    assert section(folder) == {"format_version": FORMAT_VERSION}


def section(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())[SECTION]


def converted(name: str, model, dtype=mx.float16) -> dict[str, mx.array]:
    """What the dense conversion of the torch ``model`` holds: its parameters under our names, in
    MLX layout, in ``dtype`` (test_convert_pipeline.py checks the converter against this)."""
    return {k: mx.array(v).astype(dtype) for k, v in expected_tensors(name, model).items()}


def assert_same_parameters(a, b):
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys()
    differ = [k for k in pa if pa[k].dtype != pb[k].dtype or not mx.array_equal(pa[k], pb[k])]
    assert not differ, differ[:5]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny diffusers SDXL pipeline (real CLIP vocabulary: it makes images) and its dense float16
    conversion, whole and UNet alone."""
    tmp = tmp_path_factory.mktemp("quantized")
    _, folder = diffusers_pipeline(tmp, refiner=False)
    convert(folder, tmp / "dense", progress=False)
    return folder, tmp / "dense"


# ---------------------------------------------------------------------- diffusers folders


def test_pipeline_folder_quantized(tmp_path, source, capsys):
    folder, dense = source
    result = convert(folder, tmp_path / "q8", quantize=8, q_group_size=32)
    out = tmp_path / "q8"
    log = capsys.readouterr().err
    assert "unet: diffusers folder" in log and "-> float16, 8-bit affine, groups of 32 (" in log
    assert log.strip().splitlines()[-1].endswith(
        "unet: 8-bit affine, groups of 32; text encoders: 8-bit affine, groups of 32; vae dense)")
    assert result.quantization == {"unet": Q8, "text_encoder": Q8, "text_encoder_2": Q8}
    for name in ("unet", *TEXT_ENCODERS):
        assert_quantized_like_dense(out / name, dense / name, Q8)
    assert_dense_like(out / "vae", dense / "vae")
    assert (out / "model_index.json").read_bytes() == (dense / "model_index.json").read_bytes()

    # Loading: quantized layers from the files; the same parameters as the dense folder quantized as it loads.
    unet = UNet2DConditionModel.from_pretrained(out / "unet", cpu_kernels=False)
    assert_same_parameters(unet, UNet2DConditionModel.from_pretrained(dense / "unet", cpu_kernels=False, quantize=Q8))
    for name in TEXT_ENCODERS:
        assert_same_parameters(CLIPTextModel.from_pretrained(out / name, cpu_kernels=False),
                               CLIPTextModel.from_pretrained(dense / name, cpu_kernels=False, quantize=Q8))
    pipe = SDXLPipeline.from_pretrained(out)
    images = pipe("a lighthouse at dusk", steps=2, height=SIZE, width=SIZE, seed=0)
    assert images.dtype == np.uint8 and images.shape == (1, SIZE, SIZE, 3) and images.std() > 0


def test_cli_four_bits_with_dense_text_encoders(tmp_path, source):
    folder, dense = source
    assert main([str(folder), str(tmp_path / "q4"), "--quantize", "4", "--quantize-text-encoders", "none",
                 "--quiet"]) == 0
    q4 = Quantization.make(4, 64)
    assert_quantized_like_dense(tmp_path / "q4" / "unet", dense / "unet", q4)
    for name in (*TEXT_ENCODERS, "vae"):
        assert_dense_like(tmp_path / "q4" / name, dense / name)
    assert SDXLPipeline.from_pretrained(tmp_path / "q4")("x", steps=1, height=SIZE, width=SIZE, seed=1).dtype == np.uint8


def test_unet_only_float32_scales(tmp_path, source):
    folder, _ = source
    convert(folder, tmp_path / "dense", dtype="float32", unet_only=True, progress=False)
    result = convert(folder, tmp_path / "q", dtype="float32", unet_only=True, quantize=8, progress=False)
    assert result.quantization == {"unet": Quantization.make(8)}
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", WEIGHTS]
    assert_quantized_like_dense(tmp_path / "q", tmp_path / "dense", Quantization.make(8))
    scales = [v.dtype for k, v in mx.load(str(tmp_path / "q" / WEIGHTS)).items() if k.endswith((".scales", ".biases"))]
    assert set(scales) == {mx.float32}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mxfp8", "mxfp4"])
def test_microscaling_modes(tmp_path, source, mode):
    if not mode_available(mode):
        pytest.skip(f"this MLX has no {mode}")
    folder, dense = source
    bits = int(mode[-1])
    result = convert(folder, tmp_path / mode, quantize=bits, q_mode=mode, progress=False)
    unet, text = Quantization.make(bits, 32, mode), Quantization.make(8, 32, "mxfp8")  # mxfp8 beside mxfp4
    assert result.quantization == {"unet": unet, "text_encoder": text, "text_encoder_2": text}
    assert_quantized_like_dense(tmp_path / mode / "unet", dense / "unet", unet)
    for name in TEXT_ENCODERS:
        assert_quantized_like_dense(tmp_path / mode / name, dense / name, text)
    images = SDXLPipeline.from_pretrained(tmp_path / mode)("x", steps=1, height=SIZE, width=SIZE, seed=2)
    assert images.dtype == np.uint8 and images.shape == (1, SIZE, SIZE, 3)


def test_hub_repo_quantized(tmp_path, source, monkeypatch):
    folder, dense = source
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "someone/sdxl", files)))
    convert("someone/sdxl", tmp_path / "mlx", quantize=8, q_group_size=32, progress=False)
    for name in ("unet", *TEXT_ENCODERS):
        assert_quantized_like_dense(tmp_path / "mlx" / name, dense / name, Q8)
    assert_dense_like(tmp_path / "mlx" / "vae", dense / "vae")


# ---------------------------------------------------------------------- original single files


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    """An SDXL refiner single file at SDXL's widths (as single-file inference needs), shallow."""
    parts = make_parts(SINGLE_FILE_FAMILIES["sdxl-refiner"], None,
                       CLIPTextConfig.from_preset("sdxl-clip-bigg", vocab_size=300, num_hidden_layers=2,
                                                  intermediate_size=64),
                       VAEConfig.from_preset("sdxl", block_out_channels=[32, 32, 64, 64], layers_per_block=1), seed=70)
    return parts, write_single_file(tmp_path_factory.mktemp("single") / "sd_xl_refiner.safetensors", parts)


def test_single_file_quantized(tmp_path, source, refiner_file):
    parts, path = refiner_file
    result = convert(path, tmp_path / "q", tokenizers=source[0], quantize=4, progress=False)
    q4, text = Quantization.make(4, 64), Quantization.make(8, 64)
    assert result.quantization == {"unet": q4, "text_encoder_2": text}
    assert_quantized_like_dense(tmp_path / "q" / "unet", converted("unet", parts.models["unet"]), q4)
    assert_quantized_like_dense(tmp_path / "q" / "text_encoder_2",
                                converted("text_encoder_2", parts.models["text_encoder_2"]), text)
    assert_dense_like(tmp_path / "q" / "vae", converted("vae", parts.models["vae"], mx.float32))
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path / "q" / "unet").mid_block, object)


@pytest.mark.slow  # the fast tier converts a single file in test_single_file_quantized
def test_single_file_unet_only_from_the_command_line(tmp_path, capsys):
    config = SINGLE_FILE_FAMILIES["sdxl-base"]
    reference = torch_unet(config, seed=36)
    path = write_unet_single_file(tmp_path / "model.safetensors", reference, config)
    assert main([str(path), str(tmp_path / "q"), "--unet-only", "--quantize", "8", "--q-group-size", "128"]) == 0
    log = capsys.readouterr().err
    assert "  quantized: 8-bit affine, groups of 128 (" in log and log.strip().endswith("unet: 8-bit affine, groups of 128)")
    q = Quantization.make(8, 128)
    assert_quantized_like_dense(tmp_path / "q", converted("unet", reference), q)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "q")  # the CPU kernels too
    out = unet(mx.zeros((1, 8, 8, 4)), 10, mx.zeros((1, 7, config.cross_attention_dim)),
               text_embeds=mx.zeros((1, 1280)), time_ids=mx.zeros((1, 6)))
    assert bool(mx.all(mx.isfinite(out)))


# ---------------------------------------------------------------------- memory

# A UNet whose weights dwarf MLX's and Python's overheads, and mostly Linear (attention and
# feed-forward: 79% of its 53 M parameters), in float16: 106 MB dense.
MEDIUM = dict(block_out_channels=[64, 128, 256], transformer_layers_per_block=[1, 4, 8], layers_per_block=1)
MIB = 2**20


def write_random_unet(folder: Path, config: UNetConfig) -> int:
    """A diffusers UNet folder of random float16 weights (numpy: no reference model needed here);
    returns its largest tensor's element count."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in model_shapes(UNet2DConditionModel(config)).items():
        shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        scale = 1 / math.sqrt(math.prod(shape[1:]) or 1)
        tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.library_dict()))
    return max(v.size for v in tensors.values())


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("medium")
    largest = write_random_unet(tmp / "source", UNetConfig.from_preset("tiny", **MEDIUM))
    convert(tmp / "source", tmp / "dense", unet_only=True, progress=False)
    convert(tmp / "source", tmp / "q8", unet_only=True, quantize=8, progress=False)
    return tmp, largest


def tensor_bytes(folder: Path) -> int:
    return sum(t.end - t.begin for t in SafetensorsReader(folder / WEIGHTS).tensors.values())


def load_peak(folder: Path, **kwargs) -> int:
    """MLX's peak memory above what was in use, while ``from_pretrained`` loads ``folder``."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = UNet2DConditionModel.from_pretrained(folder, **kwargs)
    peak = mx.get_peak_memory() - before
    del model
    mx.clear_cache()
    return peak


def test_quantized_folder_loads_without_a_dense_copy(medium):
    tmp, largest = medium
    quantized, dense = tensor_bytes(tmp / "q8"), tensor_bytes(tmp / "dense")
    plain = load_peak(tmp / "q8", cpu_kernels=False)
    kernels = load_peak(tmp / "q8")  # the CPU kernels lay each weight out anew: one copy at a time
    dense_peak = load_peak(tmp / "dense", cpu_kernels=False)
    at_load = load_peak(tmp / "dense", cpu_kernels=False, quantize=8)  # quantized as it loads
    print(f"quantized {quantized / MIB:.1f} MiB (dense {dense / MIB:.1f}); load peaks: quantized folder "
          f"{plain / MIB:.1f} (CPU kernels {kernels / MIB:.1f}), dense folder {dense_peak / MIB:.1f}, dense folder "
          f"quantized at load {at_load / MIB:.1f} MiB")
    assert quantized < 0.7 * dense
    assert quantized <= plain <= quantized + MIB
    assert kernels <= quantized + 2 * largest * 2 + MIB
    assert at_load <= quantized + 2 * largest * 2 + MIB
    assert dense_peak >= dense and plain < 0.7 * dense_peak


# The converter in a process of its own: its peak resident memory (VmHWM) and MLX's peak.
MEASURE = (
    "import sys; import mlx.core as mx; from mlx_unet.cli.convert import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('peak', int(hwm) * 1024, mx.get_peak_memory(), file=sys.stderr); sys.exit(rc)"
)


def measure_convert(*args) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args), "--quiet", "--force"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rss, mlx_peak = proc.stderr.split("peak")[1].split()
    return int(rss), int(mlx_peak)


def test_converter_holds_about_one_dense_tensor(tmp_path, medium, source):
    tmp, largest = medium
    baseline, _ = measure_convert(source[0] / "unet", tmp_path / "tiny", "--unet-only", "--quantize", "8")
    rss, mlx_peak = measure_convert(tmp / "source", tmp_path / "q8", "--unet-only", "--quantize", "8")
    assert tensor_bytes(tmp_path / "q8") == tensor_bytes(tmp / "q8")
    dense = tensor_bytes(tmp / "dense")
    print(f"converter: MLX peak {mlx_peak / MIB:.1f} MiB (largest tensor {largest * 4 / MIB:.1f} MiB in float32); "
          f"resident peak {(rss - baseline) / MIB:.1f} MiB above a tiny model's, for {dense / MIB:.1f} MiB of weights")
    assert mlx_peak <= 3 * largest * 4  # the dense tensor read, cast and quantized: one at a time
    assert rss - baseline < 0.5 * dense  # never the model whole (MLX's buffer cache included)

"""``generate --quantize``: bad settings are one sentence and exit 2 before anything loads (the
bits, a group size or mode that does not fit, quantization flags without --quantize, fusing LoRAs
into a quantized UNet); a good run quantizes as it loads, says so and writes its image."""

from __future__ import annotations

import pytest
from bad_input_helpers import PROMPT, RUN, assert_user_error, run_cli, run_in_process


@pytest.mark.parametrize("args, words", [
    (["--quantize", "3"], ["--quantize", "invalid choice: 3"]),
    (["--quantize", "4", "--q-group-size", "48"], ["--q-group-size", "invalid choice: 48"]),
    (["--quantize", "8", "--q-mode", "mxfp4"], ["mxfp4 quantization takes 4 bits, got 8"]),
    (["--q-group-size", "32"], ["go with --quantize"]),
    (["--quantize-text-encoders", "4"], ["go with --quantize"]),
    (["--quantize", "4", "--lora", "style.safetensors", "--lora-mode", "fuse"], ["--lora-mode fuse", "quantized UNet"]),
], ids=["bits", "group", "mode-bits", "group-alone", "text-alone", "fuse-lora"])
def test_bad_quantization_settings_are_refused_before_loading(tiny_pipeline, tmp_path, args, words):
    (tmp_path / "style.safetensors").write_bytes(b"")  # never read: the refusal comes first
    out = tmp_path / "out.png"
    proc = run_in_process("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN,
                          *[str(tmp_path / a) if a.endswith(".safetensors") else a for a in args])
    assert_user_error(proc, *words)
    assert not out.exists()


def test_a_quantized_run_says_so_and_writes_its_image(tiny_pipeline, tmp_path):
    out = tmp_path / "q.png"
    proc = run_cli("generate", PROMPT, "--model", str(tiny_pipeline), "-o", str(out), *RUN[:-1],
                   "--quantize", "4", "--q-group-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "UNet: 4-bit affine, groups of 32" in proc.stderr and "text encoders: 8-bit affine, groups of 32" in proc.stderr
    assert out.stat().st_size > 0

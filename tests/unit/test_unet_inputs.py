"""Wrong input to the UNet gets one clear sentence, raised before any computation."""

import mlx.core as mx
import pytest

from mlx_unet import InputError, UNet2DConditionModel, UNetConfig, cpu


@pytest.fixture(scope="module")
def sdxl():
    return UNet2DConditionModel(UNetConfig.from_preset("tiny"))


@pytest.fixture(scope="module")
def sd15():
    return UNet2DConditionModel(
        UNetConfig.from_preset("sd15", block_out_channels=[32, 32, 32, 32], norm_num_groups=8, cross_attention_dim=24)
    )


def good(batch=2):
    return dict(
        sample=mx.zeros((batch, 16, 16, 4)),
        timestep=10,
        encoder_hidden_states=mx.zeros((batch, 5, 48)),
        text_embeds=mx.zeros((batch, 40)),
        time_ids=mx.zeros((batch, 6)),
    )


def call(model, **changes):
    args = {**good(), **changes}
    return model(args.pop("sample"), args.pop("timestep"), args.pop("encoder_hidden_states"), **args)


def test_good_call_runs(sdxl):
    assert call(sdxl).shape == (2, 16, 16, 4)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"sample": mx.zeros((2, 4, 16, 16))}, "looks like NCHW, transpose it with sample.transpose(0, 2, 3, 1)"),
        ({"sample": mx.zeros((2, 16, 16, 3))}, "sample has 3 channels in its last axis but this UNet takes 4"),
        ({"sample": mx.zeros((16, 16, 4))}, "sample must be (batch, height, width, 4) NHWC, got shape (16, 16, 4)"),
        ({"encoder_hidden_states": mx.zeros((2, 5, 768))}, "encoder_hidden_states has width 768 but this UNet's cross-attention takes 48"),
        ({"encoder_hidden_states": mx.zeros((5, 48))}, "encoder_hidden_states must be (batch, tokens, 48), got (5, 48)"),
        ({"encoder_hidden_states": mx.zeros((1, 5, 48))}, "encoder_hidden_states has batch 1 but sample has batch 2"),
        ({"text_embeds": None}, "needs text_embeds: the pooled text embedding"),
        ({"time_ids": None}, "needs time_ids: the pooled text embedding"),
        ({"text_embeds": None, "time_ids": None}, "needs text_embeds and time_ids"),
        ({"text_embeds": mx.zeros((1, 40))}, "text_embeds must be (2, width) for a batch of 2, got (1, 40)"),
        ({"time_ids": mx.zeros((2, 5))}, "text_embeds width 40 + 5 time ids x 8 = 80, but add_embedding takes 88"),
        ({"time_ids": mx.zeros((3, 6))}, "time_ids must be (2, n) for a batch of 2, got (3, 6)"),
        ({"timestep": mx.array([1, 2, 3])}, "timestep must be a scalar, shape (1,) or shape (2,) for a batch of 2, got shape (3,)"),
        ({"sample": [[0.0]]}, "sample must be an mlx array, got list"),
    ],
)
def test_bad_input_message(sdxl, changes, message):
    with pytest.raises(InputError) as err:
        call(sdxl, **changes)
    assert message in str(err.value)


def test_added_conditioning_refused_when_model_has_none(sd15):
    with pytest.raises(InputError, match="no added conditioning"):
        sd15(mx.zeros((1, 16, 16, 4)), 1, mx.zeros((1, 3, 24)), text_embeds=mx.zeros((1, 40)))


def test_time_ids_shared_across_batch_are_broadcast(sdxl):
    args = good()
    shared = call(sdxl, time_ids=mx.array([1024.0, 1024, 0, 0, 1024, 1024]))
    per_item = call(sdxl, time_ids=mx.broadcast_to(mx.array([1024.0, 1024, 0, 0, 1024, 1024]), (2, 6)))
    assert mx.array_equal(shared, per_item)
    assert args["sample"].shape == shared.shape


def test_inputs_are_cast_to_the_model_dtype(sdxl):
    half = UNet2DConditionModel(sdxl.config)
    half.set_dtype(mx.float16)
    out = call(half)
    assert out.dtype == mx.float16


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["plain", "cpu-kernels"])
def test_text_keys_values_made_once_give_the_same_output(sdxl, cpu_kernels):
    """What a sampler does (the prompt's cross-attention keys and values made once, reused every
    step) computes exactly what the UNet computes from the prompt itself."""
    model = cpu.prepare(UNet2DConditionModel(sdxl.config), cpu_kernels)
    mx.random.seed(3)
    args = {name: mx.random.normal(a.shape) for name, a in good().items() if name != "timestep"}
    context = args.pop("encoder_hidden_states")
    direct = model(args["sample"], 10, context, args["text_embeds"], args["time_ids"])
    reused = model(args["sample"], 10, None, args["text_embeds"], args["time_ids"],
                   cross_attention_kv=model.cross_attention_kv(context))
    assert mx.array_equal(direct, reused)


@pytest.mark.parametrize(
    "context,text_kv,message",
    [
        (True, True, "either encoder_hidden_states or cross_attention_kv"),
        (False, False, "either encoder_hidden_states or cross_attention_kv"),
        (False, {"down": []}, "must be what this UNet's cross_attention_kv() returned"),
        (False, "one", "another batch size than the sample's 2"),
    ],
)
def test_bad_text_keys_values_are_explained(sdxl, context, text_kv, message):
    args = good()
    made = sdxl.cross_attention_kv(args["encoder_hidden_states"][:1] if text_kv == "one" else args["encoder_hidden_states"])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sdxl(args["sample"], 10, args["encoder_hidden_states"] if context else None, args["text_embeds"],
             args["time_ids"], cross_attention_kv=text_kv if isinstance(text_kv, dict) else made if text_kv else None)

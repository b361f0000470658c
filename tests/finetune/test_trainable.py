import torch

from exporter.finetune.distill import _optimizer
from exporter.finetune.trainable import TrainableQuantLayer, lsq_fake_quant
from exporter.models import load_model
from exporter.quant.formats import FORMATS, fake_quant
from exporter.quant.ptq import QuantLayer, quantize_model
from exporter.recipe import FinetuneSpec, QuantizationSpec


def quantized_layers(tiny_unet_dir, tiny_unet_calib, **spec):
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QuantizationSpec(**spec), tiny_unet_calib)
    loaded.model._exporter_context.t = 500.0
    return loaded, {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLayer)}


def test_at_the_start_the_trainable_layer_is_the_ptq_layer(tiny_unet_dir, tiny_unet_calib):
    for weights in ("int8", "int4"):
        _, layers = quantized_layers(tiny_unet_dir, tiny_unet_calib, weights=weights, groups=2, split_shortcut=True)
        for layer in layers.values():
            x = torch.randn(2, layer.layer.weight.shape[1], *([6, 6] if layer.layer.weight.ndim == 4 else []))
            with torch.no_grad():
                assert torch.equal(TrainableQuantLayer(layer, rank=4)(x), layer(x)), (weights, layer.name)


def test_lsq_step_gradient_and_straight_through_rounding():
    step = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.26, -0.04, 50.0], requires_grad=True)  # inside, inside, clipped at 127 * 0.1
    out = lsq_fake_quant(x, step, FORMATS["int8"])
    assert torch.allclose(out, fake_quant(x.detach(), step.detach(), FORMATS["int8"]))
    out.sum().backward()
    # d/ds of round(x/s)*s: round(x/s) - x/s inside the range (0.4 and 0.4), the bound outside (127)
    assert torch.allclose(step.grad, torch.tensor(0.4 + 0.4 + 127.0), atol=1e-4)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_merge_writes_exactly_what_training_computed(tiny_unet_dir, tiny_unet_calib):
    _, layers = quantized_layers(tiny_unet_dir, tiny_unet_calib, weights="int4", activations="int8", groups=2)
    torch.manual_seed(0)
    for layer in list(layers.values())[:6]:
        trainable = TrainableQuantLayer(layer, rank=4)
        with torch.no_grad():
            trainable.lora_B.normal_(0, 0.05)
            for log_step in trainable.log_steps():
                log_step.normal_(0, 0.2)
        x = torch.randn(3, layer.layer.weight.shape[1], *([5, 5] if layer.layer.weight.ndim == 4 else []))
        with torch.no_grad():
            trained, before = trainable(x), layer(x)
            trainable.merge()
            merged = layer(x)
        assert not torch.equal(trained, before)
        torch.testing.assert_close(merged, trained, rtol=0, atol=1e-5)


def test_a_step_of_one_timestep_group_leaves_the_other_groups_steps_alone(tiny_unet_dir, tiny_unet_calib):
    # EfficientDM's temporal LSQ: steps of one group learn only on that group's timesteps. Adam's
    # momentum must not carry a group's step on while another group's timesteps train.
    loaded, layers = quantized_layers(tiny_unet_dir, tiny_unet_calib, weights="int8", activations="int8", groups=2)
    context = loaded.model._exporter_context
    group_t = {context.groups.group_of(t): t for t in (10.0, 990.0)}
    assert sorted(group_t) == [0, 1]
    layer = next(layer for layer in layers.values() if layer.afmt is not None)
    trainable = TrainableQuantLayer(layer, rank=4)
    assert len(trainable.log_steps()) == 2
    optimizer = _optimizer({"layer": trainable}, FinetuneSpec(lr=1e-2, scale_lr=1e-2))
    x = torch.randn(3, layer.layer.weight.shape[1], *([5, 5] if layer.layer.weight.ndim == 4 else []))
    for group in (0, 0, 1, 1):  # momentum is built on group 0, then group 1 trains
        context.t = group_t[group]
        optimizer.zero_grad(set_to_none=True)
        (trainable(x) - 1.0).square().mean().backward()
        optimizer.step()
        if group == 0:
            after_group_0 = trainable.log_step()
    assert not torch.equal(after_group_0[0], torch.zeros_like(after_group_0[0]))
    assert torch.equal(trainable.log_step()[0], after_group_0[0])  # untouched by group 1's steps
    assert not torch.equal(trainable.log_step()[1], torch.zeros_like(after_group_0[1]))

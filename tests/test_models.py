import pytest
import torch
from safetensors.torch import save_file

from kdforge.errors import ModelError
from kdforge.models import IMAGENET_MEAN, count_parameters, create_model, resolve_input_spec
from kdforge.recipe import ModelConfig
from kdforge.train.assemble import check_input_size


@pytest.mark.parametrize(
    ("name", "size", "mean"),
    [
        ("vit_base_patch16_224", 224, (0.5, 0.5, 0.5)),  # a ViT normalized for itself, not for ResNets
        ("resnet152", 224, IMAGENET_MEAN),
        ("mobilevit_s", 256, (0.0, 0.0, 0.0)),
    ],
)
def test_input_spec_comes_from_timm_per_model(name, size, mean):
    spec = resolve_input_spec(ModelConfig(model=name))
    assert spec.size == size
    assert spec.mean == pytest.approx(mean)


def test_recipe_values_override_timm_and_vit_img_size_sets_the_input_size():
    spec = resolve_input_spec(ModelConfig(model="mobilevit_s", input_size=224, mean=(0.1, 0.2, 0.3)))
    assert spec.size == 224 and spec.mean == (0.1, 0.2, 0.3) and spec.std == (1.0, 1.0, 1.0)
    vit = ModelConfig(model="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 4})
    assert resolve_input_spec(vit).size == 32
    model = create_model(vit, num_classes=100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_wrong_input_size_is_a_clear_error_before_training():
    cfg = ModelConfig(model="vit_tiny_patch16_224", input_size=32)
    model = create_model(cfg, num_classes=10)
    with pytest.raises(ModelError, match=r"does not accept 32x32 inputs.*img_size = 32"):
        check_input_size(model, resolve_input_spec(cfg), cfg.model)


def test_bad_model_kwargs_are_a_clear_error():
    with pytest.raises(ModelError, match="model_kwargs"):
        create_model(ModelConfig(model="test_resnet", model_kwargs={"no_such_arg": 1}), num_classes=10)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_like_pretrained_and_reset_the_classifier(tmp_path, suffix):
    source = create_model(ModelConfig(model="test_resnet"), num_classes=1000)  # "ImageNet" weights
    path = tmp_path / f"imagenet{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = create_model(ModelConfig(model="test_resnet", weights=str(path)), num_classes=100)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)  # the body came from the file
    assert model.fc.weight.shape == (100, source.fc.weight.shape[1])  # the head fits 100 classes
    assert count_parameters(model) < count_parameters(source)


def test_offline_pretrained_says_how_to_supply_weights(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"could not download pretrained weights.*weights = "):
        create_model(ModelConfig(model="test_resnet", pretrained=True), num_classes=100)

"""Model factory, weights on disk (safetensors + spec, no pickle) and initialization strategies."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.convnext import SIZES, create_model
from models.initialization import MissingWeightsError, initialize
from models.weights import ModelSpec, load_model, save_model


def test_factory_gives_five_label_grayscale_models_without_layer_scale():
    model = create_model("atto")
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 5)
    assert all(getattr(m, "gamma", None) is None for m in model.modules())
    with pytest.raises(ValueError, match="unknown ConvNeXt size 'huge'"):
        create_model("huge")
    assert SIZES == ("micro", "atto", "femto", "pico", "nano", "tiny", "small", "base")


def test_weights_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = create_model("atto")
    spec = ModelSpec(size="atto", image_size=64, init={"strategy": "scratch"})
    save_model(model, spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "spec.json"]
    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec == spec and json.loads((tmp_path / "spec.json").read_text())["architecture"] == "convnext_atto"
    x = torch.randn(3, 1, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(tmp_path)


def fake_hub_cache(root, repo, state_dict):
    """A Hugging Face cache laid out as `hf download` leaves it, holding a timm-format weights file."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))


def test_imagenet_weights_load_offline_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(1)
    rgb = timm.create_model("convnext_atto", num_classes=1000)       # the layout of timm's released file
    fake_hub_cache(tmp_path, "timm/convnext_atto.d2_in1k", rgb.state_dict())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    loaded = initialize("imagenet", "atto", seed=0)
    assert loaded.provenance["source"] == "convnext_atto.d2_in1k"
    model = loaded.model
    # The RGB stem is summed to one channel (= a gray image replicated to RGB); the 1000-class head is replaced.
    torch.testing.assert_close(model.stem[0].weight, rgb.stem[0].weight.sum(dim=1, keepdim=True))
    assert model.head.fc.weight.shape == (5, rgb.head.fc.weight.shape[1])
    block = rgb.stages[0].blocks[0]
    torch.testing.assert_close(model.stages[0].blocks[0].mlp.fc2.bias, block.mlp.fc2.bias * block.gamma)


def test_dinov3_weights_load_offline_in_the_layout_timm_publishes(tmp_path, monkeypatch):
    """timm's convnext_tiny.dinov3_lvd1689m file: RGB stem, layer-scale gamma, the final norm, no classifier
    (num_classes 0). Generated locally in that exact key layout, it loads with a fresh five-label head."""
    torch.manual_seed(4)
    dinov3 = timm.create_model("convnext_tiny", num_classes=0)
    assert not any(key.startswith("head.fc") for key in dinov3.state_dict())
    assert "head.norm.weight" in dinov3.state_dict() and "stages.0.blocks.0.gamma" in dinov3.state_dict()
    fake_hub_cache(tmp_path, "timm/convnext_tiny.dinov3_lvd1689m", dinov3.state_dict())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    loaded = initialize("dinov3", "tiny", seed=0)
    assert loaded.provenance == {"strategy": "dinov3", "source": "convnext_tiny.dinov3_lvd1689m",
                                 "file": str(tmp_path / "models--timm--convnext_tiny.dinov3_lvd1689m/snapshots/"
                                             "0123456789abcdef/model.safetensors")}
    model = loaded.model
    torch.testing.assert_close(model.stem[0].weight, dinov3.stem[0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.head.norm.weight, dinov3.head.norm.weight)
    block = dinov3.stages[3].blocks[2]
    torch.testing.assert_close(model.stages[3].blocks[2].mlp.fc2.weight, block.mlp.fc2.weight * block.gamma[:, None])
    assert model.head.fc.weight.shape == (5, 768)
    # Features as DINOv3 gives them: the same pooled, normalised output for a gray image replicated to RGB.
    gray = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(model.eval().forward_head(model.forward_features(gray), pre_logits=True),
                               dinov3.eval()(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"model.safetensors of timm/convnext_tiny.dinov3_lvd1689m .*hf download"):
        initialize("dinov3", "tiny", seed=0)
    with pytest.raises(ValueError, match="no dinov3 weights exist for convnext_atto"):
        initialize("dinov3", "atto", seed=0)
    with pytest.raises(ValueError, match="unknown initialization 'random'"):
        initialize("random", "atto", seed=0)


def test_checkpoint_init_from_a_saved_model(tmp_path):
    torch.manual_seed(2)
    model = create_model("femto")
    save_model(model, ModelSpec(size="femto", image_size=64), tmp_path / "m")
    loaded = initialize(f"checkpoint:{tmp_path / 'm'}", "femto", seed=0).model
    torch.testing.assert_close(loaded.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])
    with pytest.raises(ValueError, match="is convnext_femto, not convnext_atto"):
        initialize(f"checkpoint:{tmp_path / 'm'}", "atto", seed=0)
    with pytest.raises(MissingWeightsError, match="not found"):
        initialize(f"checkpoint:{tmp_path / 'nothing'}", "atto", seed=0)


def test_predict_computes_in_eval_mode_and_restores_each_module_s_mode():
    """Dropout off while predicting, whatever mode each module was in; afterwards every module's mode as before."""
    import numpy as np

    from models.convnext import predict

    model = timm.create_model("convnext_atto", in_chans=1, num_classes=5, drop_rate=0.9)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    expected = predict(model.eval(), images)
    model.head.train()                              # only the head (with its dropout) in training mode
    before = {name: module.training for name, module in model.named_modules()}
    np.testing.assert_array_equal(predict(model, images), expected)
    assert {name: module.training for name, module in model.named_modules()} == before
    model.train()
    np.testing.assert_array_equal(predict(model, images), expected)
    assert all(module.training for module in model.modules())


def test_onednn_pointwise_computes_small_batches_with_onednn_and_the_same_outputs():
    """On one thread, 3-15 images: the 1x1 convolutions leave PyTorch's fallback kernel for oneDNN; outputs, state
    dict and training (with gradients) are unchanged, and one or two images keep the fallback."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from models.convnext import normalize, predict, use_onednn_pointwise

    def kernels(model: torch.nn.Module, images: np.ndarray) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            predict(model, images)
        return {event.key for event in trace.key_averages()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_model("micro").eval()
        switched = use_onednn_pointwise(create_model("micro", model.state_dict()).eval())
        images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
        assert "aten::_slow_conv2d_forward" in kernels(model, images)       # PyTorch's own choice at 5 images
        assert "aten::_slow_conv2d_forward" not in kernels(switched, images)
        assert "aten::_slow_conv2d_forward" in kernels(switched, images[:2])
        for batch in (1, 2, 5, 16):
            np.testing.assert_allclose(predict(switched, images.repeat(4, axis=0)[:batch]),
                                       predict(model, images.repeat(4, axis=0)[:batch]), rtol=0, atol=1e-6)
        assert switched.state_dict().keys() == model.state_dict().keys()
        conv = torch.nn.Conv2d(4, 8, 1)
        unbatched = torch.randn(4, 6, 6)                                      # (C, H, W), as Conv2d accepts
        with torch.inference_mode():
            expected = torch.nn.functional.conv2d(unbatched, conv.weight, conv.bias)
            torch.testing.assert_close(use_onednn_pointwise(conv)(unbatched), expected)
        x = normalize(torch.from_numpy(images))
        model(x).sum().backward()
        switched(x).sum().backward()
        for (name, a), b in zip(model.named_parameters(), switched.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    finally:
        torch.set_num_threads(threads)

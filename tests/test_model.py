from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
from torchvision.models import resnet34

import deeplense.model as model_mod
from deeplense.model import RESNET34_FILE, build_model, hub_checkpoint_path
from deeplense.testing import TouchOnLoad
from deeplense.util import DeepLenseError


@pytest.fixture
def offline(monkeypatch):
    """No network: the torchvision download raises as it does on an offline node."""

    def fail(*args):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(model_mod, "_download_imagenet", fail)


def _plant(path, seed=1):
    torch.manual_seed(seed)
    sd = resnet34(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def test_head_shape():
    model, info = build_model("none")
    assert model.fc.out_features == 3 and model.fc.in_features == 512
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert info["pretrained"] is False and info["source"] == "random"


def test_imagenet_from_planted_torch_hub_cache(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = hub_checkpoint_path()
    assert cached == tmp_path / "th" / "hub" / "checkpoints" / RESNET34_FILE
    sd = _plant(cached)
    model, info = build_model("imagenet")
    assert info["pretrained"] and info["source"] == "imagenet"
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[2].bn2.running_var, sd["layer4.2.bn2.running_var"], rtol=0, atol=0)
    assert model.fc.out_features == 3
    model, info = build_model("auto")
    assert info["pretrained"] and info["warning"] is None


def test_imagenet_unavailable_names_the_cache_path(offline):
    with pytest.raises(DeepLenseError) as exc:
        build_model("imagenet")
    last = str(exc.value).splitlines()[-1]
    assert str(hub_checkpoint_path()) in last


def test_auto_falls_back_loudly(offline):
    with pytest.warns(UserWarning, match="RANDOM initial weights"):
        model, info = build_model("auto")
    assert info["pretrained"] is False and "RANDOM" in info["warning"]
    assert str(hub_checkpoint_path()) in info["warning"]


def test_explicit_file(tmp_path):
    sd = _plant(tmp_path / "my_weights.pth", seed=3)
    model, info = build_model(str(tmp_path / "my_weights.pth"))
    assert info["pretrained"] and info["source"].endswith("my_weights.pth")
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)


def test_explicit_file_named_like_torchvision_must_match_hash(tmp_path):
    path = tmp_path / RESNET34_FILE
    _plant(path)
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith("b627a593")
    with pytest.raises(DeepLenseError, match="sha256"):
        build_model(str(path))


def test_wrong_files(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(DeepLenseError, match="text.pth: not a loadable state dict"):
        build_model(str(tmp_path / "text.pth"))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "keys.pth")
    with pytest.raises(DeepLenseError, match="keys.pth: not ImageNet resnet34 weights"):
        build_model(str(tmp_path / "keys.pth"))
    with pytest.raises(DeepLenseError, match="not found"):
        build_model(str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("where", ["explicit_file", "torch_hub_cache"])
def test_pickled_code_is_refused_and_never_run(tmp_path, where, offline):
    marker = tmp_path / "code-ran"
    sd = resnet34(weights=None).state_dict()
    sd["extra"] = TouchOnLoad(marker)
    path = tmp_path / "evil.pth" if where == "explicit_file" else hub_checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    if where == "explicit_file":
        with pytest.raises(DeepLenseError, match="evil.pth: not a loadable state dict"):
            build_model(str(path))
    else:
        with pytest.warns(UserWarning, match="RANDOM initial weights"):
            _, info = build_model("auto")
        assert info["pretrained"] is False
    assert not marker.exists(), "loading the weights ran code from the file"


# ------------------------------------------------------------------------------------------------ every arch
TORCHVISION = ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b3",
               *(pytest.param(a, marks=pytest.mark.slow) for a in ("convnext_tiny", "swin_t", "vit_b_16", "maxvit_t"))]
SIDE = {"maxvit_t": 224}  # the smallest input each network takes; 32 px for the others (vit_b_16: 2 x 2 patches)


@pytest.mark.parametrize("arch", TORCHVISION)
def test_imagenet_weights_of_each_arch_from_a_planted_hub_file(arch, offline):
    from torchvision.models import get_model

    cached = hub_checkpoint_path(arch)
    assert cached.name == model_mod.hub_file(arch) and cached.name.endswith(".pth")
    torch.manual_seed(2)
    sd = get_model(arch, weights=None).state_dict()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, cached)
    side = SIDE.get(arch, 32)
    model, info = build_model("auto", arch=arch, image_size=side)
    assert info["pretrained"] and info["source"] == "imagenet" and info["warning"] is None
    first = next(k for k in sd if k.endswith("weight"))
    torch.testing.assert_close(model.state_dict()[first], sd[first], rtol=0, atol=0)
    assert model(torch.zeros(2, 3, side, side)).shape == (2, 3)
    if arch == "vit_b_16":  # ImageNet's 14 x 14 position embeddings, interpolated to this input's 2 x 2 patches
        from torchvision.models.vision_transformer import interpolate_embeddings

        expected = interpolate_embeddings(side, 16, {"encoder.pos_embedding": sd["encoder.pos_embedding"]})
        assert model.encoder.pos_embedding.shape == (1, 1 + (side // 16) ** 2, 768)
        torch.testing.assert_close(model.encoder.pos_embedding, expected["encoder.pos_embedding"], rtol=0, atol=0)
    # the wrong network's file under that name is refused with the arch named
    torch.save(resnet34(weights=None).state_dict(), cached)
    with pytest.raises(DeepLenseError, match=f"not ImageNet {arch} weights"):
        build_model("imagenet", arch=arch, image_size=side)


@pytest.mark.parametrize("attention", ["se", "cbam", "mhsa"])
def test_resnet34_with_attention_starts_as_the_imagenet_resnet34(attention, offline):
    """resnet34_attn loads ImageNet ResNet34's weights (the same hub file) and, until it trains, computes exactly
    what that ResNet34 computes: every attention module starts as the identity."""
    from deeplense.model import add_attention

    cached = hub_checkpoint_path("resnet34_attn")
    assert cached == hub_checkpoint_path("resnet34")
    torch.manual_seed(3)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet34(weights=None).state_dict(), cached)
    model, info = build_model("auto", arch="resnet34_attn", attention=attention)
    plain, _ = build_model("auto", arch="resnet34")
    assert info["pretrained"] and info["attention"] == attention
    model.eval(), plain.eval()
    plain.fc.load_state_dict(model.fc.state_dict())  # the same new head
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra > 0  # the attention has weights of its own, which training moves
    with pytest.raises(DeepLenseError, match="unknown attention"):
        add_attention(plain, "transformer")


def test_lensnet_is_small_single_channel_and_has_no_imagenet_weights():
    from deeplense.model import LensNet, parameter_count

    model, info = build_model("auto", arch="lensnet")
    assert isinstance(model, LensNet) and info["pretrained"] is False and info["warning"] is None
    assert 2_000_000 < parameter_count(model) < 4_000_000
    assert model(torch.zeros(2, 1, 150, 150)).shape == (2, 3) and model(torch.zeros(2, 1, 96, 96)).shape == (2, 3)
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, 3, 150, 150))  # one channel only
    with pytest.raises(DeepLenseError, match="lensnet trains from scratch"):
        build_model("imagenet", arch="lensnet")


def test_readme_weights_table_names_each_networks_file():
    """Users copy these names into an offline hub cache: each must be the file torchvision looks for."""
    from deeplense.config import ARCHS
    from deeplense.util import REPO

    readme = (REPO / "docs" / "networks.md").read_text()
    table = readme[readme.index("| `--arch` | ImageNet weights file | input side |"):]
    table = table[: table.index("\n\n")]
    for arch in ARCHS:
        row = next(line for line in table.splitlines() if f"`{arch}`" in line)
        if arch not in ("lensnet", "d4net"):
            assert f"`{model_mod.hub_file(arch)}`" in row, (arch, row)

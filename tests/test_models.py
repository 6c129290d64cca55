"""spn.models: WSOL heads, class response maps, backbones, VGG16 weight loading, training."""

import functools

import pytest
import torch
import torch.nn.functional as F

import spn
from spn.models import (
    CAMHead,
    HeadOutput,
    Network,
    SmallBackbone,
    SPNHead,
    VGG16Backbone,
    WSOLHead,
    load_vgg16_features,
    small_cam,
    small_sp,
    top_k,
    vgg16_cam,
    vgg16_sp,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: with two, a busy neighbour on a 2-core runner makes the
    OpenMP barriers spin and a training step 10-20x slower; one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _features(batch=3, channels=16, height=6, width=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=generator, dtype=torch.float64)


def _spn_head(**kwargs):
    torch.manual_seed(0)
    return SPNHead(16, 5, num_maps=8, **kwargs).double().eval()


def _cam_head(num_maps):
    torch.manual_seed(0)
    return CAMHead(16, 5, num_maps=num_maps).double().eval()


# --------------------------------------------------------------------------- heads


def test_spn_maps_equal_loop_over_classes_and_recomputed_proposal():
    head, feats = _spn_head(dropout=0.5), _features()
    logits, maps, proposal = head.forward_with_maps(feats, classes="all")
    units = head.conv(feats)  # U: the head's conv + ReLU
    coupled, expected_proposal = spn.soft_proposal(units)
    torch.testing.assert_close(proposal, expected_proposal)
    torch.testing.assert_close(coupled, units * proposal[:, None])
    weight = head.classifier.weight
    assert maps.shape == (3, 5, 6, 7)
    for c in range(5):
        expected = sum(weight[c, k] * units[:, k] * expected_proposal for k in range(8))
        torch.testing.assert_close(maps[:, c], expected)
    torch.testing.assert_close(logits, head(feats))


def test_spn_pooled_logits_are_sum_of_response_map_plus_bias_at_eval():
    head, feats = _spn_head(dropout=0.5), _features(seed=1)
    logits, maps, proposal = head.forward_with_maps(feats, classes="all")
    torch.testing.assert_close(proposal.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + head.classifier.bias, logits)


@pytest.mark.parametrize("num_maps", [None, 8])
def test_cam_maps_equal_loop_and_mean_identity(num_maps):
    head, feats = _cam_head(num_maps), _features(seed=2)
    logits, maps, proposal = head.forward_with_maps(feats, classes="all")
    assert proposal is None
    units = head.conv(feats)
    assert units.shape[1] == (16 if num_maps is None else 8)
    if num_maps is None:
        torch.testing.assert_close(units, feats)
    weight = head.classifier.weight
    for c in range(5):
        expected = sum(weight[c, k] * units[:, k] for k in range(units.shape[1]))
        torch.testing.assert_close(maps[:, c], expected)
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + head.classifier.bias, logits)


def test_spn_head_without_conv_uses_backbone_features():
    torch.manual_seed(0)
    head = SPNHead(16, 5, num_maps=None).double().eval()
    feats = _features(seed=3)
    logits, maps, proposal = head.forward_with_maps(feats, classes="all")
    _, expected_proposal = spn.soft_proposal(feats)
    torch.testing.assert_close(proposal, expected_proposal)
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + head.classifier.bias, logits)


@pytest.mark.parametrize("make_head", [lambda: _spn_head(), lambda: _cam_head(8)])
def test_class_selection_shapes_and_values(make_head):
    head, feats = make_head(), _features(batch=4, seed=4)
    logits, all_maps, _ = head.forward_with_maps(feats, classes="all")
    batch = torch.arange(4)

    predicted = head.forward_with_maps(feats, classes="predicted").maps
    assert predicted.shape == (4, 6, 7)
    torch.testing.assert_close(predicted, all_maps[batch, logits.argmax(1)])

    labels = torch.tensor([0, 4, 2, 2])
    assert head.forward_with_maps(feats, classes=labels).maps.shape == (4, 6, 7)
    torch.testing.assert_close(head.forward_with_maps(feats, classes=labels).maps, all_maps[batch, labels])

    pairs = torch.tensor([[1, 3], [0, 0], [4, 2], [3, 1]])
    torch.testing.assert_close(head.forward_with_maps(feats, classes=pairs).maps, all_maps[batch[:, None], pairs])

    top = head.forward_with_maps(feats, classes=top_k(3)).maps
    assert top.shape == (4, 3, 6, 7)
    torch.testing.assert_close(top, all_maps[batch[:, None], logits.topk(3, dim=1).indices])

    resized = head.forward_with_maps(feats, classes=labels, size=(24, 28)).maps
    assert resized.shape == (4, 24, 28)
    expected = F.interpolate(all_maps, size=(24, 28), mode="bilinear", align_corners=False)[batch, labels]
    torch.testing.assert_close(resized, expected)
    assert head.forward_with_maps(feats, classes="all", size=(12, 14)).maps.shape == (4, 5, 12, 14)


def test_bad_class_specifications_raise():
    head, feats = _spn_head(), _features(batch=2)
    with pytest.raises(TypeError, match=r"torch\.full"):
        head.forward_with_maps(feats, classes=3)
    with pytest.raises(TypeError, match="integer"):
        head.forward_with_maps(feats, classes=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        head.forward_with_maps(feats, classes=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        head.forward_with_maps(feats, classes=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="'best'"):
        head.forward_with_maps(feats, classes="best")
    with pytest.raises(ValueError, match="more classes"):
        head.forward_with_maps(feats, classes=top_k(6))
    with pytest.raises(ValueError):
        top_k(0)


def test_soft_proposal_options_pass_through():
    head = SPNHead(16, 5, num_maps=8, proposal_options=spn.RELEASED).double().eval()
    assert (head.sp.iterations, head.sp.tolerance, head.sp.epsilon) == (20, 1e-4, spn.released_epsilon)
    feats = _features(seed=5)
    _, expected = spn.soft_proposal(head.conv(feats), **spn.RELEASED)
    torch.testing.assert_close(head.forward_with_maps(feats).proposal, expected)
    assert SPNHead(16, 5, num_maps=8, iterations=3, detach=False).sp.iterations == 3
    with pytest.raises(TypeError, match="both"):
        SPNHead(16, 5, proposal_options={"iterations": 3}, iterations=4)
    with pytest.raises(TypeError, match="unknown SoftProposal option"):
        SPNHead(16, 5, iterations=3, epsilom=1.0)


def test_maps_keep_gradients_and_heads_share_interface():
    head = _spn_head()
    feats = _features().requires_grad_()
    out = head.forward_with_maps(feats, classes="predicted")
    assert isinstance(out, HeadOutput) and out.maps.requires_grad
    out.maps.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert isinstance(head, WSOLHead) and isinstance(_cam_head(None), WSOLHead)
    with pytest.raises(NotImplementedError):
        WSOLHead()(feats)
    with pytest.raises(TypeError, match="WSOLHead"):
        Network(SmallBackbone(), torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------- VGG16


def _torchvision_vgg16_state_dict(seed=0):
    """A new dict with torchvision vgg16's key names and conv shapes, random values.

    The classifier.* entries are ignored by the loader; small stand-ins keep the test fast.
    """
    return dict(_cached_vgg16_state_dict(seed))  # shallow copy: tests add and remove keys


@functools.cache
def _cached_vgg16_state_dict(seed):
    generator = torch.Generator().manual_seed(seed)
    state, channels = {}, 3
    for index, width in zip(VGG16_CONV_INDICES, VGG16_WIDTHS, strict=True):
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=generator)
        state[f"features.{index}.bias"] = torch.randn(width, generator=generator)
        channels = width
    for index in (0, 3, 6):
        state[f"classifier.{index}.weight"] = torch.randn(7, 5, generator=generator)
        state[f"classifier.{index}.bias"] = torch.randn(7, generator=generator)
    return state


def test_vgg16_backbone_layout_matches_torchvision_indices():
    backbone = VGG16Backbone()
    assert len(backbone.features) == 30
    convs = [i for i, m in enumerate(backbone.features) if isinstance(m, torch.nn.Conv2d)]
    pools = [i for i, m in enumerate(backbone.features) if isinstance(m, torch.nn.MaxPool2d)]
    assert tuple(convs) == VGG16_CONV_INDICES
    assert pools == [4, 9, 16, 23]
    assert set(backbone.state_dict()) == {k for k in _torchvision_vgg16_state_dict() if k.startswith("features.")}


def test_vgg16_sp_loads_torchvision_weights_and_runs(tmp_path):
    state = _torchvision_vgg16_state_dict()
    torch.manual_seed(0)
    net = vgg16_sp(7, backbone_state_dict=state).eval()
    torch.testing.assert_close(net.backbone.features[28].weight, state["features.28.weight"])
    torch.testing.assert_close(net.backbone.features[0].bias, state["features.0.bias"])
    assert net.head.conv[0].weight.shape == (1024, 256, 3, 3)  # 1024 maps, groups=2
    assert net.head.dropout.p == 0.5

    with torch.no_grad():
        logits, maps, proposal = net.forward_with_maps(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 7) and maps.shape == (1, 64, 64) and proposal.shape == (1, 4, 4)

    path = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.2")}, path)
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.weight"):
        load_vgg16_features(net, path)


def test_vgg16_loading_errors_are_clear_and_leave_weights_alone():
    net = vgg16_cam(3)
    before = net.backbone.features[0].weight.clone()

    extra = _torchvision_vgg16_state_dict()
    extra["features.1.running_mean"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected keys: features\.1\.running_mean"):
        load_vgg16_features(net, extra)

    missing = _torchvision_vgg16_state_dict()
    del missing["features.0.bias"]
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.bias"):
        load_vgg16_features(net, missing)

    misshaped = _torchvision_vgg16_state_dict()
    misshaped["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    with pytest.raises(ValueError, match=r"features\.2\.weight: expected \(64, 64, 3, 3\), got \(64, 32, 3, 3\)"):
        load_vgg16_features(net, misshaped)
    torch.testing.assert_close(net.backbone.features[0].weight, before)

    with pytest.raises(TypeError, match="VGG16Backbone"):
        load_vgg16_features(small_sp(3), _torchvision_vgg16_state_dict())

    loaded = load_vgg16_features(net, _torchvision_vgg16_state_dict(seed=1))
    assert loaded is net
    expected = _torchvision_vgg16_state_dict(seed=1)["features.0.weight"]
    torch.testing.assert_close(net.backbone.features[0].weight, expected)
    with torch.no_grad():
        logits, maps, proposal = net.eval().forward_with_maps(torch.rand(2, 3, 32, 32), classes="all")
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 32, 32) and proposal is None


# --------------------------------------------------------------------------- networks


def test_network_maps_default_to_image_size():
    torch.manual_seed(0)
    net = small_sp(4).eval()
    images = torch.rand(2, 3, 32, 48)
    logits, maps, proposal = net.forward_with_maps(images, classes=torch.tensor([1, 3]))
    assert maps.shape == (2, 32, 48) and proposal.shape == (2, 8, 12)
    torch.testing.assert_close(logits, net(images))
    small = net.forward_with_maps(images, classes="all", size=None).maps
    assert small.shape == (2, 4, 8, 12)
    torch.testing.assert_close(small.sum(dim=(2, 3)) + net.head.classifier.bias, logits)
    assert net.forward_with_maps(images, classes=top_k(2)).maps.shape == (2, 2, 32, 48)


def test_small_backbone_strides():
    images = torch.rand(1, 3, 64, 64)
    assert SmallBackbone()(images).shape == (1, 128, 16, 16)
    assert SmallBackbone(output_stride=8)(images).shape == (1, 128, 8, 8)
    assert small_cam(2, output_stride=8).forward_with_maps(images).maps.shape == (1, 64, 64)
    for bad in (3, 32, 0):
        with pytest.raises(ValueError, match="output_stride"):
            SmallBackbone(output_stride=bad)


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_reaches_backbone_through_sp_head(detach):
    torch.manual_seed(0)
    net = small_sp(3, detach=detach)
    loss = F.cross_entropy(net(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, parameter in net.backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def _toy_batch(seed=0):
    """16 images of 32 x 32: clutter plus a bright 8 x 8 square whose colour is the class."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand(16, 3, 32, 32, generator=generator)
    labels = torch.arange(16) % 3
    corners = torch.randint(0, 24, (16, 2), generator=generator)
    for i, (label, (y, x)) in enumerate(zip(labels, corners, strict=True)):
        images[i, label, y : y + 8, x : x + 8] = 1.0
    return images, labels


@pytest.mark.parametrize("constructor", [small_sp, small_cam])
def test_small_networks_train(constructor):
    torch.manual_seed(0)
    images, labels = _toy_batch()
    net = constructor(3)
    # lr 0.01: the loss falls clearly but stays away from 0, where float32 gradients
    # underflow into denormals that slow CPU training down tenfold.
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_forward_with_maps_size_is_the_one_name_for_the_output_size():
    torch.manual_seed(0)
    net = small_cam(num_classes=3).eval()
    images = torch.rand(2, 3, 32, 24)
    with torch.no_grad():
        assert net.forward_with_maps(images).maps.shape == (2, 32, 24)  # "image": the images' size
        assert net.forward_with_maps(images, size=(10, 7)).maps.shape == (2, 10, 7)
        features = net.forward_with_maps(images, size=None).maps
        assert features.shape[-2:] == net.backbone(images).shape[-2:]  # feature resolution
        with pytest.raises(ValueError, match="'image' or None"):
            net.forward_with_maps(images, size="full")
        with pytest.raises(ValueError, match="two positive integers"):
            net.forward_with_maps(images, size=(0, 4))


@pytest.mark.parametrize("norm, kind", [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm)])
def test_small_backbone_norm_option(norm, kind):
    net = small_sp(num_classes=2, widths=(8, 16), norm=norm)
    assert any(isinstance(module, kind) for module in net.modules())
    plain = small_cam(num_classes=2, widths=(8, 16), norm="none")
    assert not any(isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for module in plain.modules())
    # per-image normalisation: an image's logits do not depend on the rest of its batch
    group = small_cam(num_classes=2, widths=(8, 16), norm="group").train()
    images = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(group(images)[:1], group(images[:1]))
    with pytest.raises(ValueError, match="norm must be"):
        small_sp(num_classes=2, norm="layer")


def torchvision_resnet50_keys():
    """torchvision's resnet50 state-dict names, written out from its architecture: conv1, bn1,
    layer1..4 of 3, 4, 6, 3 bottlenecks (conv1..3, bn1..3, a downsample in each first block)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{name}" for name in bn)]
    for layer, blocks in enumerate((3, 4, 6, 3), 1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            for index in (1, 2, 3):
                keys += [f"{prefix}.conv{index}.weight", *(f"{prefix}.bn{index}.{name}" for name in bn)]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{name}" for name in bn)]
    return keys


def test_resnet50_backbone_has_torchvision_keys_and_wsolevaluation_strides():
    from spn.models import ResNet50Backbone

    backbone = ResNet50Backbone()
    assert list(backbone.state_dict()) == torchvision_resnet50_keys()
    assert len(backbone.state_dict()) == 318  # torchvision's 320 without fc.weight / fc.bias
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 224, 224)).shape == (1, 2048, 14, 14)  # layer4 stride 1
        assert ResNet50Backbone(large_feature_map=True)(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 8, 8)


def test_resnet50_weights_load_from_a_torchvision_layout_file(tmp_path):
    from spn.models import ResNet50Backbone, load_resnet50_features, resnet50_cam, resnet50_sp

    source = ResNet50Backbone()
    state = {key: torch.randn_like(value.float()).to(value.dtype) for key, value in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # ignored
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    net = resnet50_cam(5, backbone_state_dict=str(path))
    torch.testing.assert_close(net.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    sp = resnet50_sp(5, num_maps=16, backbone_state_dict=state)
    torch.testing.assert_close(sp.backbone.bn1.running_var, state["bn1.running_var"])
    del state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.conv1\.weight"):
        load_resnet50_features(resnet50_cam(5), state)


def test_importing_the_models_does_not_load_the_localization_stack():
    import subprocess
    import sys

    code = "import sys, spn.models; print(sorted(m for m in ('scipy.ndimage', 'spn.localize') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

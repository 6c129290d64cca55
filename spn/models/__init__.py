"""Networks for weakly supervised object localisation: SPN and CAM heads, backbones.

    >>> import torch
    >>> from spn.models import small_sp, top_k
    >>> net = small_sp(num_classes=5).eval()
    >>> logits, maps, proposal = net.forward_with_maps(torch.rand(2, 3, 64, 64), classes=top_k(2))
    >>> maps.shape
    torch.Size([2, 2, 64, 64])

Modules: `heads` (WSOLHead, SPNHead, CAMHead), `maps` (class selection, the response-map
einsum, upsampling), `backbones` (VGG16 with torchvision-compatible keys, a small CNN),
`levels` (FeatureLevels: a backbone's last few stage outputs, for multi-level methods),
`resnet` (wsolevaluation's ResNet50 with torchvision-compatible keys), `networks` (Network
and the constructors).
"""

from .backbones import VGG16_CONFIG, SmallBackbone, VGG16Backbone, load_vgg16_features
from .heads import CAMHead, HeadOutput, HeadState, SPNHead, WSOLHead
from .levels import FeatureLevels
from .maps import ClassSpec, class_response_maps, resolve_classes, top_k, upsample_maps
from .networks import Network, resnet50_cam, resnet50_sp, small_cam, small_sp, vgg16_cam, vgg16_sp
from .resnet import ResNet50Backbone, load_resnet50_features

__all__ = [
    "VGG16_CONFIG",
    "CAMHead",
    "ClassSpec",
    "FeatureLevels",
    "HeadOutput",
    "HeadState",
    "Network",
    "ResNet50Backbone",
    "SPNHead",
    "SmallBackbone",
    "VGG16Backbone",
    "WSOLHead",
    "class_response_maps",
    "load_resnet50_features",
    "load_vgg16_features",
    "resnet50_cam",
    "resnet50_sp",
    "resolve_classes",
    "small_cam",
    "small_sp",
    "top_k",
    "upsample_maps",
    "vgg16_cam",
    "vgg16_sp",
]

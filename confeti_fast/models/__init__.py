"""Segmentor networks: ResNetV1c backbones, the DeepLabV2 head, and weight loading."""
from .checkpoint import BackboneLoadReport, load_imagenet_backbone, load_model_weights
from .deeplabv2 import DeepLabV2, DLV2Head, build_segmentor, upsample_logits
from .resnet import BasicBlock, Bottleneck, ResNetV1c

__all__ = [
    "BackboneLoadReport",
    "BasicBlock",
    "Bottleneck",
    "DLV2Head",
    "DeepLabV2",
    "ResNetV1c",
    "build_segmentor",
    "load_imagenet_backbone",
    "load_model_weights",
    "upsample_logits",
]

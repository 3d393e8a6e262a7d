"""Segmentor networks (ResNetV1c, DeepLabV2 head), the CUT networks, and weight loading/interop."""
from .weights import BackboneLoadReport, load_imagenet_backbone, load_model_weights
from .cut import (
    NCE_CHANNELS,
    NCE_LAYERS,
    CutGenerator,
    PatchDiscriminator,
    PatchSampleF,
    build_cut,
    cut_to_imagenet,
    imagenet_to_cut,
    init_cut_weights,
    lsgan_loss,
)
from .deeplabv2 import DeepLabV2, DLV2Head, build_segmentor, upsample_logits
from .interop import (
    convert_mmseg_checkpoint,
    load_authors_checkpoint,
    load_cut_state_dict,
)
from .resnet import BasicBlock, Bottleneck, ResNetV1c

__all__ = [
    "BackboneLoadReport",
    "BasicBlock",
    "Bottleneck",
    "CutGenerator",
    "DLV2Head",
    "DeepLabV2",
    "NCE_CHANNELS",
    "NCE_LAYERS",
    "PatchDiscriminator",
    "PatchSampleF",
    "ResNetV1c",
    "build_cut",
    "build_segmentor",
    "convert_mmseg_checkpoint",
    "cut_to_imagenet",
    "imagenet_to_cut",
    "init_cut_weights",
    "load_authors_checkpoint",
    "load_cut_state_dict",
    "load_imagenet_backbone",
    "load_model_weights",
    "lsgan_loss",
    "upsample_logits",
]

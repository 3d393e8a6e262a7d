# GTA5 -> Cityscapes at the paper's settings (docs/method.md §1, §3 and §7).
{
    "name": "gta2cs",
    "seed": 0,
    "num_classes": 19,
    # "all": mIoU over the 19 classes; "synthia16": mIoU16 and mIoU13 over SYNTHIA's classes.
    "eval_classes": "all",
    "model": {
        "depth": 101,
        # OpenMMLab ImageNet ResNetV1c-101 (mmcv's open-mmlab://resnet101_v1c), a local file;
        # None: random init.
        "pretrained": "pretrained/resnet101_v1c.pth",
        "head_dilations": [6, 12, 18, 24],  # the DeepLabV2 ASPP classifier's four branches
    },
    # resize is mmseg's img_scale (w, h): the image is scaled to fit it, keeping its ratio.
    # generate: None reads the data at root; "demo" writes the embedded demo pair there first.
    "source": {"type": "gta5", "root": "data/gta5", "resize": [1280, 720], "generate": None},
    "target": {"type": "cityscapes", "root": "data/cityscapes", "resize": [1280, 640], "generate": None},
    # A pair that fails the start-up check (data/check): "error" refuses the dataset, "skip"
    # leaves it out; one that fails to decode later stops the run after a save ("error") or is
    # replaced by the next index that decodes ("skip"). docs/training.md, "Checking a dataset".
    "data": {"bad_samples": "error"},
    "pipeline": {
        "cat_max_ratio": 0.75,  # source crops only
        "flip_prob": 0.5,
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
    },
    # Rare Class Sampling over the source; class statistics are cached beside the data.
    "rcs": {"enabled": True, "temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 0.5},
    "batch": {"source": 2, "target": 2},
    "stages": {
        # stage 0 (optional): CUT alone, before stage 1, as the authors did
        "0": {"crop_size": [512, 512], "iters": 20000},
        "1": {"crop_size": [512, 512], "iters": 80000},
        "2": {"crop_size": [640, 640], "iters": 80000},
    },
    "evaluation": {
        "mode": "whole",  # or "slide"
        # inference scale (w, h), keep ratio; None: the image's full resolution (Cityscapes
        # 2048x1024), the authors' protocol. Logits are upsampled to the label size.
        # [1280, 640] is CONFETII's protocol, [1024, 512] DAFormer's (test.py --eval-scale W H).
        "scale": None,
        "slide_crop": [640, 640],  # (h, w)
        "slide_stride": [426, 426],  # (h, w)
        "interval": 4000,
    },
    "data_loader": {"workers": 4},
    # "confeti", or "source_only": the same model and budget, source cross-entropy only.
    "method": "confeti",
    # AdamW; decode head, CAM head, projection and reg_proj at head_lr_mult x lr. mmcv poly
    # schedule (power 1, to 0) with a linear warm-up from warmup_ratio x lr.
    "optimizer": {
        "lr": 6e-05,
        "betas": [0.9, 0.999],
        "weight_decay": 0.01,
        "head_lr_mult": 10.0,
        "warmup_iters": 1500,
        "warmup_ratio": 1e-06,
        "power": 1.0,
    },
    # The CUT style-transfer module (docs/method.md §2, 6); enabled False trains without stylization.
    "cut": {
        "enabled": True,
        "ngf": 64,
        "ndf": 64,
        "n_blocks": 9,
        "nce_dim": 256,
        "num_patches": 256,
        "nce_tau": 0.07,
        "lr": 0.0002,
        "betas": [0.5, 0.999],
        "consistency_weight": 0.1,
        # CUT as its authors ran it: "resnet" (G starts from random weights), a 3-layer PatchGAN
        # (84 px receptive field) and no L1 identity term. The demo's choices: docs/choices.md.
        "generator": "resnet",
        "d_layers": 3,
        "identity_l1_weight": 0.0,
        "d_ignore_bottom": 0,  # rows of every image D does not see (0: D sees all of it)
        # Stage 0's source crops: "rcs" (the segmentor's rare-class sampling) or "plain" (uniform).
        "stage0_source_crops": "rcs",
        # Stage 1 starts CUT from stage 0's output or --cut-checkpoint, as the authors did; False
        # allows a random start (train.py --cut-random-start).
        "require_pretrained": True,
    },
    "train": {
        "teacher_momentum": 0.999,
        "pseudo_threshold": 0.968,
        "pseudo_ignore_top": 15,  # rows of the pseudo-label weight set to 0
        "pseudo_ignore_bottom": 120,
        "mix_cam_after": 2000,  # CAM loss on the mixed image for t > this
        "contrast_after": 3000,  # contrast losses and CAM-weighted prototypes for t > this
        "color_jitter": {"strength": 0.2, "prob": 0.2},
        "blur": True,
        "cam_weight": 1.0,
        "fdist_weight": 0.005,
        "fdist_min_ratio": 0.75,
        "proto_dim": 512,
        "proto_momentum": 0.999,
        "proto_top_k": 32,
        "contrast": {"tau": 0.1, "num_samples": 4096, "ce_weight": 0.5, "reg_weight": 2.0},
        "log_interval": 50,
        # A diagnostic: the norm of each G loss term's gradient on G, at the log interval
        # (extra backward passes through G, and through the segmentor for the consistency term).
        "log_style_gradients": False,
    },
}

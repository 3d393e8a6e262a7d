# SYNTHIA -> Cityscapes at the paper's settings; reported as mIoU16 and mIoU13.
{
    "_base_": "gta2cs",
    "name": "synthia2cs",
    "eval_classes": "synthia16",
    "source": {"type": "synthia", "root": "data/synthia", "resize": [1280, 760]},
}

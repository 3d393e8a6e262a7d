# The demo's self-training alone, for the ablation: EMA teacher, pseudo labels, ClassMix and RCS
# (the demo has no feature distance: configs/demo.py). No CAM loss, no contrast (its gate never
# opens, so the prototypes never reach a loss) and no style transfer.
{
    "_base_": "demo_nostyle",
    "name": "demo_selftrain",
    "train": {"cam_weight": 0.0, "contrast_after": 1000000000},
}

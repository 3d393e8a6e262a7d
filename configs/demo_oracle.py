# The demo's ceiling at the same budget: source cross-entropy on the *target's* labelled train
# split (what no adaptation method can see), evaluated like every other row on the target val.
{
    "_base_": "source_only",
    "name": "demo_oracle",
    "source": {"type": "cityscapes", "root": "data/demo/cityscapes", "resize": [320, 160], "generate": "demo"},
}

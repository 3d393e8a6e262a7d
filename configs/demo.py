# The embedded demo domain pair (generated under data/demo on first use), sized for a CPU.
{
    "_base_": "gta2cs",
    "name": "demo",
    "model": {"depth": 18, "pretrained": None},
    # generate: the demo pair is written under data/demo on first use.
    "source": {"type": "gta5", "root": "data/demo/gta5", "resize": [320, 180], "generate": "demo"},
    "target": {"type": "cityscapes", "root": "data/demo/cityscapes", "resize": [320, 160], "generate": "demo"},
    # 3000 pixels at 1280x720 is about 200 at the demo's 320x180.
    "rcs": {"min_pixels": 200},
    "stages": {
        "1": {"crop_size": [128, 128], "iters": 2000},
        "2": {"crop_size": [160, 160], "iters": 2000},
    },
    "evaluation": {"scale": [320, 160], "slide_crop": [160, 160], "slide_stride": [106, 106], "interval": 500},
    "data_loader": {"workers": 0},
}

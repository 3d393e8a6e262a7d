"""confeti_fast: CONFETI domain-adaptive segmentation on current PyTorch.

`kernels/` and `configs/` sit at the top of the repository but install inside the package,
as `confeti_fast.kernels` and `confeti_fast.configs`, so they never collide with other
projects' top-level names.
"""
from setuptools import setup

setup(
    name="confeti_fast",
    version="0.1.0",
    description="Fast CONFETI: contrastive, stylized unsupervised domain adaptation for segmentation",
    python_requires=">=3.10",
    packages=[
        "confeti_fast",
        "confeti_fast.data",
        "confeti_fast.models",
        "confeti_fast.ops",
        "confeti_fast.kernels",
        "confeti_fast.configs",
    ],
    package_dir={
        "confeti_fast": "confeti_fast",
        "confeti_fast.kernels": "kernels",
        "confeti_fast.configs": "configs",
    },
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "ninja",
        "opencv-python-headless",  # 16-bit SYNTHIA labels and mmcv-identical resizing
        "tqdm",  # progress bars
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "cityscapesscripts"],
    },
)

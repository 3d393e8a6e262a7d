"""confeti_fast: CONFETI domain-adaptive segmentation on current PyTorch.

`kernels/` and `configs/` sit at the top of the repository but install inside the package,
as `confeti_fast.kernels` and `confeti_fast.configs`, so they never collide with other
projects' top-level names.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("confeti_fast builds C++/CUDA extensions against torch: install torch first, then "
             "`pip install --no-build-isolation -e .`")


def _cuda_include_dirs():
    """The CUDA headers that torch's cu12/cu13 wheels ship under site-packages/nvidia."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for cu in ("cu13", "cu12") for d in glob.glob(os.path.join(site, "nvidia", cu, "include")))


def _rpath_args():
    """Find torch's libraries (and its CUDA runtime) without `import torch` first, so that
    `import confeti_fast._C` works on its own."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    dirs += sorted(d for cu in ("cu13", "cu12") for d in glob.glob(os.path.join(site, "nvidia", cu, "lib")))
    return [f"-Wl,-rpath,{d}" for d in dirs]


def _want_cuda():
    forced = os.environ.get("FORCE_CUDA") == "1"
    if not (torch.cuda.is_available() or forced):
        return False
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    if forced:  # asked for explicitly (CI): fail rather than quietly build less
        sys.exit(f"FORCE_CUDA=1 but there is no nvcc under CUDA_HOME={home!r}: point CUDA_HOME at the CUDA toolkit")
    print(f"warning: not building confeti_fast._C_cuda: no nvcc under CUDA_HOME={home!r}", file=sys.stderr)
    return False


def _extensions():
    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "csrc")] + _cuda_include_dirs()
    cxx = ["-O3", "-ffp-contract=off", "-g0"]  # -g0 overrides the -g torch adds: 4x smaller .so
    exts = [cpp_extension.CppExtension(
        "confeti_fast._C", ["csrc/proto_update_cpu.cpp"],
        include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=_rpath_args())]
    if _want_cuda():
        exts.append(cpp_extension.CUDAExtension(
            "confeti_fast._C_cuda", ["csrc/proto_update_cuda.cpp", "csrc/proto_update_kernels.cu"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=_rpath_args()))
    return exts


setup(
    name="confeti_fast",
    version="0.1.0",
    description="Fast CONFETI: contrastive, stylized unsupervised domain adaptation for segmentation",
    python_requires=">=3.10",
    packages=[
        "confeti_fast",
        "confeti_fast.config",
        "confeti_fast.data",
        "confeti_fast.data.check",
        "confeti_fast.data.demo",
        "confeti_fast.evaluation",
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
        "matplotlib",  # training curves (curves.png), drawn on the non-interactive Agg canvas
    ],
    extras_require={
        "tensorboard": ["tensorboard"],  # scalars and panels in WORK_DIR/stage<N>/tb
        "test": ["pytest", "pytest-benchmark", "cityscapesscripts", "tensorboard"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

